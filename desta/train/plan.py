"""Plan a training run before renting the GPUs: `desta plan CONFIG.yaml --gpus N --gpu h100`.

Reads a `desta train` config and the architecture numbers of its base models: from the table
below for the common Hub checkpoints (no download, no weights), from config.json when the
config names a local folder, from desta.model.tiny for "tiny". Prints parameters (trainable and
frozen), FLOPs per training sample (encoder, connector, LLM forward and backward), memory per
GPU (weights, gradients, AdamW states, activations with and without gradient checkpointing, for
DDP and FSDP), whether it fits and the largest batch that does, and the step time and GPU-hours
at a stated model-FLOPs utilisation (MFU); and, before training, the targets stage: the tokens the text LLM
writes for the dataset and the hours that takes at the generation rates measured on an H200.

How the numbers are made (tests/test_plan.py checks them against torch.utils.flop_counter and
against measured memory on small CPU shapes):
- FLOPs count matrix products as torch.utils.flop_counter does: 2 per multiply-add, attention as
  full score and value products (causal masking is not subtracted), its backward as 2.5 times
  its forward (scores recomputed). The frozen encoder runs forward only, without gradients; the
  frozen LLM runs forward and a backward for its input gradients only (one product per
  weight, not two); the trainable connector runs forward and a full backward. Gradient
  checkpointing adds one more forward of the LLM's layers, all but each layer's last product
  (PyTorch stops a recompute once it has what the backward needs).
- Activation memory is what autograd keeps for the backward pass, per token and LLM layer:
  8 d + 8 bytes for the two RMSNorms (their inputs upcast to fp32), c (2 d_q + 2 d_kv + 3 f)
  bytes for queries, keys, values, attention output and the MLP (c = 2 in bf16, 4 in fp32), and
  4 bytes per head (the attention's log-sum-exp); with checkpointing, c d bytes per layer (its
  input) plus one layer's full set during its recompute. The loss keeps 4 bytes per token and
  vocabulary entry (fp32 log-probabilities); beside them live the logits (c bytes) and, in the
  backward pass, their gradient and the log-softmax backward's temporary (8 bytes). Training projects
  only the positions that predict a response token (`response_tokens` of them, DestaModel's
  logits_at="labelled"), so these terms, the LM head's FLOPs and its input (c bytes per hidden
  value, gathered) count those positions only; the final norm still keeps 4 d + 4 bytes per token. The
  connector keeps (1 + 2 layers) x steps x d values per tapped layer and window (the frames and
  each layer's keys and values) plus layers x queries x (14 d + 2 f) values.
- Weights: frozen parts in model.dtype (auto: bf16 under bf16 precision, the GPU default), the trainable
  connector (and LoRA) in fp32 with its gradient, AdamW's two moments (16 bytes per trainable weight) and
  under bf16 autocast its bf16 copy; DDP adds a gradient bucket. Frozen weights kept in fp32 under 16-bit
  autocast add the 16-bit copy of every LLM weight that autograd keeps for the backward pass. FSDP divides
  weights, gradients and moments by the number of GPUs and holds unsharded the root unit (what no wrapped
  layer owns: Whisper's decoder, convolutions, the connector) plus two LLM layers in flight and the output
  projection.
- A GPU keeps CUDA_CONTEXT_GB for the CUDA context and kernels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desta.core.args import raise_problems
from desta.core.optim import resolved_precision
from desta.core.summary import Summary
from desta.train.config import TrainConfig, frozen_dtype

GB = 1e9
CUDA_CONTEXT_GB = 1.0  # CUDA context, cuBLAS/NCCL workspaces: what a process holds before any tensor
STEPS_PER_SECOND = 50  # Whisper encoder steps per second of audio (100 mel frames/s, conv stride 2)
WINDOW_STEPS = 1500  # one 30 s window


@dataclass(frozen=True)
class WhisperArch:
    """What the planner needs of a Whisper checkpoint's config.json."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    ffn: int
    mel_bins: int
    vocab: int
    max_target_positions: int = 448


@dataclass(frozen=True)
class LlmArch:
    """What the planner needs of a Llama-style chat LLM's config.json (RMSNorm, grouped-query attention,
    SwiGLU MLP, no biases)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int | None = None

    @property
    def dim_head(self) -> int:
        """Width of one attention head."""
        return self.head_dim or self.hidden // self.heads


# From each checkpoint's config.json on the Hugging Face Hub (https://huggingface.co/<id>/blob/main/config.json);
# whisper-tiny.en and SmolLM2-135M-Instruct were also read from local copies.
WHISPER = {
    "openai/whisper-tiny.en": WhisperArch(384, 4, 4, 6, 1536, 80, 51864),
    "openai/whisper-small": WhisperArch(768, 12, 12, 12, 3072, 80, 51865),
    "openai/whisper-medium": WhisperArch(1024, 24, 24, 16, 4096, 80, 51865),
    "openai/whisper-large-v3": WhisperArch(1280, 32, 32, 20, 5120, 128, 51866),
    "openai/whisper-large-v3-turbo": WhisperArch(1280, 32, 4, 20, 5120, 128, 51866),
}
_LLAMA3_8B = LlmArch(4096, 32, 32, 8, 14336, 128256, False)
LLMS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3.1-8B-Instruct": _LLAMA3_8B,
    "DeSTA-ntu/Llama-3.1-8B-Instruct": _LLAMA3_8B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": LlmArch(576, 30, 9, 3, 1536, 49152, True),
    "HuggingFaceTB/SmolLM2-360M-Instruct": LlmArch(960, 32, 15, 5, 2560, 49152, True),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": LlmArch(2048, 24, 32, 32, 8192, 49152, True),
}


@dataclass(frozen=True)
class Gpu:
    """A GPU kind: its name, dense bf16 tensor-core peak (fp32 accumulation) and memory."""

    name: str
    bf16_flops: float
    memory_gb: float


# Dense (no sparsity) bf16 peaks from NVIDIA's datasheets: H100/H200 (SXM), H100 PCIe and NVL, A100, L40S, L4, A10,
# RTX A6000; the Ada and Ampere GA102 whitepapers for the RTX 4090 and 3090 (bf16 with fp32 accumulation).
GPUS = {
    "h100": Gpu("NVIDIA H100 SXM", 989e12, 80),
    "h100-pcie": Gpu("NVIDIA H100 PCIe", 756e12, 80),
    "h100-nvl": Gpu("NVIDIA H100 NVL", 835e12, 94),
    "h200": Gpu("NVIDIA H200 SXM", 989e12, 141),
    "a100": Gpu("NVIDIA A100 80GB", 312e12, 80),
    "a100-40gb": Gpu("NVIDIA A100 40GB", 312e12, 40),
    "l40s": Gpu("NVIDIA L40S", 362e12, 48),
    "a6000": Gpu("NVIDIA RTX A6000", 155e12, 48),
    "l4": Gpu("NVIDIA L4", 121e12, 24),
    "a10": Gpu("NVIDIA A10", 125e12, 24),
    "rtx4090": Gpu("NVIDIA GeForce RTX 4090", 165e12, 24),
    "rtx3090": Gpu("NVIDIA GeForce RTX 3090", 71e12, 24),
}


# Targets-stage generation rates, tokens written per second, measured on one H200 with the transformers backend
# on Llama-3.1-8B shapes (bf16, 150-token prompts, 128 new tokens; issue #28, before token budgets): by setting.
TARGET_RATES = {
    "batch 16 (the old default)": 541,
    "batch 64": 1767,
    "batch 128": 2871,
    "batch 256": 5490,
    "static cache, batch 64": 2965,
}
# vLLM's offline throughput for Llama-3.1-8B (bf16) on one H100 as third-party benchmarks report it: a stated
# figure, not measured by desta (its vLLM backend has not run here).
VLLM_STATED_RATE = 12_500


@dataclass
class PlanConfig(TrainConfig):
    """Plan a training run without the weights: parameters, FLOPs per sample, memory per GPU, time and GPU-hours.

    Takes the training config (CONFIG.yaml plus key=value overrides) and the settings below.
    """

    gpus: int = 1
    """GPUs the run uses"""
    gpu: str = "h100"
    """GPU kind: h100, h100-pcie, h100-nvl, h200, a100, a100-40gb, l40s, a6000, l4, a10, rtx4090, rtx3090"""
    memory_gb: float | None = None
    """memory per GPU in GB; null: the GPU kind's"""
    hours_of_audio: float | None = None
    """training audio per epoch (with clip_seconds: the rows per epoch)"""
    samples: int | None = None
    """training rows per epoch, when hours_of_audio is null"""
    clip_seconds: float = 10.0
    """mean clip length; the encoder's input unless model.pad_to_30s"""
    tokens: int | None = None
    """sequence length per row, audio positions included; null: data.max_length"""
    teacher_tokens: int | None = None
    """sequence length of the text LLM's turn for optim.loss kl and on_policy; null: the same as tokens"""
    response_tokens: int = 150
    """labelled tokens per row (the answer and its end-of-turn token): the only positions the LM head projects in
    training (DeSTA2.5's answers: about 150 tokens)"""
    answers: int | None = None
    """answers the targets stage writes; null: the training rows per epoch (samples, or hours_of_audio /
    clip_seconds)"""
    answer_tokens: int = 150
    """mean tokens per generated answer (targets stage)"""
    mfu: float = 0.35
    """share of the GPUs' peak bf16 FLOP/s the run achieves (0.3-0.5 is usual for an 8B model)"""
    encoder_arch: dict[str, int] | None = None
    """Whisper architecture for an encoder the table lacks: d_model, encoder_layers, decoder_layers, heads, ffn,
    mel_bins, vocab"""
    llm_arch: dict[str, int] | None = None
    """LLM architecture for an LLM the table lacks: hidden, layers, heads, kv_heads, intermediate, vocab, tied"""

    def __post_init__(self) -> None:
        problems = []
        if self.gpu not in GPUS:
            problems.append(("gpu", f"unknown GPU kind {self.gpu!r}; choose one of {sorted(GPUS)} (or give "
                                    "memory_gb and the closest kind)"))
        if self.gpus < 1 or not 0 < self.mfu <= 1 or not self.clip_seconds > 0:
            problems.append(("gpus", f"gpus must be at least 1, mfu in (0, 1] and clip_seconds positive; got "
                                     f"{self.gpus}, {self.mfu}, {self.clip_seconds}"))
        if self.response_tokens < 1 or self.answer_tokens < 1 or (self.answers is not None and self.answers < 1):
            problems.append(("response_tokens", f"response_tokens, answer_tokens and answers must be at least 1; got "
                                                f"{self.response_tokens}, {self.answer_tokens}, {self.answers}"))
        raise_problems(problems)


# ----- architectures -----

def _read_config(folder: str) -> dict[str, Any] | None:
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def whisper_arch(name: str, given: dict[str, int] | None = None) -> WhisperArch:
    """The Whisper architecture of a config's model.encoder: given, a local folder's config.json, the table,
    or the tiny random model."""
    if given:
        return WhisperArch(**given)
    config = _read_config(name)
    if config is None and name == "tiny":
        from desta.model.tiny import tiny_whisper_config

        config = tiny_whisper_config().to_dict()
    if config is not None:
        return WhisperArch(config["d_model"], config["encoder_layers"], config["decoder_layers"],
                           config["encoder_attention_heads"], config["encoder_ffn_dim"], config["num_mel_bins"],
                           config["vocab_size"], config.get("max_target_positions", 448))
    if name not in WHISPER:
        raise ValueError(f"no architecture known for the encoder {name!r}; use one of {sorted(WHISPER)}, a local "
                         "folder, or give encoder_arch={d_model: ..., encoder_layers: ..., ...}")
    return WHISPER[name]


def llm_arch(name: str, given: dict[str, int] | None = None) -> LlmArch:
    """The LLM architecture of a config's model.llm: given, a local folder's config.json, the table, or the
    tiny random model."""
    if given:
        return LlmArch(**given)
    config = _read_config(name)
    if config is None and name == "tiny":
        from desta.model.tiny import tiny_llm_config, tiny_tokenizer

        config = tiny_llm_config(len(tiny_tokenizer())).to_dict()
    if config is not None:
        return LlmArch(config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
                       config.get("num_key_value_heads") or config["num_attention_heads"],
                       config["intermediate_size"], config["vocab_size"], bool(config.get("tie_word_embeddings")),
                       config.get("head_dim"))
    if name not in LLMS:
        raise ValueError(f"no architecture known for the LLM {name!r}; use one of {sorted(LLMS)}, a local folder, "
                         "or give llm_arch={hidden: ..., layers: ..., ...}")
    return LLMS[name]


# ----- parameters -----

def whisper_parameters(w: WhisperArch) -> dict[str, int]:
    """Parameters of WhisperForConditionalGeneration, encoder and decoder (the output projection is tied)."""
    d, f = w.d_model, w.ffn
    attention = 4 * d * d + 3 * d  # q, k, v, o; k has no bias
    block = 2 * d * f + f + d + 2 * 2 * d  # MLP and two LayerNorms
    encoder = (w.mel_bins * d * 3 + d) + (3 * d * d + d) + WINDOW_STEPS * d + w.encoder_layers * (attention + block) \
        + 2 * d
    decoder = (w.vocab * d + w.max_target_positions * d + w.decoder_layers * (2 * attention + block + 2 * d)
               + 2 * d)
    return {"encoder": encoder, "decoder": decoder}


def llm_layer_parameters(m: LlmArch) -> int:
    """Parameters of one Llama-style decoder layer."""
    q, kv = m.heads * m.dim_head, m.kv_heads * m.dim_head
    return m.hidden * (2 * q + 2 * kv) + 3 * m.hidden * m.intermediate + 2 * m.hidden


def llm_parameters(m: LlmArch) -> int:
    """Parameters of a Llama-style causal LM (embeddings, layers, final norm, untied output projection)."""
    return m.vocab * m.hidden * (1 if m.tied else 2) + m.layers * llm_layer_parameters(m) + m.hidden


def connector_parameters(d: int, taps: int, queries: int, layers: int, intermediate: int, llm_hidden: int,
                         query_layernorm: bool) -> int:
    """Parameters of desta's Q-Former connector: queries, layer mixing, Q-Former, LayerNorm and projection."""
    attention = 4 * d * d + 4 * d + 2 * d  # q, k, v, o with biases; the output LayerNorm
    ffn = 2 * d * intermediate + intermediate + d + 2 * d
    return (taps * queries * (d + 1) + (2 * d if query_layernorm else 0) + layers * (2 * attention + ffn)
            + 2 * d + d * llm_hidden + llm_hidden)


def lora_parameters(m: LlmArch, lora: dict[str, Any]) -> int:
    """Parameters LoRA adds: r (in + out) per target projection and layer."""
    q, kv = m.heads * m.dim_head, m.kv_heads * m.dim_head
    shapes = {"q_proj": (m.hidden, q), "k_proj": (m.hidden, kv), "v_proj": (m.hidden, kv), "o_proj": (q, m.hidden),
              "gate_proj": (m.hidden, m.intermediate), "up_proj": (m.hidden, m.intermediate),
              "down_proj": (m.intermediate, m.hidden)}
    return m.layers * sum(lora["r"] * sum(shapes[t]) for t in lora["target_modules"])


# ----- FLOPs (per sample) -----

def encoder_flops(w: WhisperArch, windows: int, steps: int, blocks: int) -> float:
    """Forward FLOPs of the Whisper encoder up to the last tapped block: convolutions, attention, MLP."""
    d = w.d_model
    convolutions = 2 * (w.mel_bins * 3) * d * (2 * steps) + 2 * (3 * d) * d * steps
    block = 2 * steps * 4 * d * d + 4 * steps * steps * d + 4 * steps * d * w.ffn
    return windows * (convolutions + blocks * block)


def connector_flops(d: int, taps: int, queries: int, layers: int, intermediate: int, steps: int, windows: int,
                    llm_hidden: int) -> dict[str, float]:
    """Connector FLOPs per sample: forward, and backward (the frames carry no gradient)."""
    q = queries
    with_input_grad = 2 * q * 4 * d * d + 2 * q * 2 * d * d + 4 * q * d * intermediate  # self qkvo, cross q/o, MLP
    frames = 2 * steps * 2 * d * d  # cross-attention keys and values of the frames
    attention = 4 * q * q * d + 4 * q * steps * d
    units = taps * windows * layers
    forward = units * (with_input_grad + frames + attention) + windows * 2 * q * d * llm_hidden
    backward = units * (2 * with_input_grad + frames + 2.5 * attention) + windows * 2 * 2 * q * d * llm_hidden
    return {"forward": forward, "backward": backward}


def llm_flops(m: LlmArch, tokens: int, projected: int | None = None) -> dict[str, float]:
    """LLM FLOPs per sequence, forward: the layers' projections and attention, the output projection of the
    `projected` positions (null: all), and what a checkpointed layer recomputes (all but its last product: a
    frozen layer's backward needs no output of it)."""
    q, kv = m.heads * m.dim_head, m.kv_heads * m.dim_head
    projections = 2 * tokens * (m.hidden * (2 * q + 2 * kv) + 3 * m.hidden * m.intermediate)
    attention = 4 * tokens * tokens * q
    down = 2 * tokens * m.intermediate * m.hidden
    head = 2 * (tokens if projected is None else projected) * m.hidden * m.vocab
    return {"projections": m.layers * projections, "attention": m.layers * attention,
            "head": head, "recompute": m.layers * (projections - down + attention)}


def sample_flops(w: WhisperArch, m: LlmArch, taps: list[int], queries: int, qformer_layers: int, intermediate: int,
                 tokens: int, response: int, windows: int, steps: int) -> dict[str, float]:
    """One training sample's useful FLOPs, by part: the frozen encoder's forward to the deepest tap, the connector's
    forward and backward, the frozen LLM's forward and its input-gradient backward over `tokens` positions (the LM
    head on the `response` positions that predict an answer token). No padding, no recompute: what model-FLOPs
    utilisation divides by the time (bench/gpu.py)."""
    connector = connector_flops(w.d_model, len(taps), queries, qformer_layers, intermediate, steps, windows, m.hidden)
    llm = llm_flops(m, tokens, response)
    return {"encoder": encoder_flops(w, windows, steps, max(taps) + 1),
            "connector": connector["forward"] + connector["backward"],
            "llm": llm["projections"] + llm["attention"] + llm["head"] + (
                llm["projections"] + 2.5 * llm["attention"] + llm["head"])}  # forward, and the input gradients


# ----- the plan -----

def _precision_bytes(config: TrainConfig) -> tuple[int, int]:
    """(bytes of the frozen weights, bytes of compute) for the config's dtype and precision on a GPU (auto: bf16;
    model.dtype auto: the precision's dtype)."""
    frozen = {"float32": 4, "bfloat16": 2, "float16": 2}[frozen_dtype(config.model.dtype, config.optim.precision,
                                                                      gpu=True)]
    compute = 4 if resolved_precision(config.optim.precision, gpu=True) == "fp32" else 2
    return frozen, compute


def plan(config: PlanConfig) -> Summary:
    """The plan's numbers: parameters, FLOPs per sample, memory per GPU by mode, fit, time."""
    from desta.model.modeling import default_tapped_layers

    model, optim = config.model, config.optim
    w, m = whisper_arch(model.encoder, config.encoder_arch), llm_arch(model.llm, config.llm_arch)
    gpu = GPUS[config.gpu]
    memory_gb = config.memory_gb or gpu.memory_gb
    taps = model.tapped_layers or default_tapped_layers(w.encoder_layers)
    intermediate = model.qformer_intermediate_size or 4 * w.d_model
    frozen_bytes, c = _precision_bytes(config)

    params = _parameters(config, w, m, taps, intermediate)
    trainable = params["connector"] + params["lora"]
    frozen = params["whisper_encoder"] + params["whisper_decoder"] + params["llm"]

    tokens = config.tokens or config.data.max_length
    windows = max(1, math.ceil(config.clip_seconds / 30))
    steps = WINDOW_STEPS if model.pad_to_30s else min(WINDOW_STEPS, math.ceil(
        config.clip_seconds / windows * STEPS_PER_SECOND))
    response = min(config.response_tokens, tokens - 1)
    work = sample_flops(w, m, taps, model.num_queries, model.qformer_layers, intermediate, tokens, response, windows,
                        steps)
    encoder, llm = work["encoder"], llm_flops(m, tokens, response)
    connector = connector_flops(w.d_model, len(taps), model.num_queries, model.qformer_layers, intermediate, steps,
                                windows, m.hidden)
    teacher = sampling = 0.0
    if optim.loss in ("kl", "on_policy"):
        teacher_llm = llm_flops(m, config.teacher_tokens or tokens, response)
        teacher = teacher_llm["projections"] + teacher_llm["attention"] + teacher_llm["head"]
    if optim.loss == "on_policy":  # the student's answer: a forward's FLOPs, spread over one decoding step a token
        sampling = llm["projections"] + llm["attention"] + llm["head"] + connector["forward"]
    cached = bool(config.data.feature_cache)
    per_sample = {"encoder": 0.0 if cached else encoder, "connector": work["connector"], "llm": work["llm"],
                  "teacher": teacher, "sampling": sampling, "checkpointing": llm["recompute"]}

    batch = optim.batch_size
    memory = {mode: memory_per_gpu(config, w, m, params, taps, intermediate, tokens, windows, steps, batch,
                                   frozen_bytes, c, mode) for mode in modes(config.gpus)}
    usable = memory_gb - CUDA_CONTEXT_GB
    largest = {mode: _largest_batch(config, w, m, params, taps, intermediate, tokens, windows, steps, frozen_bytes,
                                    c, mode, usable) for mode in modes(config.gpus)}

    samples = config.samples
    if samples is None and config.hours_of_audio:
        samples = round(config.hours_of_audio * 3600 / config.clip_seconds)
    per_step_samples = batch * optim.grad_accum * config.gpus
    time = _run_time(config, gpu, per_sample, samples, per_step_samples)
    cache_hours = (encoder * samples / (gpu.bf16_flops * config.mfu * config.gpus) / 3600
                   if cached and samples else None)
    result = {"encoder": model.encoder, "llm": model.llm, "gpu": gpu.name, "gpus": config.gpus, "memory_gb": memory_gb,
              "usable_gb": usable, "parameters": params, "trainable": trainable, "frozen": frozen,
              "tokens": tokens, "response_tokens": response, "windows": windows, "steps": steps, "taps": taps,
              "flops": per_sample, "encoder_forward": encoder, "cache_hours": cache_hours, "batch": batch,
              "memory": memory, "largest_batch": largest, "samples": samples, "epochs": optim.epochs,
              "per_step_samples": per_step_samples, "mfu": config.mfu, "time": time,
              "targets": _targets_time(config.answers or samples, config.answer_tokens)}
    return Summary(result, render_plan(result))


def _parameters(config: PlanConfig, w: WhisperArch, m: LlmArch, taps: list[int], intermediate: int) -> dict[str, int]:
    """Parameter counts by part: the connector and LoRA (trained), Whisper's encoder and decoder and the LLM."""
    from desta.model.modeling import DEFAULT_LORA

    model = config.model
    lora = {**DEFAULT_LORA, **model.lora} if model.lora else None
    whisper = whisper_parameters(w)
    return {"connector": connector_parameters(w.d_model, len(taps), model.num_queries, model.qformer_layers,
                                              intermediate, m.hidden, model.query_layernorm),
            "lora": lora_parameters(m, lora) if lora else 0,
            "whisper_encoder": whisper["encoder"], "whisper_decoder": whisper["decoder"], "llm": llm_parameters(m)}


def _run_time(config: PlanConfig, gpu: Gpu, per_sample: dict[str, float], samples: int | None,
              per_step_samples: int) -> dict[str, dict]:
    """Step time, steps, hours and GPU-hours of the run, without and with activation checkpointing."""
    optim = config.optim
    time = {}
    for checkpointing in (False, True):
        flops = sum(v for k, v in per_sample.items() if k != "checkpointing") + (
            per_sample["checkpointing"] if checkpointing else 0)
        step_seconds = flops * optim.batch_size * optim.grad_accum / (gpu.bf16_flops * config.mfu)
        total_steps = optim.max_steps if optim.max_steps > 0 else (
            math.ceil(samples / per_step_samples * optim.epochs) if samples else None)
        hours = total_steps * step_seconds / 3600 if total_steps else None
        time["checkpointing" if checkpointing else "plain"] = {
            "flops_per_sample": flops, "step_seconds": step_seconds, "steps": total_steps, "hours": hours,
            "gpu_hours": hours * config.gpus if hours else None}
    return time


def _targets_time(answers: int | None, answer_tokens: int) -> dict[str, Any]:
    """The targets stage's tokens to generate for `answers`, and the hours each measured rate needs for them."""
    generated = answers * answer_tokens if answers else None
    return {"answers": answers, "tokens": generated,
            "hours": {name: generated / rate / 3600 for name, rate in TARGET_RATES.items()} if generated else None,
            "vllm_hours": generated / VLLM_STATED_RATE / 3600 if generated else None}


def modes(gpus: int) -> tuple[str, ...]:
    """The ways to run on `gpus` GPUs: DDP and FSDP on several, plain on one; each with and without checkpointing."""
    kinds = ("ddp", "fsdp") if gpus > 1 else ("1 gpu",)
    return tuple(f"{kind}{suffix}" for kind in kinds for suffix in ("", "+checkpointing"))


def activation_bytes(w: WhisperArch, m: LlmArch, taps: int, queries: int, qformer_layers: int, intermediate: int,
                     tokens: int, windows: int, steps: int, c: int, checkpointing: bool,
                     projected: int | None = None) -> dict[str, float]:
    """Bytes of one sample's activations at the peak (the start of the backward pass), by part: what autograd
    saves (llm, connector, loss) and what lives beside it (the logits and their gradient, the layer being
    recomputed). The frozen encoder runs without gradients before them: its taps are the connector's frames.
    The LM head projects `projected` positions (null: all `tokens`)."""
    projected = tokens if projected is None else projected
    q, kv = m.heads * m.dim_head, m.kv_heads * m.dim_head
    layer = 8 * m.hidden + 8 + c * (2 * q + 2 * kv + 3 * m.intermediate) + 4 * m.heads  # per token
    d = w.d_model
    return {
        "llm": tokens * m.layers * (c * m.hidden if checkpointing else layer),
        "connector": c * taps * windows * ((1 + 2 * qformer_layers) * steps * d
                                           + qformer_layers * queries * (14 * d + 2 * intermediate)),
        # the final norm's fp32 input (every token); the head's input and the fp32 log-probabilities (projected ones)
        "loss": tokens * (4 * m.hidden + 4) + projected * (4 * m.vocab + c * m.hidden),
        "logits": projected * m.vocab * (c + 8),  # the logits; in the backward pass their gradient and a temporary
        "recompute": tokens * layer if checkpointing else 0,
    }


def memory_per_gpu(config: PlanConfig, w: WhisperArch, m: LlmArch, params: dict[str, int], taps: list[int],
                   intermediate: int, tokens: int, windows: int, steps: int, batch: int, frozen_bytes: int, c: int,
                   mode: str) -> dict[str, float]:
    """GB per GPU for one of `modes`, by part."""
    trainable = params["connector"] + params["lora"]
    frozen = params["whisper_encoder"] + params["whisper_decoder"] + params["llm"]
    shards = config.gpus if mode.startswith("fsdp") else 1
    weights = (frozen * frozen_bytes + trainable * 4) / shards
    states = trainable * (4 + 8) / shards + (trainable * 4 if mode.startswith("ddp") else 0)  # grads, AdamW, DDP bucket
    autocast_copy = trainable * 2 if c == 2 else 0
    # float32 frozen weights under 16-bit autocast: each LLM product casts its weight, and autograd keeps the copy for
    # the input gradient (autocast caches no cast of a frozen weight); checkpointed, only the recomputed layer's. FSDP
    # gathers its parameters in 16 bits itself (its mixed-precision policy): nothing cast.
    cast_frozen = 0.0
    if frozen_bytes == 4 and c == 2 and shards == 1:
        layers = 1 if mode.endswith("checkpointing") else m.layers
        cast_frozen = 2 * (layers * (llm_layer_parameters(m) - 2 * m.hidden) + m.vocab * m.hidden)
    gathered = 0.0
    if shards > 1:  # FSDP: the root unit, two LLM layers in flight, the output projection
        d = w.d_model
        root = params["whisper_decoder"] + (w.mel_bins * 3 * d + 3 * d * d + WINDOW_STEPS * d) + trainable
        gathered = (root + 2 * llm_layer_parameters(m) + m.vocab * m.hidden) * frozen_bytes
    acts = activation_bytes(w, m, len(taps), config.model.num_queries, config.model.qformer_layers, intermediate,
                            tokens, windows, steps, c, mode.endswith("checkpointing"),
                            min(config.response_tokens, tokens - 1))
    parts = {"weights": weights, "gradients_and_adamw": states + autocast_copy,
             **({"autocast_weight_copies": cast_frozen} if frozen_bytes == 4 and c == 2 else {}),
             **({"fsdp_gathered": gathered} if config.gpus > 1 else {}),
             **{f"activations_{k}": v * batch for k, v in acts.items()}}
    parts = {k: v / GB for k, v in parts.items()}
    parts["total"] = sum(parts.values()) + CUDA_CONTEXT_GB
    return parts


def _largest_batch(config: PlanConfig, w: WhisperArch, m: LlmArch, params: dict[str, int], taps: list[int],
                   intermediate: int, tokens: int, windows: int, steps: int, frozen_bytes: int, c: int, mode: str,
                   usable_gb: float) -> int:
    """The largest batch per GPU whose memory fits (0: not even one row)."""
    one = memory_per_gpu(config, w, m, params, taps, intermediate, tokens, windows, steps, 1, frozen_bytes, c, mode)
    two = memory_per_gpu(config, w, m, params, taps, intermediate, tokens, windows, steps, 2, frozen_bytes, c, mode)
    per_row = two["total"] - one["total"]
    fixed = one["total"] - per_row - CUDA_CONTEXT_GB
    return max(0, math.floor((usable_gb - fixed) / per_row))


# ----- report -----

def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _flops(n: float) -> str:
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.2f} GFLOP"


def render_plan(result: dict[str, Any]) -> str:
    """The plan as the text `desta plan` prints."""
    p, f = result["parameters"], result["flops"]
    lines = [f"{result['encoder']} + {result['llm']} on {result['gpus']} x {result['gpu']} "
             f"({result['memory_gb']:g} GB, {CUDA_CONTEXT_GB:g} GB of it for the CUDA context)",
             f"parameters: trainable {_count(result['trainable'])} (connector {_count(p['connector'])}, LoRA "
             f"{_count(p['lora'])}); frozen {_count(result['frozen'])} (Whisper encoder {_count(p['whisper_encoder'])},"
             f" Whisper decoder {_count(p['whisper_decoder'])} kept for transcription, LLM {_count(p['llm'])})",
             f"per sample ({result['tokens']} tokens; {result['windows']} window(s) of {result['steps']} encoder "
             f"steps, taps {result['taps']}): encoder {_flops(result['encoder_forward'])} forward"
             + (" (cached: once per clip, not per step)" if f["encoder"] == 0 else "")
             + f", connector {_flops(f['connector'])}, LLM {_flops(f['llm'])}"
             + (f", text LLM teacher {_flops(f['teacher'])}" if f["teacher"] else "")
             + (f", sampling the answer {_flops(f['sampling'])} (decoding is memory-bound: slower than its FLOPs "
                "say)" if f["sampling"] else "")
             + f"; checkpointing adds {_flops(f['checkpointing'])}",
             "", f"memory per GPU, GB, at batch {result['batch']}:",
             f"{'':24}" + "".join(f"{mode:>20}" for mode in result["memory"])]
    rows = list(next(iter(result["memory"].values())))
    for row in rows:
        lines.append(f"{row:24}" + "".join(f"{result['memory'][mode][row]:20.1f}" for mode in result["memory"]))
    fits = ["yes" if result["memory"][mode]["total"] <= result["memory_gb"] else "no" for mode in result["memory"]]
    lines.append(f"{'fits':24}" + "".join(f"{answer:>20}" for answer in fits))
    lines.append(f"{'largest batch that fits':24}" + "".join(f"{result['largest_batch'][mode]:20d}"
                                                             for mode in result["memory"]))
    lines.append("")
    for name, t in result["time"].items():
        head = f"time, {'with' if name == 'checkpointing' else 'without'} checkpointing: " \
               f"{_flops(t['flops_per_sample'])} per sample, {t['step_seconds']:.2f} s per step of " \
               f"{result['batch']} per GPU at MFU {result['mfu']:g}"
        if t["steps"]:
            head += (f"; {t['steps']:,} steps ({result['per_step_samples']} samples each) = {t['hours']:.1f} h "
                     f"= {t['gpu_hours']:,.0f} GPU-hours")
        lines.append(head)
    if result["time"]["plain"]["steps"] is None:
        lines.append("give --hours-of-audio or --samples (rows per epoch) for the run's length")
    if result["cache_hours"]:
        lines.append(f"feature cache: the encoder runs once per clip first, {result['cache_hours']:.1f} h")
    lines += ["", *render_targets(result["targets"])]
    return "\n".join(lines)


def render_targets(targets: dict[str, Any]) -> list[str]:
    """The targets stage's lines of the plan: tokens to generate and the hours at each generation rate."""
    if not targets["tokens"]:
        return ["targets stage: give --answers, --samples or --hours-of-audio for the tokens to generate"]
    lines = [f"targets stage: {targets['answers']:,} answers x {targets['tokens'] // targets['answers']} tokens = "
             f"{targets['tokens'] / 1e6:,.0f} M tokens to generate; GPU-hours at the rates measured on one H200 "
             "(transformers backend, Llama-3.1-8B shapes, 150-token prompts):"]
    lines += [f"  {name:28} {TARGET_RATES[name]:>7,} tokens/s  {hours:8,.1f} h" for name, hours in
              targets["hours"].items()]
    lines.append(f"  {'vLLM (stated, not measured)':28} {VLLM_STATED_RATE:>7,} tokens/s  "
                 f"{targets['vllm_hours']:8,.1f} h  (third-party figure for one H100; desta's vLLM backend is "
                 "untested)")
    return lines
