from pathlib import Path

import pytest

from desta.core.args import load_config
from desta.posttrain import STRATEGIES, PostTrainConfig
from desta.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
POSTTRAIN_RECIPES = ("forgetting", "alignment")  # desta posttrain configs, not desta train ones
RECIPES = sorted(p.parent.name for p in ROOT.glob("recipes/*/config.yaml") if p.parent.name not in POSTTRAIN_RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_its_readme_shows_how_to_run_it(name):
    load_config(TrainConfig, ROOT / "recipes" / name / "config.yaml")  # every setting checked
    assert f"recipes/{name}/config.yaml" in (ROOT / "recipes" / name / "config.yaml").read_text().split("\n\n")[0]


def test_paper_recipes_match_the_papers():
    desta2 = load_config(TrainConfig, ROOT / "recipes" / "desta2" / "config.yaml")
    desta25 = load_config(TrainConfig, ROOT / "recipes" / "desta25" / "config.yaml")
    assert (desta2.model.encoder, desta2.model.qformer_layers, desta2.optim.warmup_steps) == (
        "openai/whisper-small", 2, 2000)
    assert (desta25.model.encoder, desta25.model.qformer_layers, desta25.optim.warmup_steps) == (
        "openai/whisper-large-v3", 6, 5000)
    assert desta2.optim.lr == desta25.optim.lr == 1e-4 and desta25.optim.batch_size == 12


def test_forgetting_recipe_compares_every_strategy_with_seeds_and_the_replay_sweep():
    from desta.posttrain.run import plan_runs

    config = load_config(PostTrainConfig, ROOT / "recipes" / "forgetting" / "config.yaml",
                         ["model=HuggingFaceTB/SmolLM2-135M-Instruct"])
    alignment = load_config(PostTrainConfig, ROOT / "recipes" / "alignment" / "config.yaml",
                            ["model=HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert set(config.strategies) | set(alignment.strategies) == set(STRATEGIES)  # the two recipes cover them all
    assert min(config.task.train_size, config.task.eval_size, config.retention.format_size,
               config.retention.own_answer_size) >= 200
    runs, sweep = plan_runs(config)
    assert [r.seed for r in runs if r.name == "sft"] == [0, 1, 2] and len(runs) == 20
    assert [ratio for ratio, _ in sweep] == [0, 0.01, 0.03, 0.05, 0.1]


def test_alignment_recipe_measures_every_new_strategy_beside_sft_on_the_forgetting_items():
    from desta.core.args import to_dict
    from desta.posttrain.run import plan_runs

    forgetting, alignment = (load_config(PostTrainConfig, ROOT / "recipes" / name / "config.yaml",
                                         ["model=HuggingFaceTB/SmolLM2-135M-Instruct"])
                             for name in ("forgetting", "alignment"))
    new = set(alignment.strategies) - set(forgetting.strategies) - {"magpie", "sft"}
    assert new == {"response_tuning", "rule_adapter", "self_align", "replay_kl", "on_policy_distill",
                   "knowledge_known", "knowledge_unknown"}
    paired = {s for pair in alignment.head_to_head for s in pair}
    assert new <= paired and ["magpie", "replay_kl"] in alignment.head_to_head
    same = ("task", "retention", "optim", "eval_max_new_tokens", "probe_max_new_tokens", "generation_batch_size")
    assert {k: to_dict(alignment)[k] for k in same} == {k: to_dict(forgetting)[k] for k in same}  # the same items
    runs, _ = plan_runs(alignment)
    assert [r.seed for r in runs if r.name == "sft"] == [0, 1, 2] and len(runs) == 13
    assert set(alignment.save_models_of) == {"sft", "self_align"}  # what run.sh's token-shift step reads


def test_scale_diagnosis_probe_reads_what_the_features_carry_and_nothing_else():
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("diagnose", ROOT / "recipes/experiments/scale/diagnose.py")
    diagnose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnose)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=150)
    carried = rng.normal(size=(150, 8)) + 3 * np.eye(3, 8)[y]  # the label shifts three of the features
    assert diagnose.probe_accuracy(carried, y, folds=5, seed=0).mean() > 0.9
    unrelated = rng.normal(size=(150, 8))
    assert diagnose.probe_accuracy(unrelated, y, folds=5, seed=0).mean() < 0.55  # chance is 1/3


def _script(path: str):  # noqa: ANN202 - a recipe script loaded as a module
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hearing_labels_scores_every_checkpoint_on_unseen_and_training_voices_and_resumes(tmp_path, checkpoint,
                                                                                         monkeypatch):
    import json
    import shutil
    import sys

    from datasets import load_from_disk

    from tests.conftest import described_dataset

    labels = _script("recipes/experiments/hearing/labels.py")
    clips = described_dataset(tmp_path / "clips", num_clips=8, seed=3)
    voices = load_from_disk(str(clips))["voice"]
    train = tmp_path / "train"
    load_from_disk(str(clips)).filter(lambda r: r["voice"] == voices[0]).save_to_disk(str(train))
    run = tmp_path / "run"  # a desta train output folder: a checkpoint at step 5, the finished model at 10
    shutil.copytree(checkpoint, run)
    shutil.copytree(checkpoint, run / "checkpoint-5")
    (run / "summary.json").write_text(json.dumps({"steps": 10}))
    out = tmp_path / "out"
    argv = ["labels.py", f"mine={run}", "--clips", str(clips), "--train", str(train), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    labels.main()
    found = json.loads((out / "labels.json").read_text())["mine"]
    assert sorted(found, key=int) == ["5", "10"]  # each checkpoint, the finished model last
    unseen = sum(v != voices[0] for v in voices)
    for line in found.values():
        assert line["unseen voices"]["gender"]["n"] == unseen
        assert line["training voices"]["gender"]["n"] == len(voices) - unseen
        assert line["unseen voices"]["gender"]["chance"] == 0.5
        assert all(0 <= cell["accuracy"] <= 1 for clip_set in line.values() for cell in clip_set.values())
    assert (out / "labels.png").is_file()
    assert f"| mine | 10 | unseen voices ({unseen}) |" in (out / "labels.md").read_text()
    (run / "model.safetensors").write_bytes(b"not a model")  # scored checkpoints are not loaded again
    labels.main()
    monkeypatch.setattr(sys, "argv", ["labels.py", str(run), "--clips", str(clips), "--train", str(train)])
    with pytest.raises(SystemExit, match="NAME=FOLDER"):
        labels.main()
    assert [step for step, _ in labels.checkpoints(run, every=2)] == [10]  # the finished model always
    (run / "summary.json").unlink()
    assert [step for step, _ in labels.checkpoints(run, every=2)] == [5]  # still training: its newest checkpoint
    with pytest.raises(SystemExit, match="none of its 8 clips is of a voice .* never uses"):
        labels.clip_sets(str(clips), str(clips))
    load_from_disk(str(clips)).remove_columns("voice").save_to_disk(str(tmp_path / "no-voice"))
    with pytest.raises(SystemExit, match="no voice column"):
        labels.clip_sets(str(tmp_path / "no-voice"), str(train))
    with pytest.raises(SystemExit, match="no checkpoint"):
        labels.checkpoints(tmp_path / "clips")
