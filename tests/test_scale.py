"""What only shows at scale, run small on CPU: the official checkpoint layout, DDP with text-only batches,
FSDP with save and resume, bf16; and GPU-only checks marked `gpu`."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from desta.cli import main
from desta.model.tiny import save_tiny_bases


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return save_tiny_bases(tmp_path_factory.mktemp("bases"))


class OfficialConnector(nn.Module):
    """The DeSTA2.5-Audio connector as its release code builds it (QformerConnector in modeling_desta25.py)."""

    def __init__(self, layers, queries, width, heads, qformer_layers, intermediate, llm_width):
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEncoder

        super().__init__()
        config = BertConfig(hidden_size=width, num_hidden_layers=qformer_layers, num_attention_heads=heads,
                            intermediate_size=intermediate, add_cross_attention=True, is_decoder=True)
        config._attn_implementation = "eager"
        self.layer_prompts = nn.ParameterList([nn.Parameter(torch.randn(1, queries, width)) for _ in range(layers)])
        self.layer_weights = nn.Parameter(torch.randn(queries, layers))
        self.qformer = BertEncoder(config)
        self.proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm_width))

    def forward(self, taps):  # (layers, batch, steps, width)
        outs = [self.qformer(hidden_states=prompt.expand(taps.shape[1], -1, -1), encoder_hidden_states=tap)
                .last_hidden_state for prompt, tap in zip(self.layer_prompts, taps, strict=True)]
        stacked = torch.stack(outs).permute(1, 2, 0, 3)  # (batch, queries, layers, width)
        weights = self.layer_weights.softmax(dim=-1).unsqueeze(-1)  # (queries, layers, 1)
        return self.proj((stacked * weights).sum(dim=2))


def test_official_release_converts_to_the_same_connector_output(bases, tmp_path):
    from desta.model.loading import load

    whisper_dir, llm_dir = bases
    torch.manual_seed(0)
    official = OfficialConnector(layers=4, queries=64, width=64, heads=2, qformer_layers=2, intermediate=96,
                                 llm_width=64).eval()
    release = tmp_path / "release"
    release.mkdir()
    lora = {f"llm_model.model.layers.{i}.self_attn.{proj}_proj.lora_{ab}.default.weight":
            torch.randn((8, 64) if ab == "A" else (64 if proj == "q" else 32, 8))
            for i in range(2) for proj in "qkv" for ab in "AB"}  # rank 8 on q, k, v of both LLM layers
    save_file({**{f"perception.connector.{k}": v.contiguous() for k, v in official.state_dict().items()}, **lora},
              release / "model.safetensors")
    (release / "config.json").write_text(json.dumps({
        "encoder_model_id": str(whisper_dir), "llm_model_id": str(llm_dir), "connector_mode": "qformer_1",
        "qformer_num_hidden_layers": 2, "prompt_size": 64, "target_layer_ids": [0, 1, 2, 3]}))
    assert main(["convert-official", str(release), str(tmp_path / "converted")]) == 0
    model, processor = load(tmp_path / "converted")
    model.eval()
    taps = torch.randn(4, 2, 1500, 64)  # (layers, windows, steps of a 30 s window, d_model)
    with torch.no_grad():
        expected = official(taps)
        got = model.connector(taps, torch.ones(2, 1500, dtype=torch.bool))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.config.pad_to_30s and processor.pad_to_30s  # the official encoder always sees 30 s
    assert model.config.lora == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                                 "target_modules": ["k_proj", "q_proj", "v_proj"]}
    loaded = model.state_dict()
    for key, value in lora.items():
        torch.testing.assert_close(loaded["llm.base_model.model." + key.removeprefix("llm_model.")], value)


def test_conversion_names_what_it_cannot_map(bases, tmp_path, capsys):
    whisper_dir, llm_dir = bases
    save_file({"perception.connector.something_else": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert main(["convert-official", str(tmp_path), str(tmp_path / "out"), f"encoder={whisper_dir}",
                 f"llm={llm_dir}"]) == 2
    assert "something_else" in capsys.readouterr().err


# ----- several processes on CPU (gloo) -----

BASE = ["optim.warmup_steps=2", "optim.batch_size=2", "optim.lr=3e-3", "log.logging_steps=1", "log.report_to=none",
        "log.progress=false", "data.eval_fraction=0.25", "data.text_ratio=0.5"]


@pytest.fixture(scope="module")
def run_data(tmp_path_factory, bases):
    from tests.conftest import described_dataset, label_targets

    folder = tmp_path_factory.mktemp("scale-data")
    targets = label_targets(described_dataset(folder, num_clips=16, seed=4), folder / "targets")
    replay = folder / "replay.jsonl"
    replay.write_text("".join(json.dumps({"instruction": f"What is {i}+{i}?", "response": str(2 * i)}) + "\n"
                              for i in range(10)))
    whisper_dir, llm_dir = bases
    return [f"data.train={targets}", f"data.text_replay={replay}", f"model.encoder={whisper_dir}",
            f"model.llm={llm_dir}", *BASE]


def _launch(launcher: list[str], settings: list[str], port: int):
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", *launcher[:1], *(["--main_process_port"] if "accelerate" in launcher[0] else
                                                      ["--master_port"]), str(port), *launcher[1:], *settings]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DESTA_DEBUG": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _history(out):
    history = json.loads((out / "log_history.json").read_text())
    return ({r["step"]: r["loss"] for r in history if "loss" in r},
            {r["step"]: r["eval_loss"] for r in history if "eval_loss" in r})


def _text_only_batches(settings, world, steps):
    """How many of the first `steps` per-process batches hold only text rows (the sampler's order)."""
    from desta.core.args import load_config
    from desta.core.replay import replay_count
    from desta.train.config import TrainConfig
    from desta.train.data import EpochSeededSampler, load_targets
    from desta.train.run import split_held_out

    config = load_config(TrainConfig, None, settings)
    speech, _ = split_held_out(load_targets(config.data.train, "train"), config.data.eval_fraction, config.optim.seed)
    lengths = [float(d) for d in speech["duration"]] + [0.0] * replay_count(len(speech), config.data.text_ratio)
    order = list(EpochSeededSampler(config.optim.batch_size, lengths, config.optim.seed))
    batches = [order[i:i + config.optim.batch_size] for i in range(0, len(order), config.optim.batch_size)]
    return sum(all(i >= len(speech) for i in batch) for batch in batches[: world * steps])


def test_ddp_with_text_only_batches_trains_and_reports_the_true_loss(run_data, tmp_path):
    from desta.core.args import load_config
    from desta.train.config import TrainConfig
    from desta.train.run import train

    settings = [f"output_dir={tmp_path / 'ddp'}", "optim.max_steps=6", *run_data]
    assert _text_only_batches(settings, world=2, steps=6) >= 2  # duration 0 groups the text rows together
    _launch(["torch.distributed.run", "--nproc_per_node", "2", "-m", "desta.cli", "train"], settings, 29561)
    losses, evals = _history(tmp_path / "ddp")
    assert sorted(losses) == list(range(1, 7))
    one = train(load_config(TrainConfig, None, [f"output_dir={tmp_path / 'one'}", "optim.max_steps=1", *run_data]))
    # the untrained model on the same held-out rows: two processes report the loss one process does
    assert evals[0] == pytest.approx(one["eval_losses"][0][1], rel=1e-5)


@pytest.mark.slow
def test_two_processes_build_the_feature_cache_together_and_merge_it_once(run_data, tmp_path):
    from desta.core.args import load_config
    from desta.train.config import TrainConfig
    from desta.train.features import FeatureCache
    from desta.train.run import cache_features_for

    settings = [f"output_dir={tmp_path / 'run'}", "data.cache_dtype=float32", *run_data]
    _launch(["torch.distributed.run", "--nproc_per_node", "2", "-m", "desta.cli", "cache-features"],
            [f"data.feature_cache={tmp_path / 'two'}", *settings], 29565)
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    shards = [shard for shard, _ in meta["clips"].values()]
    assert len(meta["clips"]) == 16 and sorted(map(shards.count, set(shards))) == [8, 8]  # each process half the clips
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted({*shards, "meta.json"})  # merged, no parts
    cache_features_for(load_config(TrainConfig, None, [f"data.feature_cache={tmp_path / 'one'}", *settings]))
    one, two = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "two")
    for clip in one.meta["clips"]:
        for alone, shared in zip(one[clip], two[clip], strict=True):
            torch.testing.assert_close(shared, alone)  # the features one process computes


def test_fsdp_recipe_trains_saves_and_resumes_on_cpu(run_data, tmp_path):
    from desta.model.loading import load

    out = tmp_path / "fsdp"
    launcher = ["accelerate.commands.launch", "--config_file", "recipes/accelerate/fsdp.yaml", "--num_processes", "2",
                "-m", "tests.fsdp_cpu", "train"]
    settings = [f"output_dir={out}", "optim.max_steps=4", "log.save_steps=2", "log.eval_steps=2", *run_data]
    _launch(launcher, settings, 29563)
    from safetensors import safe_open

    checkpoint = out / "checkpoint-2"
    assert not (checkpoint / "pytorch_model_fsdp_0").exists()  # no shard of the frozen bases in a checkpoint
    assert (checkpoint / "optimizer_0").is_dir()  # the optimizer state, sharded: each process wrote its part
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        assert handle.keys() and all(name.startswith("connector.") for name in handle.keys())
    full_losses, full_evals = _history(out)
    model, _ = load(out)  # the gathered trainable weights, in desta's format
    assert model.connector.queries.shape == (4, 64, 64)
    import shutil

    shutil.rmtree(out / "checkpoint-4")
    _launch(launcher, settings, 29563)
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("checkpoint-2")
    losses, evals = _history(out)
    for step in (3, 4):
        assert losses[step] == pytest.approx(full_losses[step], rel=1e-5), step
    assert evals[4] == pytest.approx(full_evals[4], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["on_policy", "kl"])
def test_fsdp_trains_with_the_text_llm_as_teacher_and_on_its_own_samples(run_data, tmp_path, loss):
    """The teacher's forward and the student's sampling run outside the model's forward: FSDP must gather the root
    unit's weights for them, and processes sampling answers of different lengths decode in step."""
    import yaml

    out = tmp_path / loss
    recipe = yaml.safe_load(Path("recipes/accelerate/fsdp.yaml").read_text())
    recipe["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = True  # as a config copied from elsewhere might say
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(recipe))
    launcher = ["accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"), "--num_processes", "2",
                "-m", "tests.fsdp_cpu", "train"]
    result = _launch(launcher, [f"output_dir={out}", "optim.max_steps=2", f"optim.loss={loss}", "log.eval_steps=2",
                                "optim.on_policy_max_new_tokens=6", *run_data, "data.text_ratio=0"], 29567)
    assert "fsdp_cpu_ram_efficient_loading has no effect" in result.stderr
    losses, evals = _history(out)
    assert sorted(losses) == [1, 2] and all(v == v and v >= 0 for v in [*losses.values(), *evals.values()])


def test_bf16_autocast_on_cpu_runs_the_llm_in_bf16_and_keeps_the_connector_in_fp32(run_data, tmp_path):
    from transformers import TrainerCallback

    from desta.core.args import load_config
    from desta.train.config import TrainConfig
    from desta.train.run import train

    class Dtypes(TrainerCallback):
        seen: set = set()

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model = model
            model.llm.lm_head.register_forward_hook(lambda m, i, out: self.seen.add(out.dtype))

    dtypes = Dtypes()
    summary = train(load_config(TrainConfig, None, [f"output_dir={tmp_path}", "optim.max_steps=3",
                                                    "optim.precision=bf16", "model.dtype=bfloat16", *run_data,
                                                    "data.text_ratio=0"]),
                    callbacks=[dtypes])
    assert summary["steps"] == 3 and all(loss == loss for _, loss in summary["eval_losses"])  # finite
    assert torch.bfloat16 in dtypes.seen
    assert {p.dtype for p in dtypes.model.connector.parameters()} == {torch.float32}
    assert dtypes.model.llm.lm_head.weight.dtype == torch.bfloat16


def test_trainable_weights_stay_float32_beside_16_bit_frozen_ones_and_fp16_trains(tmp_path, clip):
    from desta.train.config import ModelSection
    from desta.train.run import build_model
    from tests.conftest import conversation

    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    for dtype, precision in (("auto", "bf16"), ("bfloat16", "auto"), ("float16", "auto"), ("auto", "auto")):
        model, processor = build_model(ModelSection(lora=lora, dtype=dtype), tmp_path, precision=precision)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert any("lora_" in n for n in trainable) and any(n.startswith("connector.") for n in trainable)
        assert {p.dtype for p in trainable.values()} == {torch.float32}, (dtype, precision)
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        assert frozen == {torch.float16 if dtype == "float16" else torch.float32 if dtype == precision == "auto"
                          else torch.bfloat16}, (dtype, precision)  # auto on this CPU: fp32 precision
    # the last fp16 model: a step under fp16 autocast with the gradient scaler, which refuses fp16 gradients
    model, processor = build_model(ModelSection(lora=lora, dtype="float16"), tmp_path)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = processor([conversation()] * 2, audios=[[clip]] * 2, transcripts=[["where is the station"]] * 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(**batch).loss
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != param.requires_grad, name


def test_the_connector_keeps_one_16_bit_copy_of_the_frames_under_autocast(tmp_path):
    from desta.train.config import ModelSection
    from desta.train.run import build_model

    model, _ = build_model(ModelSection(qformer_layers=3, qformer_dropout=0.0), tmp_path)
    model.train()
    frames = torch.randn(4, 2, 50, model.config.encoder_config.d_model)  # (layers, windows, steps, d_model), fp32
    copy = frames.reshape(8, 50, -1).to(torch.bfloat16)  # what each key/value product reads: (layers x windows, ...)
    kept = {}

    def pack(tensor):
        if tensor.dtype == copy.dtype and tensor.numel() == copy.numel() and torch.equal(tensor.reshape(copy.shape),
                                                                                         copy):  # any view of it
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.embed_audio(audio_hidden_states=frames)
    assert out.shape == (2, 64, model.config.text_config.hidden_size)
    assert len(kept) == 1  # not one per key and value product of the 3 layers
    out.float().sum().backward()
    assert model.connector.queries.grad.abs().sum() > 0


# ----- on a GPU -----

@pytest.mark.gpu
def test_gradient_checkpointing_lowers_gpu_peak_memory(clip):
    from desta.model.tiny import tiny_model
    from tests.conftest import conversation

    peaks = {}
    for checkpointing in (False, True):
        model, processor = tiny_model()
        model.llm.config.num_hidden_layers = 2
        if checkpointing:
            model.llm.activation_checkpointing_enable()
        model = model.cuda().train()
        batch = processor([conversation("A woman asks for the station. " * 40)] * 8, audios=[[clip]] * 8).to("cuda")
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        peaks[checkpointing] = torch.cuda.max_memory_allocated()
    assert peaks[True] < peaks[False]


@pytest.mark.gpu
def test_fp16_training_runs_on_a_gpu(run_data, tmp_path):
    from desta.core.args import load_config
    from desta.train.config import TrainConfig
    from desta.train.run import train

    summary = train(load_config(TrainConfig, None, [f"output_dir={tmp_path}", "optim.max_steps=3",
                                                    "optim.precision=fp16", "model.lora={r: 4}", *run_data]))
    assert summary["steps"] == 3 and summary["last_train_loss"] == summary["last_train_loss"]  # fp16 weights (auto)
