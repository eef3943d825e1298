import json
import re

import numpy as np
import pytest
import torch

from desta.core.args import ConfigError, build, load_config, parse_command
from desta.core.generation import Generation, TransformersBackend
from desta.core.optim import OptimSection
from desta.core.replay import mix
from desta.model.tiny import save_tiny_bases, tiny_llm, tiny_tokenizer
from desta.posttrain import PostTrainConfig, posttrain
from desta.posttrain.config import RetentionSection
from desta.posttrain.data import strategy_data
from desta.posttrain.examples import answer_nll, encode
from desta.posttrain.knowledge import knowledge_filter, knowledge_split
from desta.posttrain.report import delta_stats
from desta.posttrain.strategies.bos_replay import bos_prefix, bos_replay, lm_rows
from desta.posttrain.strategies.magpie import magpie, magpie_prefix
from desta.posttrain.strategies.paraphrase import keep_paraphrase
from desta.posttrain.strategies.rl import train_grpo
from desta.posttrain.strategies.self_distill import self_distill
from desta.posttrain.strategies.self_output import pick_verified
from desta.posttrain.strategies.token_filter import filter_tokens
from desta.posttrain.tasks import arithmetic_task
from desta.posttrain.verifiers import exact_match, json_schema, last_number, make_verifier, python_tests, regex


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


class ScriptedBackend:
    """A generation backend whose answers a test writes: answer(conversation, settings, call) -> text."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def generate(self, conversations, settings):
        out = []
        for conversation in conversations:
            self.asked.append((conversation, settings))
            out.append(Generation(self.answer(conversation, settings, len(self.asked)), "stop", 5))
        return out


def test_bos_replay_rows_are_plain_language_modelling_with_loss_on_every_token():
    tokenizer = tiny_tokenizer()
    prefix = bos_prefix(tokenizer)
    assert prefix == "<|im_start|>" and bos_prefix(tokenizer, "<|endoftext|>") == "<|endoftext|>"
    text = "The quick brown fox jumps over the lazy dog."
    rows, dropped = lm_rows([text, "Hi there", "", text, "a man speaks " * 4], prefix)
    assert rows == [{"text": prefix + text}]
    assert dropped == {"empty": 1, "too short": 1, "repetition": 1, "duplicate": 1}
    example = encode(tokenizer, rows[0], "sft", 256)  # an LM row is raw text even when the task trains chat turns
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert example["labels"] == example["input_ids"] and tokenizer.decode(example["input_ids"][1:]) == text
    backend = TransformersBackend(llm=tiny_llm(), tokenizer=tokenizer, batch_size=4)
    sampled, dropped = bos_replay(backend, count=6, max_new_tokens=12, min_words=1)
    assert len(sampled) + sum(dropped.values()) == 6 and all(r["text"].startswith(prefix) for r in sampled)


def test_self_distill_rewrites_the_own_answer_with_the_gold_in_view():
    rows = [{"instruction": f"What is {a} + 2?", "answer": f"{a} + 2 = {a + 2}. The answer is {a + 2}.",
             "gold": str(a + 2)} for a in (1, 2, 3)]

    def answer(conversation, settings, call):
        prompt = conversation[-1]["content"]
        if "reference answer" not in prompt:  # first pass: the model's own answer; right only for 3 + 2
            return "It is 5." if "3 + 2" in prompt else "It is 7."
        return "Adding 2 to 1 gives 3." if "1 + 2" in prompt else "Still 7."  # rewrites: right only for 1 + 2

    backend = ScriptedBackend(answer)
    out, counts = self_distill(backend, rows, last_number)
    assert [r["answer"] for r in out] == ["Adding 2 to 1 gives 3.", rows[1]["answer"], "It is 5."]
    assert counts == {"rewrite": 1, "own answer": 1, "gold": 1}
    rewrite_prompt = backend.asked[3][0][-1]["content"]  # the model sees its own answer and the gold one
    assert "It is 7." in rewrite_prompt and rows[0]["answer"] in rewrite_prompt


def test_knowledge_split_on_a_model_stubbed_to_know_some_items():
    rows = [{"instruction": f"Item {i}: what is the code?", "answer": f"The code is {i}{i}.", "gold": f"{i}{i}"}
            for i in range(5)]
    known, few_shot_known, weakly_known = {0, 3}, {1}, {2}  # item 4 is never answered right

    def answer(conversation, settings, call):
        item = int(re.search(r"Item (\d)", conversation[-1]["content"]).group(1))
        right = (item in known or (item in few_shot_known and len(conversation) > 1)
                 or (item in weakly_known and settings.temperature > 0 and call % 2 == 0))
        return f"The code is {item}{item}." if right else "I do not know."

    backend = ScriptedBackend(answer)
    categories = knowledge_split(backend, rows, exact_match_code, shots=2, samples=3, temperature=0.7)
    assert categories == ["HighlyKnown", "MaybeKnown", "WeaklyKnown", "HighlyKnown", "Unknown"]
    few_shot_prompts = [c for c, s in backend.asked if len(c) > 1]
    assert len(few_shot_prompts) == 3 and all(len(c) == 5 for c in few_shot_prompts)  # 2 solved examples each
    assert sum(s.temperature > 0 for _, s in backend.asked) == 2 * 3  # only the 2 items left are sampled, 3 times
    kept, labelled, notes = knowledge_filter(ScriptedBackend(answer), rows, exact_match_code, ["Unknown"], shots=2,
                                             samples=3)
    assert [r["gold"] for r in kept] == ["00", "11", "22", "33"]
    assert notes == {"split": {"HighlyKnown": 2, "MaybeKnown": 1, "WeaklyKnown": 1, "Unknown": 1}, "dropped": 1}
    assert [r["knowledge"] for r in labelled] == categories
    with pytest.raises(ValueError, match="knowledge_filter left no training item"):
        knowledge_filter(ScriptedBackend(lambda *a: "no"), rows, exact_match_code, ["Unknown"], samples=1)


def test_knowledge_split_reads_answers_as_long_as_the_task_evaluation_does():
    rows = [{"instruction": f"Item {i}: what is the code?", "answer": f"The code is {i}{i}.", "gold": f"{i}{i}"}
            for i in range(4)]
    backend = ScriptedBackend(lambda conversation, settings, call: "The code is 00." if call == 1 else "No.")
    backend.tokenizer = tiny_tokenizer()
    config = build(PostTrainConfig, {"model": "m", "eval_max_new_tokens": 24, "answer_max_new_tokens": 160,
                                     "knowledge": {"samples": 2}})
    kept, _, notes = strategy_data({"knowledge_filter"}, backend, config, rows, [], exact_match_code)
    assert [r["gold"] for r in kept] == ["00"] and notes["knowledge"]["dropped"] == 3
    assert {s.max_new_tokens for _, s in backend.asked} == {24}


def exact_match_code(answer, gold):
    return gold in answer, "contains the code"


def test_grpo_two_steps_train_only_the_lora_adapters():
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny_tokenizer()
    model = get_peft_model(tiny_llm(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"instruction": f"Say a word about {w}.", "answer": w, "gold": w} for w in ("sea", "sky")]
    even = lambda answer, gold: (len(answer) % 2 == 0, "even length")  # noqa: E731 -- a reward that varies
    trainer = train_grpo(model, tokenizer, rows, even, OptimSection(max_steps=2, batch_size=4, warmup_steps=0),
                         learning_rate=1e-2, settings={"num_generations": 4, "max_completion_length": 6},
                         output_dir="unused", logging_steps=1)
    logged = [r for r in trainer.state.log_history if "reward_std" in r]
    assert len(logged) == 2 and any(r["reward_std"] > 0 for r in logged)  # some group had a reward to follow
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    lora = {n for n in before if "lora_" in n}
    assert changed and changed <= lora  # the adapters learnt, every base weight is bit-identical
    assert {n for n in lora if "lora_B" in n} <= changed


def test_grpo_in_bf16_learns_exactly_what_trls_own_trainer_learns(monkeypatch):
    import trl

    from desta.posttrain.strategies import rl

    rows = [{"instruction": f"Say a word about {w}.", "answer": w, "gold": w} for w in ("sea", "sky")]
    even = lambda answer, gold: (len(answer) % 2 == 0, "even length")  # noqa: E731 -- a reward that varies
    optim = OptimSection(max_steps=2, batch_size=4, warmup_steps=0, precision="bf16")
    assert rl.grpo_trainer_class() is not trl.GRPOTrainer  # this trl has the hook: generation runs in one region

    def trained(trainer_class: type) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(rl, "grpo_trainer_class", lambda: trainer_class)
        model = tiny_llm().train()
        rl.train_grpo(model, tiny_tokenizer(), rows, even, optim, learning_rate=1e-2,
                      settings={"num_generations": 4, "max_completion_length": 6}, output_dir="unused")
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    ours, theirs = trained(rl.grpo_trainer_class()), trained(trl.GRPOTrainer)
    assert not torch.equal(ours["lm_head.weight"], tiny_llm().lm_head.weight)  # it trained
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)  # the same samples, the same steps


def test_deltas_are_paired_with_intervals_and_spread_over_seeds():
    base = {"task_accuracy": [0.0] * 30 + [1.0] * 10, "format_following": [1.0] * 20, "refusal_rate": [1.0] * 4,
            "over_refusal_rate": [0.0] * 4, "own_answer_loglik": [-1.0] * 5}
    seed_a = {**base, "task_accuracy": [1.0] * 40, "format_following": [0.0] * 10 + [1.0] * 10,
              "over_refusal_rate": [1.0] * 2 + [0.0] * 2, "own_answer_loglik": [-1.5] * 5}
    seed_b = {**seed_a, "task_accuracy": [0.0] * 10 + [1.0] * 30}
    stats = delta_stats(base, [seed_a, seed_b])
    assert stats["task_accuracy"]["value"] == pytest.approx((0.75 + 0.5) / 2)
    assert stats["task_accuracy"]["sd"] == pytest.approx(np.std([0.75, 0.5], ddof=1))
    low, high = stats["task_accuracy"]["ci"]
    assert 0 < low < stats["task_accuracy"]["value"] < high
    assert stats["own_answer_loglik"]["value"] == pytest.approx(-0.5) and stats["own_answer_loglik"]["ci"] == \
        pytest.approx([-0.5, -0.5])
    # retained: format -0.5, refusal 0, answering safe requests -0.5 (over-refusal +0.5), each counting once
    assert stats["retained"]["value"] == pytest.approx((-0.5 + 0 - 0.5) / 3)
    assert stats["retained"]["ci"][1] < 0  # forgetting outside the interval
    single = delta_stats(base, [seed_a])
    assert single["task_accuracy"]["sd"] is None and single["task_accuracy"]["value"] == pytest.approx(0.75)


def tiny_config(llm_dir, out, **overrides):
    config = build(PostTrainConfig, {
        "model": str(llm_dir), "output_dir": str(out), "task": {"train_size": 8, "eval_size": 4},
        "retention": {"format_size": 4, "own_answer_size": 3, "refusal_size": 2, "own_answer_max_new_tokens": 4},
        "eval_max_new_tokens": 4, "probe_max_new_tokens": 4, "answer_max_new_tokens": 4, "replay": {"ratio": 0.2},
        "bos_replay": {"count": 8, "max_new_tokens": 24}, "knowledge": {"samples": 2, "drop": []},
        "save_models": False, **overrides})
    config.optim.max_steps, config.optim.batch_size = 2, 4
    return config


def test_posttrain_compares_strategies_and_seeds_and_resumes_run_by_run(tmp_path):
    _, llm_dir = save_tiny_bases(tmp_path / "bases")
    out = tmp_path / "run"
    plan = dict(strategies=["sft", "replay", "lora+replay", "bos_replay", "knowledge_filter", "self_distill"],
                seeds=[1, 2], seeded_strategies=["sft", "lora"], replay_sweep=[0, 0.2, 0.1])
    progress: list[str] = []
    comparison = posttrain(tiny_config(llm_dir, out, **plan), log=progress.append)
    names = [(r["name"], r["seed"]) for r in comparison["runs"]]
    # long stages announce each part: the base measurement and every run's, after its training
    measured = [line.split(" (")[0].strip() for line in progress if "measuring" in line]
    assert measured[:5] == ["base model: measuring 4 task questions and the retention sets",
                            "measuring 4 task questions", "measuring 4 format requests",
                            "measuring 4 harmful and safe requests", "measuring 3 own answers' log-likelihood"]
    assert names == [("sft", 1), ("sft", 2), ("replay", 1), ("lora+replay", 1), ("bos_replay", 1),
                     ("knowledge_filter", 1), ("self_distill", 1), ("replay@0.1", 1)]
    # the sweep's 0 is sft and its 0.2 (the configured replay_ratio) the replay run: only 0.1 needs a run
    assert [(p["ratio"], p["run"]) for p in comparison["sweep"]] == [(0, "sft"), (0.2, "replay"), (0.1, "replay@0.1")]
    sft = comparison["strategies"][0]
    assert sft["seeds"] == [1, 2] and sft["deltas"]["task_accuracy"]["sd"] is not None
    assert comparison["strategies"][2]["train_rows"] == 10  # 8 task rows + 2 replay rows = 20 %
    table = (out / "comparison.md").read_text()
    assert "| knowledge_filter | 0 | 0 | 0 | 8 | 0 |" in table and re.search(r"\| sft \| 2 \| 8 \| .* ± .*\[", table)
    assert (out / "forgetting.png").stat().st_size > 5000 and (out / "replay_sweep.png").stat().st_size > 5000
    assert len((out / "knowledge_filter" / "seed-1" / "knowledge.jsonl").read_text().splitlines()) == 8
    # a run finished before the strategies had sections recorded its settings under the old flat keys: still the same
    old = out / "lora+replay" / "seed-1" / "metrics.json"
    result = json.loads(old.read_text())
    settings = result["settings"]
    settings["lora_lr"], settings["lora"] = settings["lora"]["lr"], settings["lora"]["peft"]
    settings["replay_data"], settings["replay_ratio"] = settings["replay"]["data"], settings.pop("replay")["ratio"]
    old.write_text(json.dumps(result))
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/metrics.json")}
    assert len(finished) == 8

    logs = []  # the same settings, and a setting none of these runs has: nothing is trained again
    posttrain(tiny_config(llm_dir, out, magpie={"count": 3}, **plan), log=logs.append)
    assert sum("kept" in line for line in logs) == 8 and not any("training" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished

    with pytest.raises(ValueError, match=r"made with other settings: .*sft/seed-1 \(optim\.lr: 2e-05 -> 0\.001"):
        changed = tiny_config(llm_dir, out, **plan)
        changed.optim.lr = 1e-3
        posttrain(changed, log=lambda *a: None)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # refused before anything ran
    redo = tiny_config(llm_dir, out, overwrite=True, **{**plan, "strategies": ["sft"], "replay_sweep": []})
    redo.optim.lr = 1e-3
    posttrain(redo, log=lambda *a: None)
    assert all(p.stat().st_mtime_ns != finished[p] for p in out.glob("sft/seed-*/metrics.json"))
    assert json.loads((out / "sft" / "seed-1" / "metrics.json").read_text())["settings"]["optim"]["lr"] == 1e-3


def test_posttrain_without_refusal_items_retains_format_alone(tmp_path):
    _, llm_dir = save_tiny_bases(tmp_path / "bases")
    out = tmp_path / "run"
    config = tiny_config(llm_dir, out, strategies=["sft"])
    config.retention.refusal_size = 0
    progress: list[str] = []
    comparison = posttrain(config, log=progress.append)
    assert not any("harmful" in line for line in progress)  # not generated at all
    assert comparison["base"]["items"]["refusal_rate"] == 0 and comparison["base"]["means"]["refusal_rate"] is None
    deltas = comparison["strategies"][0]["deltas"]
    assert "refusal_rate" not in deltas and deltas["retained"]["value"] == pytest.approx(
        deltas["format_following"]["value"])
    table = (out / "comparison.md").read_text()
    assert "format following alone (no refusal items)" in table and "| base | " in table
    with pytest.raises(ValueError, match="refusal_size 0 .no refusal items. or more"):
        RetentionSection(refusal_size=-1)


def test_posttrain_in_bf16_generates_under_autocast_and_keeps_likelihoods_in_float32(tmp_path, monkeypatch):
    import desta.posttrain.run as run_module

    _, llm_dir = save_tiny_bases(tmp_path / "bases")
    config = tiny_config(llm_dir, tmp_path / "run", strategies=["sft"])
    config.optim.precision = "bf16"
    made = []
    real = run_module.generation_backend
    monkeypatch.setattr(run_module, "generation_backend", lambda *a: made.append(real(*a)) or made[-1])
    comparison = posttrain(config, log=lambda *a: None)
    assert made and all(b.autocast == torch.bfloat16 for b in made)
    assert all(p.dtype == torch.float32 for b in made for p in b.llm.parameters())  # weights stay float32
    assert comparison["strategies"][0]["deltas"]["own_answer_loglik"]["ci"] is not None
    base = json.loads((tmp_path / "run" / "base" / "metrics.json").read_text())
    assert base["settings"]["precision"] == "bf16"  # a float32 base is never taken for this one


def test_posttrain_config_checks_the_new_strategies():
    with pytest.raises(ConfigError) as err:
        build(PostTrainConfig, {"model": "m", "strategies": ["sft", "rl+replay", "rl"],
                                "rl": {"grpo": {"num_generation": 4, "seed": 1}},
                                "seeded_strategies": ["lora", "lora+replya"]})
    problems = "\n".join(err.value.problems)
    assert "rl.grpo: GRPOConfig has no setting 'num_generation'; did you mean 'num_generations'?" in problems
    assert "seed is set by desta" in problems and "['rl+replay']: rl learns from its own samples" in problems
    assert "['lora+replya'] are not strategies" in problems
    with pytest.raises(ConfigError, match=r"knowledge.drop: unknown categories \['Unknwn'\]"):
        build(PostTrainConfig, {"model": "m", "knowledge": {"drop": ["Unknwn"]}})
    with pytest.raises(ConfigError, match=r"num_generations 3 must divide optim.batch_size x grad_accum \(8 x 1\)"):
        build(PostTrainConfig, {"model": "m", "strategies": ["rl"], "rl": {"grpo": {"num_generations": 3}}})


def test_each_strategy_setting_is_in_its_section_and_an_old_flat_key_names_its_new_one(tmp_path):
    config = load_config(PostTrainConfig, None, ["model=m", "replay.ratio=0.05", "rl.grpo={num_generations: 2}",
                                                 "lora.peft.r=4"])
    assert (config.replay.ratio, config.rl.grpo, config.lora.peft["r"]) == (0.05, {"num_generations": 2}, 4)
    yaml = tmp_path / "old.yaml"
    yaml.write_text("model: m\nreplay_ratio: 0.05\ngrpo: {beta: 0.0}\nlora: {r: 4}\n")
    with pytest.raises(ConfigError) as err:
        parse_command(PostTrainConfig, [str(yaml), "knowledge_drop=[]", "--self-align-k", "3"])
    assert sorted(err.value.problems) == [
        "unknown key 'grpo'; did you mean 'rl.grpo'?",
        "unknown key 'knowledge_drop'; did you mean 'knowledge.drop'?",
        "unknown key 'lora.r'; did you mean 'lora.peft.r'?",
        "unknown key 'replay_ratio'; did you mean 'replay.ratio'?",
        "unknown key 'self_align_k'; did you mean 'self_align.k'?"]
