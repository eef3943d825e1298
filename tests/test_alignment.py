"""The second lecture's strategies on tiny models: response tuning, the rule-based adapter, self-alignment,
KL-anchored self replay, on-policy distillation from the base model, the knowledge-split prediction, and the
token-shift report."""

import copy
import json

import pytest
import torch
from transformers import LogitsProcessorList

from desta.cli import main
from desta.core.args import ConfigError, build
from desta.core.generation import Generation, SamplingSettings, TransformersBackend
from desta.core.optim import OptimSection
from desta.core.rules import RuleAdapter, RuleSettings, rule_nll
from desta.core.sequences import IGNORE_INDEX, end_of_turn_ids
from desta.model.tiny import save_tiny_bases, tiny_llm, tiny_tokenizer
from desta.posttrain import PostTrainConfig, posttrain
from desta.posttrain.data import strategy_data
from desta.posttrain.examples import answer_nll, encode
from desta.posttrain.strategies.replay_kl import KLCollator, kl_trainer_class
from desta.posttrain.strategies.self_align import preference_pairs, self_align_pairs, self_scores
from desta.posttrain.token_shift import TokenShiftConfig, token_shift
from desta.posttrain.training import train_model
from desta.posttrain.verifiers import last_number

ROWS = [{"instruction": f"Ana has {a} apples and buys 2 more. How many?", "answer": f"{a} + 2 = {a + 2}.",
         "gold": str(a + 2)} for a in (3, 5, 7, 9)]


def settings(**overrides):
    """A posttrain config for a tiny in-memory model: 2 steps of 2 rows, short answers."""
    config = build(PostTrainConfig, {"model": "in-memory", "answer_max_new_tokens": 6, "replay_kl": {"source": "bos"},
                                     "bos_replay": {"count": 8, "max_new_tokens": 24}, "replay": {"ratio": 0.3},
                                     "self_align": {"k": 3, "min_margin": 0.0},
                                     "on_policy_distill": {"distill": {"max_completion_length": 6}}, **overrides})
    config.optim = OptimSection(max_steps=2, batch_size=2, warmup_steps=0, lr=1e-2)
    return config


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    """The parameters that differ from `before` (a peft model's base weights under their unwrapped names)."""
    return {n for n, p in model.named_parameters() if "lora_" not in n
            and not torch.equal(before[n.replace("base_model.model.", "").replace(".base_layer", "")], p.detach())}


def adapters_learnt(model):
    """Whether every LoRA B matrix of the trained adapter (zero at the start) moved; trl's DPO keeps a frozen copy
    of the initial adapter ("ref") as its reference."""
    trained = [p for n, p in model.named_parameters() if "lora_B.default" in n]
    return trained and all(not torch.equal(p, torch.zeros_like(p)) for p in trained)


# ----- rule-based adapter -----

def test_rule_adapter_lets_a_complete_answer_end_and_penalises_repeated_words_not_numbers():
    tokenizer = tiny_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    adapter = RuleAdapter(tokenizer, {end}, RuleSettings(end_min_tokens=3, end_slope=0.5, end_bias=4.0,
                                                         repeat_penalty=2.0))
    scores = torch.zeros(1, len(tokenizer))
    short = torch.tensor([tokenizer("A man.").input_ids[:2]])  # two tokens: under end_min_tokens
    assert torch.equal(adapter.adjust(scores, short)[0, end], torch.tensor(0.0))
    sentence = torch.tensor([tokenizer("A man speaks 42 words.").input_ids])  # ends a sentence
    words = len(sentence[0])
    adjusted = adapter.adjust(scores, sentence)[0]
    assert adjusted[end] == pytest.approx(0.5 * (words - 3) + 4.0)
    mid = adapter.adjust(scores, sentence[:, :-1])[0]  # the same answer before its full stop: the slope alone
    assert mid[end] == pytest.approx(0.5 * (words - 4))
    speaks, four = tokenizer(" speaks").input_ids[-1], tokenizer("4").input_ids[0]
    assert adjusted[speaks] == -2.0 and adjusted[four] == 0.0  # a repeated word loses, a repeated digit does not
    assert adjusted[tokenizer(" fox").input_ids[-1]] == 0.0  # a word not yet written is untouched


def test_rule_adapter_decodes_shorter_answers_in_every_generate_call_without_changing_the_model():
    llm, tokenizer = tiny_llm(), tiny_tokenizer()
    before = weights(llm)
    backend = TransformersBackend(llm=llm, tokenizer=tokenizer, batch_size=2)
    questions = [[{"role": "user", "content": q}] for q in ("Hi there.", "Describe the speaker.", "Say hi.")]
    greedy = SamplingSettings(max_new_tokens=24)
    plain = backend.generate(questions, greedy)
    adapter = RuleAdapter(tokenizer, backend.eos_ids, RuleSettings(end_min_tokens=2, end_slope=100.0))
    backend.logits_processor = LogitsProcessorList([adapter])
    ruled = backend.generate(questions, greedy)
    assert all(g.completion_tokens <= 3 and g.finish_reason == "stop" for g in ruled)  # ended once allowed to
    assert all(g.completion_tokens > 3 for g in plain)
    assert backend.generate(questions, greedy) == ruled  # a new call starts new answers: the same again
    assert changed(before, llm) == set()


def test_rule_nll_scores_an_answer_as_the_adapted_model_would_sample_it():
    llm, tokenizer = tiny_llm(), tiny_tokenizer()
    question, answer = "Describe the speaker.", "A man speaks. A man speaks slowly."
    assert rule_nll(llm, tokenizer, None, question, answer) == pytest.approx(answer_nll(llm, tokenizer, question,
                                                                                        answer))
    adapter = RuleAdapter(tokenizer, end_of_turn_ids(tokenizer), RuleSettings(end_min_tokens=2, repeat_penalty=3.0))
    # the generation path: the processor sees prompt + answer so far, one token at a time
    from desta.core.sequences import chat_tokens

    ids, labels = chat_tokens(tokenizer, [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}])
    positions = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]  # the answer and its end of turn
    total = 0.0
    with torch.no_grad():
        for position in positions:
            prefix = torch.tensor([ids[:position]])
            scores = adapter(prefix, llm(input_ids=prefix).logits[:, -1])
            total -= float(torch.log_softmax(scores.float(), -1)[0, ids[position]])
    assert rule_nll(llm, tokenizer, adapter, question, answer) == pytest.approx(total / len(positions), rel=1e-4)
    assert rule_nll(llm, tokenizer, adapter, question, answer) != pytest.approx(answer_nll(llm, tokenizer, question,
                                                                                           answer), rel=1e-3)


# ----- response tuning, replay_kl, on-policy distillation, self-alignment: what each trains on, and what stays -----

def test_response_tuning_trains_on_the_answers_alone(tmp_path):
    llm, tokenizer = tiny_llm(), tiny_tokenizer()
    backend = TransformersBackend(llm=llm, tokenizer=tokenizer)
    rows, examples, _ = strategy_data({"response_tuning"}, backend, settings(), ROWS, [], last_number)
    assert [r["question"] for r in rows] == [r["instruction"] for r in ROWS]
    assert {r["instruction"] for r in rows} == {""}
    text = tokenizer.decode(examples[0]["input_ids"])
    assert "apples" not in text and ROWS[0]["answer"] in text  # the question is nowhere in what it reads
    assert tokenizer.decode([t for t in examples[0]["labels"] if t != IGNORE_INDEX]) == ROWS[0]["answer"] + "<|im_end|>"
    before = weights(llm)
    model, losses, _ = train_model({"response_tuning"}, llm, tokenizer, rows, examples, settings(), last_number,
                                   backend.pad_id, tmp_path / "scratch")
    assert len(changed(before, model)) == len(before)  # every weight trained (full fine-tuning)


def test_replay_kl_adds_the_kl_to_the_frozen_base_on_replay_rows_only(tmp_path):
    llm, tokenizer = tiny_llm(), tiny_tokenizer()
    backend = TransformersBackend(llm=llm, tokenizer=tokenizer)
    config = settings(strategies=["replay_kl"])
    rows, examples, notes = strategy_data({"replay_kl"}, backend, config, ROWS, [], last_number)
    replayed = [r for r in rows if r.get("kl")]
    assert replayed and notes["replay_kl_rows"] >= 1 and all("text" in r for r in replayed)  # BOS texts
    assert [e.get("kl", 0) for e in examples] == [int(bool(r.get("kl"))) for r in rows]
    # the loss: the Trainer's on every row, plus the KL on replay rows; a batch of task rows alone has none
    from desta.core.optim import training_arguments

    base = copy.deepcopy(llm)
    whole = training_arguments(config.optim, str(tmp_path), per_device_train_batch_size=len(examples))
    trainer = kl_trainer_class()(model=llm, args=whole, base=base, weight=5.0,
                                 train_dataset=examples, data_collator=KLCollator(backend.pad_id))
    task_only = KLCollator(backend.pad_id)([{**examples[0], "kl": 0}])
    plain = llm(**{k: v for k, v in task_only.items() if k != "kl_rows"}).loss
    assert float(trainer.compute_loss(llm, dict(task_only))) == pytest.approx(float(plain)) and trainer.kl_log == []
    with_replay = KLCollator(backend.pad_id)([next(e for e in examples if e.get("kl"))])
    trainer.compute_loss(llm, dict(with_replay))
    assert trainer.kl_log == [pytest.approx(0.0, abs=1e-6)]  # the model is still the base: no divergence yet
    before, base_before = weights(llm), weights(base)
    trainer.train()
    assert len(changed(before, llm)) == len(before) and changed(base_before, base) == set()  # it trains; base frozen
    assert len(trainer.kl_log) == 1 + 2 and trainer.kl_log[-1] > 0  # each step's batch holds every row
    _, _, trained = train_model({"replay_kl"}, tiny_llm(), tokenizer, rows, examples, config, last_number,
                                backend.pad_id, tmp_path / "scratch")
    assert trained["replay_kl_first_last"] is not None and not (tmp_path / "scratch").exists()


def test_on_policy_distill_learns_the_gold_answers_and_keeps_the_teacher_frozen(tmp_path, monkeypatch):
    from desta.posttrain.strategies import on_policy_distill

    llm, tokenizer = tiny_llm(), tiny_tokenizer()
    backend = TransformersBackend(llm=llm, tokenizer=tokenizer)
    rows, examples, _ = strategy_data({"on_policy_distill"}, backend, settings(), ROWS, [], last_number)
    teachers = []
    real = on_policy_distill.train_on_policy_distill
    monkeypatch.setattr(on_policy_distill, "train_on_policy_distill",
                        lambda model, teacher, *a, **k: teachers.append((teacher, weights(teacher))) or
                        real(model, teacher, *a, **k))
    before = weights(llm)
    model, _, notes = train_model({"on_policy_distill", "lora"}, llm, tokenizer, rows, examples,
                                  settings(strategies=["on_policy_distill+lora"]), last_number, backend.pad_id,
                                  tmp_path / "scratch")
    assert changed(before, model) == set() and adapters_learnt(model)  # only the adapters learnt
    teacher, teacher_before = teachers[0]
    assert changed(teacher_before, teacher) == set() and not any("lora_" in n for n in teacher_before)
    assert notes["divergence_first_last"][0] == pytest.approx(0.0, abs=1e-6)  # the first samples: student = teacher


def test_self_align_pairs_its_own_best_and_worst_answers_and_dpo_trains_only_the_adapters(tmp_path):
    llm, tokenizer = tiny_llm(), tiny_tokenizer()
    backend = TransformersBackend(llm=llm, tokenizer=tokenizer, batch_size=3)
    scores = self_scores(backend, ["2 + 3?", "2 + 3?"], ["5", "It is 6, I think."])
    assert all(1.0 <= s <= 5.0 for s in scores) and scores[0] != scores[1]
    assert self_scores(TransformersBackend(llm=llm, tokenizer=tokenizer, batch_size=1), ["2 + 3?"], ["5"])[0] == \
        pytest.approx(scores[0], abs=1e-4)  # padding in a batch changes nothing
    pairs, notes = self_align_pairs(backend, ROWS, last_number, k=3, temperature=1.0, min_margin=0.0,
                                    max_new_tokens=6)
    assert notes["pairs"] == len(pairs) > 0 and all(p["chosen_score"] >= p["rejected_score"] for p in pairs)
    assert preference_pairs(ROWS[:1], [["a", "b"]], [[3.0, 3.1]], min_margin=0.5) == []  # too close to prefer
    with pytest.raises(ValueError, match="lower self_align.min_margin"):
        self_align_pairs(backend, ROWS, last_number, k=2, temperature=1.0, min_margin=10.0, max_new_tokens=4)
    config = settings(strategies=["self_align+lora"])
    rows, examples, data_notes = strategy_data({"self_align"}, backend, config, ROWS, [], last_number)
    assert examples == [] and rows and set(rows[0]) >= {"instruction", "chosen", "rejected"}
    assert data_notes["self_align"]["questions"] == len(ROWS)
    before = weights(llm)
    model, _, _ = train_model({"self_align", "lora"}, llm, tokenizer, rows, [], config, last_number,
                              backend.pad_id, tmp_path / "scratch")
    assert changed(before, model) == set() and adapters_learnt(model)  # the adapters learnt, the base did not


# ----- the knowledge split's prediction -----

class ScriptedBackend:
    """Answers a test writes: right for the items in `known`."""

    def __init__(self, known):
        self.known, self.calls, self.tokenizer = known, 0, tiny_tokenizer()

    def generate(self, conversations, settings):
        self.calls += 1
        return [Generation(next((f"It is {r['gold']}." for r in ROWS if r["instruction"] == c[-1]["content"]
                                 and r["gold"] in self.known), "No idea."), "stop", 3) for c in conversations]


def test_knowledge_known_and_unknown_train_on_as_many_items_from_one_cached_split(tmp_path):
    backend = ScriptedBackend(known={"5", "11"})  # 3 + 2 and 9 + 2 are known; 5 + 2 and 7 + 2 never
    config = settings(knowledge={"samples": 1})
    known, _, notes = strategy_data({"knowledge_known"}, backend, config, ROWS, [], last_number, tmp_path)
    asked = backend.calls
    unknown, _, unknown_notes = strategy_data({"knowledge_unknown"}, backend, config, ROWS, [], last_number, tmp_path)
    assert backend.calls == asked  # the split came from the cache
    assert [r["gold"] for r in known] == ["5", "11"] and [r["gold"] for r in unknown] == ["7", "9"]
    assert notes["knowledge"]["split"] == {"HighlyKnown": 2, "MaybeKnown": 0, "WeaklyKnown": 0, "Unknown": 2}
    assert unknown_notes["knowledge"]["items"] == 2 and len(unknown_notes["knowledge"]["rows"]) == 4
    with pytest.raises(ValueError, match="needs both HighlyKnown/MaybeKnown and Unknown items"):
        strategy_data({"knowledge_known"}, ScriptedBackend(known=set()), config, ROWS, [], last_number)


def test_the_knowledge_table_puts_known_and_unknown_training_side_by_side_with_their_difference():
    from desta.posttrain.report import delta_stats, head_to_head, knowledge_lines

    base = {"task_accuracy": [0.0] * 20, "format_following": [1.0] * 10, "own_answer_loglik": [-1.0] * 4,
            "heldout_loglik": [-3.0]}
    known = {**base, "task_accuracy": [1.0] * 12 + [0.0] * 8}
    unknown = {**base, "task_accuracy": [1.0] * 4 + [0.0] * 16}
    results = [{"name": name, "seed": 0, "scores": scores,
                "metrics": {"task_accuracy": sum(scores["task_accuracy"]) / 20}}
               for name, scores in (("knowledge_known", known), ("knowledge_unknown", unknown))]
    pairs = head_to_head(results, [["knowledge_known", "knowledge_unknown"], ["knowledge_known", "sft"]], 0)
    assert len(pairs) == 1 and pairs[0]["deltas"]["task_accuracy"]["value"] == pytest.approx(-0.4)  # sft: no run
    strategies = [{"strategy": r["name"], "metrics": r["metrics"], "deltas": delta_stats(base, [r["scores"]]),
                   "notes": {"knowledge": {"items": 24}}} for r in results]
    table = "\n".join(knowledge_lines({"strategies": strategies, "head_to_head": pairs}))
    assert "| HighlyKnown + MaybeKnown | 24 | 0.600 | **+0.60" in table and "| Unknown | 24 | 0.200 |" in table
    assert "| Unknown minus known | | | **-0.40" in table  # outside its interval: bold


# ----- the comparison, end to end -----

def test_posttrain_compares_the_new_strategies_head_to_head(tmp_path):
    _, llm_dir = save_tiny_bases(tmp_path / "bases")
    out = tmp_path / "run"
    strategies = ["sft", "response_tuning", "rule_adapter", "replay_kl", "self_align", "on_policy_distill"]
    config = build(PostTrainConfig, {
        "model": str(llm_dir), "output_dir": str(out), "task": {"train_size": 6, "eval_size": 4},
        "retention": {"format_size": 4, "own_answer_size": 3, "refusal_size": 0, "own_answer_max_new_tokens": 4},
        "eval_max_new_tokens": 4, "probe_max_new_tokens": 4, "answer_max_new_tokens": 4,
        "replay_kl": {"source": "bos"}, "bos_replay": {"count": 8, "max_new_tokens": 24}, "replay": {"ratio": 0.3},
        "self_align": {"k": 2, "min_margin": 0.0}, "on_policy_distill": {"distill": {"max_completion_length": 4}},
        "save_models": False, "save_models_of": ["sft"], "strategies": strategies,
        "head_to_head": [[s, t] for s, t in (("sft", "response_tuning"), ("sft", "rule_adapter"),
                                             ("sft", "on_policy_distill"))]})
    config.optim.max_steps, config.optim.batch_size = 2, 2
    comparison = posttrain(config, log=lambda *a: None)
    runs = {r["name"]: r for r in comparison["runs"]}
    assert list(runs) == strategies and runs["rule_adapter"]["train_rows"] == 0
    assert runs["rule_adapter"]["train_loss_first"] is None  # nothing trained
    assert (out / "sft" / "seed-42" / "model").is_dir() and not (out / "rule_adapter" / "seed-42" / "model").exists()
    assert [(p["first"], p["second"]) for p in comparison["head_to_head"]][0] == ("sft", "response_tuning")
    table = (out / "comparison.md").read_text()
    assert "| sft | response_tuning |" in table and "| base + rules (rule_adapter) |" in table
    data = [json.loads(line) for line in (out / "response_tuning" / "seed-42" / "train_data.jsonl").read_text()
            .splitlines()]
    assert {row["instruction"] for row in data} == {""}


def test_a_base_model_without_a_chat_template_takes_one_from_the_config(tmp_path):
    from desta.model.tiny import CHAT_TEMPLATE
    from desta.posttrain.run import load_model

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tiny_llm().save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="has no chat template"):
        load_model(PostTrainConfig(model=str(tmp_path / "base")))
    llm, loaded = load_model(PostTrainConfig(model=str(tmp_path / "base"), chat_template=CHAT_TEMPLATE))
    backend = TransformersBackend(llm=llm, tokenizer=loaded)
    assert backend.tokenizer.decode(backend.encode([{"role": "user", "content": "Hi"}])) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_posttrain_config_refuses_mixed_trainers_and_unknown_trl_settings():
    with pytest.raises(ConfigError) as err:
        build(PostTrainConfig, {"model": "m", "strategies": ["self_align+replay", "on_policy_distill"],
                                "self_align": {"dpo": {"betaa": 0.1}}, "on_policy_distill": {"distill": {"seed": 3}},
                                "head_to_head": [["sft", "self_align"]], "save_models_of": ["rl"]})
    problems = "\n".join(err.value.problems)
    assert "['self_align+replay']: self_align trains with a trainer of its own" in problems
    assert "DPOConfig has no setting 'betaa'; did you mean 'beta'?" in problems
    assert "seed is set by desta" in problems and "[['sft', 'self_align']]: each pair is two names" in problems
    assert "save_models_of: ['rl'] are not in strategies" in problems
    with pytest.raises(ConfigError, match="rule_adapter.end_min_tokens: .*repeat_penalty must be 0 or more"):
        build(PostTrainConfig, {"model": "m", "rule_adapter": {"repeat_penalty": -1}})


# ----- token shift -----

def test_token_shift_is_zero_against_itself_and_finds_the_tokens_fine_tuning_changed(tmp_path, capsys):
    _, base_dir = save_tiny_bases(tmp_path / "bases")
    tokenizer = tiny_tokenizer()
    aligned = tiny_llm()  # the "aligned" version: the same model trained to open every answer with "A man speaks"
    example = encode(tokenizer, {"instruction": "Describe the speaker.", "answer": "A man speaks slowly."}, "sft", 64)
    optimizer = torch.optim.AdamW(aligned.parameters(), lr=3e-2)
    aligned.train()
    for _ in range(30):
        loss = aligned(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    aligned.save_pretrained(tmp_path / "aligned")
    tokenizer.save_pretrained(tmp_path / "aligned")

    same = token_shift(TokenShiftConfig(base=str(base_dir), aligned=str(base_dir), out=str(tmp_path / "same"), count=6,
                                        max_new_tokens=8, batch_size=4))
    assert same["shares"]["positions"] > 0 and same["shares"]["changed"] == 0.0 and same["tokens"] == []
    assert main(["token-shift", str(base_dir), str(tmp_path / "aligned"), f"out={tmp_path / 'tuned'}", "count=6",
                 "max_new_tokens=8"]) == 0
    report = json.loads((tmp_path / "tuned" / "token_shift.json").read_text())
    assert report["shares"]["changed"] > 0 and report["tokens"][0]["changed"] >= 1
    assert report["by_position"][0]["group"] == "1" and report["by_position"][0]["changed"] == 1.0  # "A" is new
    assert "Token shift" in capsys.readouterr().out and (tmp_path / "tuned" / "token_shift.png").stat().st_size > 5000
    # the same command again keeps the finished report; other settings are refused without overwrite
    kept = token_shift(TokenShiftConfig(base=str(base_dir), aligned=str(tmp_path / "aligned"),
                                        out=str(tmp_path / "tuned"), count=6, max_new_tokens=8))
    assert kept == report
    with pytest.raises(ValueError, match=r"other settings \(count\)"):
        token_shift(TokenShiftConfig(base=str(base_dir), aligned=str(tmp_path / "aligned"),
                                     out=str(tmp_path / "tuned"), count=5, max_new_tokens=8))
    other = tmp_path / "other-family"
    tiny_llm().save_pretrained(other)
    tiny_tokenizer(vocab_size=300).save_pretrained(other)  # another vocabulary
    with pytest.raises(ValueError, match="tokenizers differ"):
        token_shift(TokenShiftConfig(base=str(other), aligned=str(base_dir), out=str(tmp_path / "x"), count=2))
