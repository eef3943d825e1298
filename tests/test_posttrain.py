import json

import pytest
import torch

from desta.core.generation import Generation, TransformersBackend
from desta.core.replay import mix
from desta.posttrain import PostTrainConfig, TaskSection, posttrain
from desta.posttrain.strategies import (
    answer_nll,
    encode,
    filter_tokens,
    keep_paraphrase,
    magpie,
    magpie_prefix,
    pick_verified,
)
from desta.posttrain.tasks import arithmetic_task
from desta.posttrain.verifiers import exact_match, json_schema, last_number, make_verifier, python_tests, regex
from desta.tiny import save_tiny_bases, tiny_llm, tiny_tokenizer


def test_replay_ratio_over_many_batches():
    train = [{"instruction": f"t{i}", "answer": "x"} for i in range(970)]
    replay = [{"instruction": f"r{i}", "answer": "y"} for i in range(50)]
    mixed = mix(train, replay, 0.03, seed=1)
    share = sum(r["instruction"].startswith("r") for r in mixed) / len(mixed)
    assert share == pytest.approx(0.03, abs=0.001) and len(mixed) == 1000
    batches = [mixed[i : i + 100] for i in range(0, 1000, 100)]
    assert all(sum(r["instruction"].startswith("r") for r in b) <= 10 for b in batches)  # spread, not bunched
    assert mixed == mix(train, replay, 0.03, seed=1)  # reproducible for a seed


def test_magpie_prompt_is_the_template_up_to_the_user_header():
    tokenizer = tiny_tokenizer()
    assert magpie_prefix(tokenizer) == "<|im_start|>user\n"
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n"
                               "{% endif %}" + tokenizer.chat_template)
    assert magpie_prefix(tokenizer) == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n"


def test_magpie_rows_are_filtered_and_counted():
    backend = TransformersBackend(llm=tiny_llm(), tokenizer=tiny_tokenizer())
    rows, dropped = magpie(backend, count=8, max_new_tokens=8, answer_tokens=4)
    assert len(rows) + sum(dropped.values()) == 8  # every sampled instruction is kept or counted
    assert all(r["instruction"] and r["answer"] for r in rows)


def test_self_output_keeps_only_verified_answers_and_picks_lowest_perplexity():
    llm, tokenizer = tiny_llm(), tiny_tokenizer()
    question = "Ana has 37 apples and buys 48 more. How many?"
    candidates = [Generation("The answer is 85.", "stop", 5), Generation("So 85 apples", "stop", 4),
                  Generation("The answer is 84.", "stop", 5), Generation("85 and then", "length", 3)]
    nll = {c.text: answer_nll(llm, tokenizer, question, c.text) for c in candidates}
    best = pick_verified(candidates, "85", last_number, nll.__getitem__)
    assert best == min(["The answer is 85.", "So 85 apples"], key=nll.__getitem__)
    assert pick_verified(candidates[2:], "85", last_number, nll.__getitem__) is None


def test_paraphrase_falls_back_to_gold_when_the_verifier_rejects():
    row = {"instruction": "q", "answer": "2 + 3 = 5. The answer is 5.", "gold": "5"}
    assert keep_paraphrase(row, Generation("Adding gives 5.", "stop", 4), last_number) == "Adding gives 5."
    assert keep_paraphrase(row, Generation("Adding gives 6.", "stop", 4), last_number) == row["answer"]
    assert keep_paraphrase(row, Generation("Adding gives 5", "length", 4), last_number) == row["answer"]


def test_token_filtering_masks_exactly_the_tokens_under_the_threshold():
    llm, tokenizer = tiny_llm(), tiny_tokenizer()
    example = encode(tokenizer, {"instruction": "What is 2+3?", "answer": "The answer is 5."}, "sft", 256)
    threshold = 0.002  # a random tiny model spreads probability thin: some tokens either side
    filtered, share = filter_tokens(llm, [example], threshold)
    with torch.no_grad():
        probs = llm(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1].softmax(-1)
    targets = [p for p, label in enumerate(example["labels"]) if label != -100 and p > 0]
    below = [p for p in targets if float(probs[p - 1, example["labels"][p]]) < threshold]
    assert 0 < len(below) < len(targets)
    assert [p for p in targets if filtered[0]["labels"][p] == -100] == below
    assert share == pytest.approx(len(below) / len(targets))


def test_sft_and_pretrain_styles():
    tokenizer = tiny_tokenizer()
    row = {"instruction": "Say hi.", "answer": "Hi there."}
    sft = encode(tokenizer, row, "sft", 256)
    kept = [t for t in sft["labels"] if t != -100]
    assert tokenizer.decode(kept) == "Hi there.<|im_end|>"
    raw = encode(tokenizer, row, "pretrain", 256)
    assert raw["labels"] == raw["input_ids"]


def test_verifiers():
    assert last_number("so 12 + 5 = 17", "17")[0] and not last_number("17, no wait, 18", "17")[0]
    assert last_number("no digits", "1") == (False, "no number")
    assert exact_match("The Eiffel Tower.", "eiffel tower")[0] and not exact_match("Big Ben", "eiffel tower")[0]
    schema = {"type": "object", "required": ["name", "age"], "properties": {"age": {"type": "integer"}}}
    assert json_schema(schema)('{"name": "Ada", "age": 36}')[0]
    assert json_schema(schema)('{"name": "Ada", "age": "old"}')[1].startswith("schema:")
    assert json_schema(schema)("{oops")[1] == "not valid JSON"
    assert regex(r"^\d{4}-\d{2}-\d{2}$")("2024-05-01")[0] and not regex(r"^\d+$")("12a")[0]
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    check = python_tests(timeout=2, memory_mb=256)
    assert check("```python\ndef add(a, b):\n    return a + b\n```", tests) == (True, "tests pass")
    assert check("def add(a, b):\n    return a - b", tests)[1].startswith("tests fail: AssertionError")
    assert check("def add(a, b):\n    while True:\n        pass", tests) == (False, "timed out after 2 s")
    assert not check("big = bytearray(2**31)\ndef add(a, b):\n    return a + b", tests)[0]  # over the memory cap
    with pytest.raises(ValueError, match="unknown verifier 'magic'"):
        make_verifier({"kind": "magic"})


def test_arithmetic_task_answers_verify():
    rows = arithmetic_task(20, seed=3)
    assert all(last_number(r["answer"], r["gold"])[0] for r in rows)
    assert len({r["instruction"] for r in rows}) == 20


def test_posttrain_end_to_end_on_a_tiny_model(tmp_path):
    _, llm_dir = save_tiny_bases(tmp_path / "bases")
    config = PostTrainConfig(model=str(llm_dir), output_dir=str(tmp_path / "run"),
                             strategies=["sft", "lora+replay", "token_filter"],
                             task=TaskSection(train_size=8, eval_size=2), eval_max_new_tokens=4,
                             probe_max_new_tokens=4, replay_ratio=0.2)
    config.optim.max_steps, config.optim.batch_size = 2, 4
    comparison = posttrain(config, log=lambda *a: None)
    assert [r["strategy"] for r in comparison["strategies"]] == ["sft", "lora+replay", "token_filter"]
    lora_replay = comparison["strategies"][1]
    assert lora_replay["train_rows"] == 10  # 8 task rows + 2 replay rows = 20 %
    assert "token_filter_masked_share" in comparison["strategies"][2]["notes"]
    assert (tmp_path / "run" / "forgetting.png").stat().st_size > 5000
    table = (tmp_path / "run" / "comparison.md").read_text()
    assert "| lora+replay | 10 |" in table
    saved = json.loads((tmp_path / "run" / "sft" / "metrics.json").read_text())
    assert set(saved["deltas"]) >= {"task_accuracy", "heldout_loglik"}
