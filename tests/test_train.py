import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from desta.core.args import ConfigError, load_config
from desta.core.replay import replay_count
from desta.train.config import ModelSection, TrainConfig
from desta.train.run import train, write_tiny_bases
from tests.conftest import StopAfter, described_dataset, label_targets

BASE = ["optim.warmup_steps=2", "optim.batch_size=4", "optim.lr=3e-3", "log.logging_steps=1", "log.report_to=none",
        "data.eval_fraction=0"]


@pytest.fixture(scope="module")
def targets_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-data")
    return label_targets(described_dataset(folder, num_clips=16, seed=4), folder / "targets")


def _config(targets_dir, out, *overrides):
    return load_config(TrainConfig, None, [f"output_dir={out}", f"data.train={targets_dir}", *BASE, *overrides])


def _losses(out):
    history = json.loads((out / "log_history.json").read_text())
    return {r["step"]: r["loss"] for r in history if "loss" in r}


class Snapshot(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.model = model


def test_loss_falls_and_only_the_connector_changes(targets_dir, tmp_path):
    snapshot = Snapshot()
    summary = train(_config(targets_dir, tmp_path / "run", "optim.max_steps=40", "data.eval_fraction=0.25",
                            "log.eval_steps=20", "log.save_steps=100"), callbacks=[snapshot])
    assert summary["last_train_loss"] < summary["first_train_loss"] - 0.05
    assert summary["eval_losses"][-1][1] < summary["eval_losses"][0][1]
    for name, param in snapshot.model.named_parameters():
        assert torch.equal(param, snapshot.before[name]) != name.startswith("connector."), name
    files = set(os.listdir(tmp_path / "run"))
    assert {"model.safetensors", "config.json", "desta_processor.json", "run_config.yaml", "loss_curve.png",
            "summary.json"} <= files and "training_args.bin" not in files
    assert summary["trainable_parameters"] < summary["total_parameters"] and summary["samples_per_second"] > 0


def test_resume_reproduces_the_uninterrupted_loss_curve(targets_dir, tmp_path):
    steps = ["optim.max_steps=12", "log.save_steps=6", "data.eval_fraction=0.25", "log.eval_steps=6"]
    full_summary = train(_config(targets_dir, tmp_path / "full", *steps))
    train(_config(targets_dir, tmp_path / "cut", *steps), callbacks=[StopAfter(6)])
    assert max(_losses(tmp_path / "cut")) == 6
    summary = train(_config(targets_dir, tmp_path / "cut", *steps))
    assert summary["resumed_from"].endswith("checkpoint-6")
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(resumed) == list(range(1, 13))  # steps 1-6 come back from the checkpoint's trainer state
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    # the held-out loss at the checkpoint's step is not measured again on resuming: one point a step, as uncut
    assert [s for s, _ in summary["eval_losses"]] == [s for s, _ in full_summary["eval_losses"]] == [0, 6, 12]


def test_cached_features_give_the_on_the_fly_loss(targets_dir, tmp_path):
    from desta.train.data import DestaCollator, DestaDataset, load_targets, speech_examples
    from desta.train.features import FeatureCache, cache_features
    from desta.train.run import build_model

    model, processor = build_model(ModelSection(), tmp_path)
    model.eval()
    dataset = load_targets(str(targets_dir), "train")
    cache_features(model, processor, dataset, tmp_path / "cache", dtype="float32", clips_per_shard=5, progress=False)
    examples = speech_examples(dataset, processor)[:6]
    collate = DestaCollator(processor, 1024)
    live = collate([DestaDataset(examples)[i] for i in range(6)])
    cached = collate([DestaDataset(examples, FeatureCache(tmp_path / "cache", model))[i] for i in range(6)])
    assert "input_features" in live and "audio_hidden_states" in cached
    assert torch.equal(live["input_ids"], cached["input_ids"])
    with torch.no_grad():
        live_loss = model(**{k: v for k, v in live.items() if k != "sample_ids"}).loss
        cached_loss = model(**{k: v for k, v in cached.items() if k != "sample_ids"}).loss
    torch.testing.assert_close(cached_loss, live_loss, atol=1e-5, rtol=1e-5)
    # same output folder, so the same tiny base checkpoints: the cache's encoder matches
    summary = train(_config(targets_dir, tmp_path, "optim.max_steps=4",
                            f"data.feature_cache={tmp_path / 'cache'}", "data.cache_dtype=float32"))
    assert summary["steps"] == 4


def test_only_the_main_process_writes_the_run_files_and_the_curve_names_its_loss(targets_dir, tmp_path, monkeypatch):
    from PIL import Image
    from transformers import TrainingArguments

    from desta.core.artifacts import LOG_HISTORY, LOSS_CURVE, SUMMARY
    from desta.train.losses import LOSSES
    from desta.train.run import fit, save, setup

    run = setup(_config(targets_dir, tmp_path / "main", "optim.max_steps=1", "optim.loss=kl", "log.save_steps=100"))
    summary = save(run, fit(run))
    assert summary["loss"] == json.loads((tmp_path / "main" / SUMMARY).read_text())["loss"] == "kl"
    assert Image.open(tmp_path / "main" / LOSS_CURVE).text["Title"] == f"desta train: {LOSSES['kl'].axis}"
    other = setup(_config(targets_dir, tmp_path / "other", "optim.max_steps=1", "log.save_steps=100"))
    metrics = fit(other)
    monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self: 1))  # as on the second process
    summary = save(other, metrics)
    assert summary["steps"] == 1 and summary["first_train_loss"] > 0  # the summary comes back on every process
    written = {path.name for path in (tmp_path / "other").iterdir()}
    assert not written & {SUMMARY, LOG_HISTORY, LOSS_CURVE, "model.safetensors"}, written


def test_start_up_reads_rows_lazily_and_counts_their_tokens_once(targets_dir, tmp_path, monkeypatch):
    from desta.model.processing import DestaProcessor
    from desta.train.data import ExampleTable, token_count
    from desta.train.run import setup

    renders = []
    render = DestaProcessor.render
    monkeypatch.setattr(DestaProcessor, "render", lambda self, *args, **kwargs: renders.append(1) or render(
        self, *args, **kwargs))  # every tokenization of a row renders its conversation first
    settings = ["data.eval_fraction=0.25", "data.max_length=300", "data.num_workers=2"]
    first = setup(_config(targets_dir, tmp_path, *settings))
    examples = first.trainer.train_dataset.examples
    assert isinstance(examples, ExampleTable)  # rows stay in the Arrow table until a batch reads them
    assert first.trainer.args.dataloader_persistent_workers  # workers are not forked again each epoch
    dropped = first.counts["over_max_length"]["train"]
    assert dropped > 0 and len(examples) == 12 - dropped  # 16 clips, 4 held out
    assert all(token_count(first.processor, example) <= 300 for example in examples)
    assert len(renders) >= 16
    renders.clear()
    second = setup(_config(targets_dir, tmp_path, *settings))  # a restart, or a second process of the same run
    assert renders == []  # the counts are read back, not computed again
    assert [e.id for e in second.trainer.train_dataset.examples] == [e.id for e in examples]


def test_text_only_rows_mix_in_at_the_ratio(targets_dir, tmp_path):
    assert replay_count(970, 0.03) == 30 and replay_count(100, 0.0) == 0
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps({"instruction": f"What is {i}+{i}?", "response": str(2 * i)}) + "\n"
                              for i in range(10)))
    summary = train(_config(targets_dir, tmp_path / "run", "optim.max_steps=3", f"data.text_replay={replay}",
                            "data.text_ratio=0.2"))
    assert summary["replay_rows"] == 4 and summary["train_rows"] == 20  # 16 speech rows + 4 = 20 %


def test_nan_loss_stops_with_step_and_samples(targets_dir, tmp_path):
    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.connector.proj.weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3; samples in the batch: \['synth-4-"):
        train(_config(targets_dir, tmp_path / "run", "optim.max_steps=5"), callbacks=[Poison()])


def test_config_errors_are_clear(targets_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rate'; did you mean 'optim.lr'\?"):
        load_config(TrainConfig, None, ["optim.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"optim.batch_size: expected int, got 'big'"):
        load_config(TrainConfig, None, ["optim.batch_size=big"])
    with pytest.raises(ConfigError, match="data.train: required"):
        load_config(TrainConfig, None, [f"output_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="train dataset .*nothing' not found"):
        train(load_config(TrainConfig, None, [f"output_dir={tmp_path}", f"data.train={tmp_path / 'nothing'}"]))
    from datasets import Dataset

    Dataset.from_dict({"id": ["a"], "text": ["b"]}).save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(ValueError, match=r"lacks columns \['audio', 'prompt', 'response'\]"):
        train(_config(tmp_path / "wrong", tmp_path / "run"))


def test_tiny_bases_appear_whole_or_not_at_all(tmp_path, monkeypatch):
    """torchrun's ranks write the tiny bases at once: a rank finding another's in place keeps them, and a write that
    fails half-way leaves nothing another rank could read."""
    bases = tmp_path / "run" / "bases"
    write_tiny_bases(bases)
    config = (bases / "tiny-whisper" / "config.json").read_text()
    (bases / "tiny-llm" / "marker").write_text("first")
    write_tiny_bases(bases)  # a second rank, after the first
    assert (bases / "tiny-llm" / "marker").read_text() == "first"
    assert json.loads(config) and [p.name for p in bases.parent.iterdir()] == ["bases"]  # no partial folder left

    import desta.model.tiny

    def half_way(folder):
        (folder / "tiny-whisper").mkdir(parents=True)
        (folder / "tiny-whisper" / "config.json").write_text("{")
        raise RuntimeError("disk gone")

    monkeypatch.setattr(desta.model.tiny, "save_tiny_bases", half_way)
    with pytest.raises(RuntimeError, match="disk gone"):
        write_tiny_bases(tmp_path / "other" / "bases")
    assert list((tmp_path / "other").iterdir()) == []


def test_two_process_cpu_run(targets_dir, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "desta.cli", "train", f"output_dir={out}", f"data.train={targets_dir}", "optim.max_steps=4",
               "log.save_steps=2", *BASE]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    assert names and all(name.startswith("connector.") for name in names)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    from desta.train.checkpoints import checkpoint_problem

    assert checkpoint_problem(out / "checkpoint-2") is None  # both processes' files were written before hashing
    assert "rng_state_1.pth" in json.loads((out / "checkpoint-2" / "checksums.json").read_text())


def test_kl_loss_is_zero_when_the_student_matches_the_teacher():
    from desta.core.sequences import IGNORE_INDEX
    from desta.train.losses import response_kl

    torch.manual_seed(0)
    vocab = 11
    teacher_logits = torch.randn(1, 7, vocab)
    teacher_labels = torch.full((1, 7), IGNORE_INDEX)
    teacher_labels[0, 4:7] = torch.tensor([3, 5, 2])  # a 3-token response after a 4-token prompt
    student_logits = torch.randn(1, 12, vocab)  # a longer prompt: audio positions and a transcript
    labels = torch.full((1, 12), IGNORE_INDEX)
    labels[0, 9:12] = torch.tensor([3, 5, 2])
    student_logits[0, 8:11] = teacher_logits[0, 3:6]  # the positions that predict each response token

    def kl():  # the positions labelled_logits keeps: those whose next label is not -100
        return response_kl(student_logits[:, :-1][labels[:, 1:] != IGNORE_INDEX],
                           teacher_logits[:, :-1][teacher_labels[:, 1:] != IGNORE_INDEX])

    assert kl().shape == (3,) and kl().abs().max().item() == pytest.approx(0, abs=1e-6)
    student_logits[0, 9] += torch.randn(vocab)
    assert kl()[1].item() > 0.01 and kl()[0].item() == pytest.approx(0, abs=1e-6)
    labels[0, 8] = 7  # one more response token than the teacher's
    with pytest.raises(ValueError, match="4 response positions but the teacher's 3"):
        kl()


def test_kl_training_distills_from_the_text_llm(targets_dir, tmp_path):
    snapshot = Snapshot()
    summary = train(_config(targets_dir, tmp_path / "kl", "optim.max_steps=6", "optim.loss=kl"), callbacks=[snapshot])
    assert summary["steps"] == 6 and 0 < summary["first_train_loss"] and summary["last_train_loss"] < summary[
        "first_train_loss"]
    for name, param in snapshot.model.named_parameters():
        assert torch.equal(param, snapshot.before[name]) != name.startswith("connector."), name


class Gradients(TrainerCallback):
    """The trainable weights' gradients of each optimizer step, as the optimizer gets them."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("loss", ["ce", "kl", "on_policy"])
def test_a_step_split_into_micro_batches_has_the_gradients_and_loss_of_one_batch(targets_dir, tmp_path, loss):
    found = {}
    for batch, accumulate in ((8, 1), (4, 2)):
        gradients, out = Gradients(), tmp_path / f"{batch}x{accumulate}"
        train(_config(targets_dir, out, "optim.max_steps=1", f"optim.batch_size={batch}",
                      f"optim.grad_accum={accumulate}", f"optim.loss={loss}", "model.qformer_dropout=0.0",
                      "optim.max_grad_norm=1e9", "optim.on_policy_max_new_tokens=6", "log.save_steps=100"),
              callbacks=[gradients])
        found[batch] = gradients.steps, _losses(out)
    (one, one_loss), (split, split_loss) = found[8], found[4]
    assert len(one) == len(split) == 1
    for name, gradient in one[0].items():
        torch.testing.assert_close(split[0][name], gradient, rtol=1e-5, atol=1e-7, msg=f"{loss} {name}")
    assert split_loss[1] == pytest.approx(one_loss[1], rel=1e-5, abs=1e-7)


def _sample_losses(model, batch):
    """Summed cross-entropy of each sample, by sample id, from every position's logits (packed rows are cut where
    their position ids restart)."""
    inputs = {k: v for k, v in batch.items() if k != "sample_ids" and not k.startswith("teacher_")}
    logits = model(**inputs, logits_at="all").logits
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                     reduction="none")  # (rows, seq - 1); -100 labels give 0
    rows, width = batch["labels"].shape
    starts = batch.get("position_ids", torch.arange(width).expand(rows, -1)) == 0
    samples = (starts.cumsum(dim=1) - 1)[:, :-1]  # which sample of its row each predicting position belongs to
    ids, losses = iter(batch["sample_ids"]), {}
    for row in range(len(token_losses)):
        real = int(batch["attention_mask"][row].sum())
        for k in range(int(starts[row, :real].sum())):
            losses[next(ids)] = token_losses[row][samples[row] == k].sum()
    return losses


def test_packed_batches_keep_each_samples_loss_gradients_and_distillation_targets(targets_dir, tmp_path):
    from desta.model.parts import labelled_logits
    from desta.train.data import DestaCollator, DestaDataset, load_targets, speech_examples
    from desta.train.losses import response_kl
    from desta.train.run import build_model

    model, processor = build_model(ModelSection(qformer_dropout=0.0), tmp_path)
    dataset = DestaDataset(speech_examples(load_targets(str(targets_dir), "train"), processor, teacher=True)[:6])
    items = [dataset[i] for i in range(6)]
    padded = DestaCollator(processor, 1024)(items)
    packed = DestaCollator(processor, 1024, pack_length=1024)(items)
    assert packed["input_ids"].shape[0] == 2 and packed["input_ids"].shape[1] <= 1024  # 6 samples of about 300
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum()  # the same tokens, less padding
    assert int((packed["position_ids"][packed["attention_mask"] == 1] == 0).sum()) == 6  # a restart per sample
    model.train()
    alone, together = _sample_losses(model, padded), _sample_losses(model, packed)
    assert sorted(alone) == sorted(together)
    for sample_id, loss in alone.items():
        torch.testing.assert_close(together[sample_id], loss, atol=1e-5, rtol=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses, grads = [], []
    for batch in (padded, packed):
        inputs = {k: v for k, v in batch.items() if k != "sample_ids" and not k.startswith("teacher_")}
        out = model(**inputs)
        with torch.no_grad():
            teacher, _ = labelled_logits(model.llm, batch["teacher_labels"], input_ids=batch["teacher_input_ids"],
                                         attention_mask=batch["teacher_attention_mask"])
        kl = response_kl(out.label_logits, teacher).mean()  # pairs the k-th response position of each side
        losses.append((out.loss, kl))
        grads.append(torch.autograd.grad(out.loss + kl, trainable))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_packing_trains_and_checks_its_length(targets_dir, tmp_path):
    summary = train(_config(targets_dir, tmp_path / "packed", "optim.max_steps=3", "data.packing=true",
                            "data.pack_length=2048"))
    assert summary["steps"] == 3 and summary["first_train_loss"] > 0
    with pytest.raises(ConfigError, match=r"data.pack_length: must be at least max_length \(1024\)"):
        load_config(TrainConfig, None, [f"data.train={targets_dir}", "data.pack_length=512"])


# ----- reliability: damaged checkpoints, config and data problems before anything loads -----

@pytest.fixture(scope="module")
def interrupted(targets_dir, tmp_path_factory):
    """A run stopped at step 4 of 6, with checkpoints at steps 2 and 4 (each with its checksums)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    train(_config(targets_dir, out, "optim.max_steps=6", "log.save_steps=2"), callbacks=[StopAfter(4)])
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    assert (out / "checkpoint-4" / "checksums.json").is_file()
    return out


def _overwrite(path, size=40 * 1024):
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - size // 2)
    data[start:start + size] = bytes(min(size, len(data) - start))
    path.write_bytes(bytes(data))


DAMAGES = {
    "weights truncated": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "optimizer truncated": ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:100])),
    "optimizer overwritten": ("optimizer.pt", _overwrite),
    "trainer state broken": ("trainer_state.json", lambda p: p.write_text(p.read_text()[:-40])),
    "save never finished": ("checksums.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_is_named_and_skipped(interrupted, tmp_path, capsys, damage):
    import shutil

    from desta.train.checkpoints import usable_checkpoint

    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    name, spoil = DAMAGES[damage]
    spoil(out / "checkpoint-4" / name)
    assert usable_checkpoint(out) == str(out / "checkpoint-2")
    assert f"checkpoint-4/{name}" in capsys.readouterr().err


def test_resume_after_40_kb_overwritten_starts_from_the_previous_checkpoint(interrupted, targets_dir, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    _overwrite(out / "checkpoint-4" / "optimizer.pt")
    summary = train(_config(targets_dir, out, "optim.max_steps=6", "log.save_steps=2"))
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 6
    assert (out / "checkpoint-6" / "checksums.json").is_file()


def test_no_usable_checkpoint_names_the_file_and_the_fix(interrupted, targets_dir, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    shutil.rmtree(out / "checkpoint-2")
    _overwrite(out / "checkpoint-4" / "model.safetensors", 64)
    with pytest.raises(ValueError, match=r"checkpoint-4/model.safetensors does not match its checksum .* Set "
                                         r"resume=false to start over"):
        train(_config(targets_dir, out, "optim.max_steps=6", "log.save_steps=2"))


def test_config_problems_name_the_key_and_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.max_steps: must be -1 \(run `epochs`\) or at least 1, got 0"):
        load_config(TrainConfig, None, ["data.train=x", "optim.max_steps=0"])
    with pytest.raises(ConfigError, match=r"optim.lr: must be positive, got -0.001"):
        load_config(TrainConfig, None, ["data.train=x", "optim.lr=-1e-3"])
    with pytest.raises(ConfigError, match=r"data.eval_fraction: is the share of clips held out, in \[0, 1\); got 1.5"):
        load_config(TrainConfig, None, ["data.train=x", "data.eval_fraction=1.5"])
    broken = tmp_path / "run.yaml"
    broken.write_text("optim:\n  lr: 1e-4\n  batch_size: [4\n")
    with pytest.raises(ConfigError, match=rf"{broken}:4:1: not valid YAML"):
        load_config(TrainConfig, broken)


def test_data_is_checked_before_models_load_or_files_are_written(targets_dir, tmp_path, monkeypatch):
    from datasets import load_from_disk

    import desta.train.run as stage

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(stage, "build_model", no_model)
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="train dataset .*nothing' not found"):
        train(load_config(TrainConfig, None, [f"output_dir={out}", f"data.train={tmp_path / 'nothing'}"]))
    from desta.core.chunks import save_dataset_atomic

    save_dataset_atomic(load_from_disk(str(targets_dir)).select([]), tmp_path / "empty")  # as the stages save it
    with pytest.raises(ValueError, match="empty holds no rows; nothing to train on"):
        train(load_config(TrainConfig, None, [f"output_dir={out}", f"data.train={tmp_path / 'empty'}"]))
    assert not out.exists()


def test_held_out_split_keeps_a_clip_for_training(targets_dir):
    from datasets import load_from_disk

    from desta.train.run import split_held_out

    two_clips = load_from_disk(str(targets_dir)).select(range(2))
    train_part, held = split_held_out(two_clips, 0.9, seed=0)
    assert len(train_part) == 1 and len(held) == 1


def test_tiny_build_is_seeded(tmp_path):
    from desta.train.run import build_model

    first, _ = build_model(ModelSection(), tmp_path, seed=3)
    torch.rand(100)  # whatever ran before must not matter
    second, _ = build_model(ModelSection(), tmp_path, seed=3)
    other, _ = build_model(ModelSection(), tmp_path, seed=4)
    a, b, c = (m.trainable_state_dict() for m in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_optimizer_takes_the_official_betas_and_decays_every_trainable_weight(targets_dir, tmp_path):
    from desta.train.run import setup

    run = setup(_config(targets_dir, tmp_path, "optim.weight_decay=0.01", "optim.adam_beta2=0.98",
                        "optim.decay_all=true"))
    groups = [g for g in run.trainer.create_optimizer().param_groups if g["params"]]
    assert {tuple(g["betas"]) for g in groups} == {(0.9, 0.98)}
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.01 for p in g["params"]}
    trainable = {id(p) for p in run.model.parameters() if p.requires_grad}
    assert decayed == trainable  # LayerNorms, biases and the queries too, as the DeSTA2.5 code does


def test_console_shows_the_loss_every_logging_steps_with_the_time_left(targets_dir, tmp_path, capsys):
    train(_config(targets_dir, tmp_path / "run", "optim.max_steps=6", "log.logging_steps=3", "log.progress=true",
                  "data.eval_fraction=0.25", "log.eval_steps=6", "log.save_steps=100"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    losses = {r["step"]: r["loss"] for r in history if "loss" in r}
    assert sorted(losses) == [1, 3, 6]  # the first step, then every logging_steps
    for step, loss in losses.items():
        line = next(x for x in lines if x.startswith(f"step {step}/6 ") and " loss " in f" {x}")
        assert f"loss {loss:.3f}" in line and ("ETA" in line) == (step < 6)
    assert any(x.startswith("step 0/6 (0%): eval_loss") for x in lines)
    assert any(x.startswith("step 6/6 (100%): eval_loss") for x in lines)


def test_a_qwen2_style_llm_trains_saves_reloads_and_answers(targets_dir, tmp_path):
    """A Qwen2-style backbone (ChatML with its own default system turn, no BOS token, biased q/k/v projections):
    the connector and LoRA train, the base (biases included) stays frozen, the saved checkpoint reloads with the
    same logits, and `desta chat` answers from it."""
    from desta.cli import main
    from desta.model.loading import load
    from desta.model.tiny import save_tiny_bases

    whisper, qwen = save_tiny_bases(tmp_path / "bases", llm="qwen2")
    snapshot = Snapshot()
    summary = train(_config(targets_dir, tmp_path / "run", "optim.max_steps=4", f"model.encoder={whisper}",
                            f"model.llm={qwen}", "model.lora={r: 4, lora_alpha: 8, lora_dropout: 0.0}"),
                    callbacks=[snapshot])
    assert summary["steps"] == 4
    changed = {n for n, p in snapshot.model.named_parameters() if not torch.equal(p, snapshot.before[n])}
    assert any(n.startswith("connector.") for n in changed) and any("lora_" in n for n in changed)
    assert not [n for n in changed if not n.startswith("connector.") and "lora_" not in n]
    assert any(n.endswith("q_proj.base_layer.bias") for n in snapshot.before)  # Qwen2's biases, frozen above

    model, processor = load(tmp_path / "run")
    assert processor.tokenizer.bos_token is None and type(model.llm.get_base_model()).__name__ == "Qwen2ForCausalLM"
    conversation = processor.conversation("Who speaks?")
    assert processor.render(conversation, add_generation_prompt=True).startswith(
        "<|im_start|>system\nFocus on the audio clips and instructions.<|im_end|>")  # the trained turn, not Qwen's
    import numpy as np

    clip = np.sin(np.arange(16000) / 16000 * 2 * np.pi * 220).astype(np.float32) * 0.1
    inputs = processor([conversation], audios=[[clip]], transcripts=[["hello"]], add_generation_prompt=True)
    again, _ = load(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)
    import soundfile as sf

    sf.write(tmp_path / "clip.wav", clip, 16000)
    assert main(["chat", str(tmp_path / "run"), "Who speaks?", "--audio", str(tmp_path / "clip.wav"),
                 "--max-new-tokens", "4"]) == 0


def test_init_from_starts_from_a_trained_run_and_refuses_weights_it_would_drop(targets_dir, tmp_path):
    from desta.model.loading import load
    from desta.train.run import build_model

    lora = "model.lora={r: 4, lora_alpha: 8}"
    train(_config(targets_dir, tmp_path / "first", "optim.max_steps=2", lora))
    trained = load(tmp_path / "first")[0].trainable_state_dict()
    again = _config(targets_dir, tmp_path / "first", f"model.init_from={tmp_path / 'first'}", lora)
    started = build_model(again.model, tmp_path / "first")[0].trainable_state_dict()
    assert sorted(started) == sorted(trained) and any("lora_A" in name for name in trained)
    assert all(torch.equal(started[name], trained[name]) for name in trained)
    without_lora = _config(targets_dir, tmp_path / "first", f"model.init_from={tmp_path / 'first'}")
    with pytest.raises(ValueError, match=r"holds \d+ weights this model lacks \(e.g. llm\..*lora.*model.lora"):
        build_model(without_lora.model, tmp_path / "first")


def test_the_system_prompt_of_a_held_out_split_is_read_without_rewriting_the_table(tmp_path):
    """A training split is an index mapping over the targets table: reading its system prompt must not flatten
    it (datasets' unique() rewrote the whole table, audio included, at start-up: minutes and gigabytes at 100k
    rows)."""
    from datasets import Dataset, load_from_disk

    from desta.train.data import targets_system_prompt

    Dataset.from_dict({"id": [f"c{i}" for i in range(50)], "system_prompt": ["Be brief."] * 50,
                       "audio": [b"x" * 1000] * 50}).save_to_disk(str(tmp_path / "t"))
    split = load_from_disk(str(tmp_path / "t")).select(range(0, 50, 2), keep_in_memory=True)
    before = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert targets_system_prompt(split, None) == "Be brief."
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == before
