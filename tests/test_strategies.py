"""What a post-training strategy is: one module and one registry line; and each strategy's data and trainer, pinned:
the rows and tokenised examples its data step makes on a small task, and the trainer it picks, for a fixed config and
seed."""

import importlib
import re
from pathlib import Path

import pytest

from desta.core.args import build, field_docs, setting_docs
from desta.core.digests import fingerprint
from desta.core.generation import SamplingSettings, TransformersBackend
from desta.model.tiny import tiny_llm, tiny_tokenizer
from desta.posttrain import PostTrainConfig
from desta.posttrain.data import strategy_data
from desta.posttrain.strategies import STRATEGIES, depends
from desta.posttrain.strategies.base import STAGES
from desta.posttrain.tasks import arithmetic_task
from desta.posttrain.training import train_model
from desta.posttrain.verifiers import last_number

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"model": "in-memory", "answer_max_new_tokens": 6, "eval_max_new_tokens": 6, "max_length": 64,
            "optim": {"lr": 1e-3, "max_steps": 2, "batch_size": 4, "warmup_steps": 0, "seed": 0},
            "replay": {"ratio": 0.25},
            "lora": {"lr": 1e-2, "peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}},
            "magpie": {"count": 32, "max_new_tokens": 32}, "bos_replay": {"count": 8, "max_new_tokens": 16},
            "self_output": {"k": 2}, "token_filter": {"threshold": 0.01},
            "knowledge": {"samples": 2, "drop": ["Unknown"]},
            "self_align": {"k": 2, "min_margin": 0.0, "lr": 3e-3}, "replay_kl": {"source": "bos", "weight": 2.0},
            "on_policy_distill": {"distill": {"max_completion_length": 6}, "weight": 0.5},
            "rl": {"grpo": {"num_generations": 4, "max_completion_length": 6}}}
# The data each strategy trains on: a digest of its rows, tokenised examples and notes (and the row count).
DATA = {
    'sft': ('501d0e8314e85366b22c12e4', 6),
    'lora': ('501d0e8314e85366b22c12e4', 6),
    'replay': ('af388fe2a8e621dc24ae774f', 8),
    'magpie': ('507f570fbde4599f011d29f0', 8),
    'bos_replay': ('cfabdecf2b483fd7d9a8164e', 8),
    'self_output': ('646a517ca13ee04d49fa89ed', 6),
    'paraphrase': ('9613d74081f73fc6aeba165f', 6),
    'self_distill': ('e90290f9b170e5ac0a07da77', 6),
    'token_filter': ('a220f6417877d547444b24ec', 6),
    'knowledge_filter': ('c871c5f4257abea560ad6269', 1),
    'rl': ('501d0e8314e85366b22c12e4', 6),
    'response_tuning': ('74e7cf3a9a55b7bf54ab88ce', 6),
    'rule_adapter': ('501d0e8314e85366b22c12e4', 6),
    'self_align': ('f1391bb2e09d562e22b93f25', 6),
    'replay_kl': ('a2589024e7fe47ac60bbcd43', 8),
    'on_policy_distill': ('501d0e8314e85366b22c12e4', 6),
    'knowledge_known': ('8edfd103519fa3d43ab13e52', 1),
    'knowledge_unknown': ('a91f062151a1318b76d07262', 1),
    'lora+replay': ('af388fe2a8e621dc24ae774f', 8),
    'bos_replay+replay': ('60f4cac3d1ba624e5540df21', 11),
    'self_output+paraphrase': ('1ef1031339da7e152133031f', 6),
    'knowledge_filter+self_distill': ('620c90a905a933268631815e', 1),
    'replay+replay_kl': ('818cfeecf3301d34751f2f77', 11),
}
# The trainer each strategy picks: which, whether LoRA wraps the model, its learning rate, whether it gets the
# frozen base model.
TRAINERS = {
    'sft': ('sft', False, 0.001, False, None),
    'lora': ('sft', True, 0.01, False, None),
    'replay': ('sft', False, 0.001, False, None),
    'magpie': ('sft', False, 0.001, False, None),
    'bos_replay': ('sft', False, 0.001, False, None),
    'self_output': ('sft', False, 0.001, False, None),
    'paraphrase': ('sft', False, 0.001, False, None),
    'self_distill': ('sft', False, 0.001, False, None),
    'token_filter': ('sft', False, 0.001, False, None),
    'knowledge_filter': ('sft', False, 0.001, False, None),
    'rl': ('grpo', False, 0.001, False, [{'num_generations': 4, 'max_completion_length': 6}]),
    'response_tuning': ('sft', False, 0.001, False, None),
    'rule_adapter': ('none', False, None, False, None),
    'self_align': ('dpo', False, 0.003, False, [{'beta': 0.1}]),
    'replay_kl': ('kl', False, 0.001, True, 2.0),
    'on_policy_distill': ('distill', False, 0.001, True, [{'max_completion_length': 6}, 0.5]),
    'knowledge_known': ('sft', False, 0.001, False, None),
    'knowledge_unknown': ('sft', False, 0.001, False, None),
    'knowledge_filter+rl+lora': ('grpo', True, 0.01, False, [{'num_generations': 4, 'max_completion_length': 6}]),
    'self_align+lora': ('dpo', True, 0.003, False, [{'beta': 0.1}]),
    'on_policy_distill+lora': ('distill', True, 0.01, True, [{'max_completion_length': 6}, 0.5]),
    'lora+replay_kl': ('kl', True, 0.01, True, 2.0),
    'rule_adapter+sft': ('sft', False, 0.001, False, None),
    'lora+rule_adapter': ('sft', True, 0.01, False, None),
    'lora+replay': ('sft', True, 0.01, False, None),
}


def test_a_new_strategy_is_one_module_and_one_registry_line():
    """What a strategy needs: a module desta/posttrain/strategies/<name>.py whose STRATEGY record is named after it and
    listed in the registry (desta/posttrain/strategies/__init__.py); a one-line summary; a data transform and the
    stage it runs at, or neither; its settings, if it has any, as a dataclass with every field documented, which the
    config then holds under <name> with no line of its own; only settings and strategies that exist named in what it
    reads and combines with; and a row in docs/posttrain.md or docs/alignment.md."""
    folder = ROOT / "desta" / "posttrain" / "strategies"
    assert sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "base")) == sorted(STRATEGIES)
    config, settings = PostTrainConfig(model="m"), set(setting_docs(PostTrainConfig))
    docs = (ROOT / "docs" / "posttrain.md").read_text() + (ROOT / "docs" / "alignment.md").read_text()
    documented = " ".join(line.split("|")[1] for line in docs.splitlines() if line.startswith("| `"))  # first cells
    for name, record in STRATEGIES.items():
        assert importlib.import_module(f"desta.posttrain.strategies.{name}").STRATEGY is record and record.name == name
        assert record.summary and (record.data is None) == (record.stage is None) and record.stage in (*STAGES, None)
        if record.section is not None:
            assert isinstance(getattr(config, name), record.section)
            assert set(field_docs(record.section)) == set(record.section.__dataclass_fields__), name
        assert depends(record) <= settings and set(record.combines or ()) <= set(STRATEGIES), name
        assert f"`{name}`" in documented, name


@pytest.fixture(scope="module")
def task():
    """Six arithmetic questions the tiny base model half knows: the gold of each even one is the last number of the
    model's own greedy answer (what the knowledge split calls HighlyKnown), of each odd one a number it never says."""
    backend = TransformersBackend(llm=tiny_llm(1), tokenizer=tiny_tokenizer(), batch_size=16)
    rows = arithmetic_task(6, seed=0)
    answers = backend.generate([[{"role": "user", "content": r["instruction"]}] for r in rows],
                               SamplingSettings(max_new_tokens=6))
    golds = [(re.findall(r"\d+", a.text) or ["77777"])[-1] if i % 2 == 0 else "77777" for i, a in enumerate(answers)]
    return [{**row, "gold": gold} for row, gold in zip(rows, golds, strict=True)]


def config_for(name: str) -> PostTrainConfig:
    return build(PostTrainConfig, {**SETTINGS, "strategies": [name]})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Where knowledge_known and knowledge_unknown keep the knowledge split they share, as in a posttrain run."""
    return tmp_path_factory.mktemp("base")


@pytest.mark.parametrize("name", sorted(DATA))
def test_each_strategy_makes_the_data_it_made_before(name, task, cache):
    backend = TransformersBackend(llm=tiny_llm(1), tokenizer=tiny_tokenizer(), batch_size=16)
    replay = [{"instruction": f"Name a colour, {n}.", "answer": f"Blue, {n}."} for n in ("Ana", "Ben")]
    rows, examples, notes = strategy_data(set(name.split("+")), backend, config_for(name), task, replay, last_number,
                                          cache)
    assert (fingerprint({"rows": rows, "examples": examples, "notes": notes}), len(rows)) == DATA[name]


class Chosen(Exception):
    """Raised by a stand-in trainer: which trainer a strategy picked, and with what."""


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_each_strategy_picks_the_trainer_it_picked_before(name, monkeypatch, tmp_path):
    import transformers

    from desta.posttrain.strategies import on_policy_distill, replay_kl, rl, self_align

    def stand_in(label: str, lr_at: int | None = None, settings_at: tuple[int, ...] = ()):
        """A trainer that raises Chosen((label, LoRA-wrapped, learning rate, given the frozen base, settings))."""
        def chosen(*args, **kwargs):
            model = kwargs.get("model", args[0] if args else None)
            lr = args[lr_at] if lr_at is not None else kwargs["args"].learning_rate
            base = kwargs.get("base") is not None or (label == "distill" and args[1] is not None)
            settings = [args[i] for i in settings_at] or kwargs.get("weight")
            raise Chosen((label, hasattr(model, "peft_config"), lr, base, settings))
        return chosen

    monkeypatch.setattr(rl, "train_grpo", stand_in("grpo", 5, (6,)))
    monkeypatch.setattr(self_align, "train_dpo", stand_in("dpo", 4, (5,)))
    monkeypatch.setattr(on_policy_distill, "train_on_policy_distill", stand_in("distill", 6, (7, 8)))
    monkeypatch.setattr(replay_kl, "kl_trainer_class", lambda: stand_in("kl"))
    monkeypatch.setattr(transformers, "Trainer", stand_in("sft"))
    try:
        model, losses, notes = train_model(set(name.split("+")), tiny_llm(1), tiny_tokenizer(), [], [],
                                           config_for(name), last_number, 0, tmp_path / "scratch")
        picked = ("none", hasattr(model, "peft_config"), None, False, None)
    except Chosen as chosen:
        picked = chosen.args[0]
    assert picked == TRAINERS[name]
