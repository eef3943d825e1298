import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import flop_counter
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperForConditionalGeneration

from desta.cli import main
from desta.core.args import load_config
from desta.train.plan import LLMS, WHISPER, PlanConfig, llm_parameters, plan, render_plan, whisper_parameters

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"whisper": dict(d_model=128, encoder_layers=4, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512),
         "llm": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                     intermediate_size=1536, vocab_size=16000)}
BATCH, STEPS, TOKENS, QUERIES = 4, 500, 512, 64  # 10 s clips, one window each
# CPU attention runs PyTorch's CPU flash kernel, which the flop counter does not know; count it as its GPU twin.
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *_, **__: flop_counter.sdpa_flop_count(query, key, value),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, query, key, value, *_, **__: flop_counter.sdpa_backward_flop_count(grad, query, key, value),
}
# The model the plan describes, built and run for one training step (a separate process measures its memory).
STEP = f"""
import json, sys, torch
from desta.model.modeling import DestaConfig, DestaModel
torch.manual_seed(0)
config = DestaConfig.from_components(sys.argv[1], sys.argv[2], tapped_layers=[1, 3], num_queries={QUERIES},
                                     qformer_dropout=0.0, audio_token_id=5)
model = DestaModel(config)
if sys.argv[3] == "1":
    model.llm.activation_checkpointing_enable()
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
ids = torch.randint(10, 15000, ({BATCH}, {TOKENS}))
ids[:, 3:3 + {QUERIES}] = 5
features = torch.randn({BATCH}, 80, 2 * {STEPS})
before = int(open("/proc/self/statm").read().split()[1]) * 4096
model(input_ids=ids, input_features=features, labels=ids).loss.backward()
optimizer.step()
# VmHWM: this process's own peak (ru_maxrss would start from the forking parent's)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) * 1024
print(json.dumps(peak - before))
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Random small Whisper and Llama checkpoints (config.json is what the plan reads)."""
    folder = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    WhisperForConditionalGeneration(WhisperConfig(**SMALL["whisper"])).save_pretrained(folder / "whisper")
    LlamaForCausalLM(LlamaConfig(**SMALL["llm"])).save_pretrained(folder / "llm")
    return folder / "whisper", folder / "llm"


def _plan(small, *settings, tokens=TOKENS, steps=STEPS, response=None):
    whisper, llm = small
    return plan(load_config(PlanConfig, None, [
        f"model.encoder={whisper}", f"model.llm={llm}", "data.train=unused", "model.tapped_layers=[1,3]",
        f"model.num_queries={QUERIES}", f"optim.batch_size={BATCH}", "optim.precision=fp32", f"tokens={tokens}",
        f"clip_seconds={steps / 50}", f"response_tokens={response or tokens}", *settings]))


def _model(small, checkpointing, rows=BATCH, tokens=TOKENS, steps=STEPS, response=None):
    """A training-mode model on the small bases and a batch whose labels are every token, or the last
    `response` + 1 (the response and its end of turn: `response` positions predict them)."""
    from desta.model.modeling import DestaConfig, DestaModel

    torch.manual_seed(0)
    config = DestaConfig.from_components(*map(str, small), tapped_layers=[1, 3], num_queries=QUERIES,
                                         qformer_dropout=0.0, audio_token_id=5)
    model = DestaModel(config)
    if checkpointing:
        model.llm.activation_checkpointing_enable()
    ids = torch.randint(10, 15000, (rows, tokens))
    ids[:, 3:3 + QUERIES] = 5
    labels = ids if response is None else ids.masked_fill(torch.arange(tokens) < tokens - response - 1, -100)
    return model.train(), {"input_ids": ids, "input_features": torch.randn(rows, 80, 2 * steps), "labels": labels}


def _whisper(w):
    return WhisperForConditionalGeneration(WhisperConfig(
        d_model=w.d_model, encoder_layers=w.encoder_layers, decoder_layers=w.decoder_layers,
        encoder_attention_heads=w.heads, decoder_attention_heads=w.heads, encoder_ffn_dim=w.ffn, decoder_ffn_dim=w.ffn,
        num_mel_bins=w.mel_bins, vocab_size=w.vocab, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        decoder_start_token_id=0))


def test_parameter_counts_match_the_models_of_every_table_entry():
    for name, w in WHISPER.items():
        with torch.device("meta"):
            model = _whisper(w).model
        counted = {"encoder": sum(p.numel() for p in model.encoder.parameters()),
                   "decoder": sum(p.numel() for p in model.decoder.parameters())}
        assert whisper_parameters(w) == counted, name
    for name, m in LLMS.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(hidden_size=m.hidden, num_hidden_layers=m.layers,
                                                 num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
                                                 intermediate_size=m.intermediate, vocab_size=m.vocab,
                                                 tie_word_embeddings=m.tied))
        assert llm_parameters(m) == sum(p.numel() for p in model.parameters()), name
    # the released connectors: DeSTA2.5-Audio 131,540,224 weights, DeSTA2's qformer_connector.pth 22,251,776
    for recipe, count in (("desta25", 131_540_224), ("desta2", 22_251_776)):
        config = load_config(PlanConfig, ROOT / "recipes" / recipe / "config.yaml")
        assert plan(config)["parameters"]["connector"] == count, recipe


def test_flops_match_the_flop_counter(small):
    measured = {}
    for checkpointing in (False, True):
        model, batch = _model(small, checkpointing, rows=1, tokens=160, steps=100)
        with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            model(**batch).loss.backward()
        measured[checkpointing] = counter.get_total_flops()
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        model.encode_audio(batch["input_features"])
    planned = _plan(small, tokens=160, steps=100)["flops"]  # per sample
    assert planned["encoder"] == counter.get_total_flops()
    total = planned["encoder"] + planned["connector"] + planned["llm"]
    assert total == pytest.approx(measured[False], rel=0.01)
    assert planned["checkpointing"] == pytest.approx(measured[True] - measured[False], rel=1e-6)


def _kept_for_backward(model, batch):
    """Bytes of the tensors autograd saves in the forward pass, each storage once, the weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    return sum(kept.values())


@pytest.mark.parametrize("response", [None, 100])
def test_activation_memory_matches_what_autograd_keeps(small, response):
    for checkpointing in (False, True):
        model, batch = _model(small, checkpointing, rows=1, response=response)
        kept = _kept_for_backward(model, batch)
        parts = _plan(small, "optim.batch_size=1", response=response)["memory"][
            "1 gpu+checkpointing" if checkpointing else "1 gpu"]
        planned = sum(parts[f"activations_{k}"] for k in ("llm", "connector", "loss")) * 1e9
        assert planned == pytest.approx(kept, rel=0.03), (checkpointing, response)


def test_frozen_weights_follow_the_precision_and_fp32_ones_count_the_copies_autocast_keeps(small):
    for checkpointing in (False, True):
        model, batch = _model(small, checkpointing, rows=1, response=100)  # float32 weights
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kept = _kept_for_backward(model, batch)  # bf16 activations, and the bf16 copy of each weight product
        parts = _plan(small, "optim.batch_size=1", "optim.precision=bf16", "model.dtype=float32", response=100)[
            "memory"]["1 gpu+checkpointing" if checkpointing else "1 gpu"]
        planned = sum(parts[f"activations_{k}"] for k in ("llm", "connector", "loss")) + parts["autocast_weight_copies"]
        assert planned * 1e9 == pytest.approx(kept, rel=0.03), checkpointing
    recipe = ROOT / "recipes" / "desta25" / "config.yaml"
    auto, fp32 = (plan(load_config(PlanConfig, recipe, [f"model.dtype={dtype}", "optim.precision=auto"]))["memory"]
                  for dtype in ("auto", "float32"))
    assert auto["1 gpu"]["weights"] < 0.51 * fp32["1 gpu"]["weights"]  # auto: bf16 weights where training is bf16
    assert "autocast_weight_copies" not in auto["1 gpu"] and fp32["1 gpu"]["autocast_weight_copies"] > 14  # GB at 8B


def test_response_only_logits_shrink_the_plans_logits_and_the_targets_stage_is_planned():
    settings = ["gpu=h200", "samples=5000000", "answer_tokens=150"]
    every = plan(load_config(PlanConfig, ROOT / "recipes" / "desta25" / "config.yaml",
                             [*settings, "response_tokens=300"]))  # all 300 positions: the forward before #28
    response = plan(load_config(PlanConfig, ROOT / "recipes" / "desta25" / "config.yaml", settings))
    before, after = every["memory"]["1 gpu"], response["memory"]["1 gpu"]
    assert before["activations_logits"] == pytest.approx(4.6, abs=0.05)  # GB at batch 12, as issue #28 read it
    assert after["activations_logits"] == pytest.approx(before["activations_logits"] * 150 / 299, rel=1e-6)
    assert response["largest_batch"]["1 gpu"] > every["largest_batch"]["1 gpu"]
    assert response["flops"]["llm"] < every["flops"]["llm"]
    targets = response["targets"]
    assert targets["tokens"] == 750_000_000  # 5 M answers of 150 tokens
    assert targets["hours"]["batch 16 (the old default)"] == pytest.approx(385, abs=1)
    assert targets["hours"]["batch 256"] == pytest.approx(38, abs=0.5)
    text = render_plan(response)
    assert "vLLM (stated, not measured)" in text and "750 M tokens to generate" in text


def test_peak_memory_matches_measured_rss(small):
    planned, measured = {}, {}
    for checkpointing in (False, True):
        result = subprocess.run([sys.executable, "-c", STEP, *map(str, small), str(int(checkpointing))],
                                capture_output=True, text=True, timeout=300, cwd=ROOT,
                                env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr[-2000:]
        measured[checkpointing] = json.loads(result.stdout.strip().splitlines()[-1])
        parts = _plan(small)["memory"]["1 gpu+checkpointing" if checkpointing else "1 gpu"]
        # the weights were resident before the step; the step adds activations, gradients and AdamW's moments
        planned[checkpointing] = (parts["total"] - parts["weights"] - 1.0) * 1e9
        assert planned[checkpointing] == pytest.approx(measured[checkpointing], rel=0.15), checkpointing
    assert measured[True] < 0.8 * measured[False]


def test_plan_agrees_with_the_published_set_ups():
    desta25 = load_config(PlanConfig, ROOT / "recipes" / "desta25" / "config.yaml", ["gpus=8", "gpu=a100"])
    result = plan(desta25)  # the paper: 8 GPUs x batch 12 with DDP; the official config names A100s
    assert result["memory"]["ddp"]["total"] <= 80 and result["largest_batch"]["ddp"] >= 12
    forty = plan(load_config(PlanConfig, ROOT / "recipes" / "desta25" / "config.yaml", ["gpus=8", "gpu=a100-40gb"]))
    assert forty["memory"]["ddp"]["total"] > 40 >= forty["memory"]["ddp+checkpointing"]["total"]
    # Ultravox v0.4: Whisper-medium + Llama-3.1-8B, adapter only, KL to the text LLM, 14,400 steps of 8 x 24 on
    # 8 H100s in 2-3 hours; its clips up to 16 s are padded to the batch's longest, about 220 tokens a row
    ultravox = load_config(PlanConfig, None, [
        "data.train=unused", "model.encoder=openai/whisper-medium", "model.llm=meta-llama/Llama-3.1-8B-Instruct",
        "model.tapped_layers=[23]", "model.qformer_layers=1", "model.dtype=bfloat16", "optim.precision=bf16",
        "optim.loss=kl", "optim.batch_size=24", "optim.max_steps=14400", "gpus=8", "gpu=h100", "clip_seconds=15",
        "tokens=220", "teacher_tokens=160", "mfu=0.35"])
    assert 2 <= plan(ultravox)["time"]["plain"]["hours"] <= 3.5


def test_plan_answers_whether_it_fits_on_a_24_gb_card(capsys):
    assert main(["plan", str(ROOT / "recipes" / "desta2" / "config.yaml"), "--gpus", "1", "--gpu", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert "1 gpu+checkpointing" in out and "largest batch that fits" in out
    desta2 = plan(load_config(PlanConfig, ROOT / "recipes" / "desta2" / "config.yaml", ["gpu=rtx4090"]))
    assert desta2["largest_batch"]["1 gpu"] < 4 <= desta2["largest_batch"]["1 gpu+checkpointing"]
    desta25 = plan(load_config(PlanConfig, ROOT / "recipes" / "desta25" / "config.yaml", ["gpu=l4"]))
    assert desta25["largest_batch"]["1 gpu"] == 0 and desta25["largest_batch"]["1 gpu+checkpointing"] >= 1
    assert main(["plan", str(ROOT / "recipes" / "desta2" / "config.yaml"), "--gpu", "b200"]) == 2
    assert "unknown GPU kind 'b200'" in capsys.readouterr().err


def test_each_loss_adds_what_it_computes_per_sample(capsys):
    def flops(loss):
        config = load_config(PlanConfig, ROOT / "recipes" / "desta2" / "config.yaml", [f"optim.loss={loss}"])
        return plan(config)["flops"]

    ce, kl, on_policy = flops("ce"), flops("kl"), flops("on_policy")
    assert ce["teacher"] == ce["sampling"] == kl["sampling"] == 0 < kl["teacher"] == on_policy["teacher"]
    assert on_policy["sampling"] > on_policy["teacher"]  # the same LLM forward, and the connector
    assert main(["plan", str(ROOT / "recipes" / "desta2" / "config.yaml"), "optim.loss=on_policy"]) == 0
    assert "sampling the answer" in capsys.readouterr().out
