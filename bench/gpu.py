"""GPU bench: training steps of the speech LLM and the targets stage's generation at named shapes, random
weights (no download), in one run under a time budget.

    python bench/gpu.py --shapes desta25 --time-budget 240    # one H200: about 4 minutes
    python bench/gpu.py --device cpu --small                   # the same code on tiny shapes (tests run it)

It runs desta's own parts (desta.model.parts: encoder taps, Q-Former connector, LLM forward with labelled
logits or packed rows; desta.core.generation: the generation backends) on models built from configs, with
desta installed (`pip install -e .`). Order:
1. checks, cheap ones first: the loss from the response positions' logits equals the loss from every
   position's; each packed sample's loss equals its unpacked loss.
2. training steps on one batch drawn from a realistic length mix (clips 1-30 s, answers 20-200 tokens),
   the connector in fp32 under bf16 autocast, frozen encoder and LLM in bf16, AdamW:
     padded         encoder windows padded to 30 s, logits at every position (the papers; desta before #28)
     real           real-length windows, logits at every position
     logits         real length, logits at the response positions only (desta's training now)
     checkpointing  as logits, the LLM's layers checkpointed
     packing        as logits, the batch packed into rows of --pack-length tokens (block-diagonal attention)
   then `logits` at growing batches up to the largest that fits. Each prints samples/s, real tokens/s, the
   padding share, peak GiB and two utilisations against the GPU's nominal dense bf16 peak (desta.train.plan.GPUS,
   by the device's name: an H100 PCIe's 756 TFLOP/s is not an H100 SXM's 989): MFU, model FLOPs utilisation, the
   useful work (desta plan's FLOPs per sample, `sample_flops`, at each sample's real length: no padding, no
   recompute) per second; and the executed FLOPs (torch.utils.flop_counter on the step itself, padding and
   recompute included) per second. Both also against a bf16 matrix product timed in the same run.
3. packing against duration-grouped padding: one pass over --epoch samples of the length mix as padded
   batches grouped by duration, packed batches, and packed batches grouped by duration: real tokens/s and
   the padding share of the LLM's positions and of the encoder's frames.
4. generation, tokens/s: prompts of 120-180 random tokens, 128 new tokens each (end of turn switched off:
   every row writes them all), greedy; the transformers backend in batches of 16, 64 and 256 prompts, at the
   token budget sized from free memory, with the static cache at that budget, and with continuous batching (the
   default on a GPU); and vLLM's engine on the same random weights (load_format="dummy") where vLLM is installed.
Each part is skipped, and says so, when the time budget would not hold it. One JSON line last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import transformers
from torch.utils import flop_counter
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from desta.core.generation import SamplingSettings, TransformersBackend
from desta.core.sequences import IGNORE_INDEX
from desta.model.packing import balance_rows, pack_rows, padding_share
from desta.model.parts import QFormerConnector, lm_forward, merge_audio, tapped_states
from desta.model.tiny import tiny_tokenizer
from desta.train.plan import GPUS, LlmArch, WhisperArch, sample_flops

AUDIO_ID = 0  # placeholder id: random text tokens are drawn from 10 up, so only audio positions hold 0
FRAMES_PER_SECOND = 100  # mel frames per second of audio (hop of 10 ms)
WINDOW_FRAMES = 3000  # one 30 s window
STATIC_COMPILE_S = 120  # what the time budget sets aside for compiling an 8B model's decoding step (static cache)
PARTS = ("train", "epoch", "generation")
# A CUDA device's name -> its kind in desta.train.plan.GPUS (which holds the dense bf16 peaks), most specific first:
# "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are not the SXM card ("NVIDIA H100 80GB HBM3"), nor an A100 an A10.
DEVICE_KINDS = (("H100 PCIe", "h100-pcie"), ("H100 NVL", "h100-nvl"), ("H100", "h100"), ("H200", "h200"),
                ("A100", "a100"), ("A10", "a10"), ("L40S", "l40s"), ("L4", "l4"), ("A6000", "a6000"),
                ("4090", "rtx4090"), ("3090", "rtx3090"))


def attention_flops(query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...], *_: Any, **__: Any) -> int:
    """FLOPs of scaled dot-product attention from the shapes (batch, heads, seq, width) of query, key and value:
    scores and output, counted on the query's heads (grouped-query kernels broadcast the key/value heads)."""
    batch, heads, queries, width = query
    return 2 * batch * heads * queries * key[2] * (width + value[3])


def attention_backward_flops(grad: tuple[int, ...], query: tuple[int, ...], key: tuple[int, ...],
                             value: tuple[int, ...], *_: Any, **__: Any) -> int:
    """The backward pass: the scores again and four more products, 2.5 times the forward (as PyTorch counts it)."""
    return round(2.5 * attention_flops(query, key, value))


# The flop counter's own attention formulas reject grouped-query shapes before PyTorch 2.12 and do not know the CPU
# kernel: these count every SDPA kernel the same way.
ATTENTION_OPS = {name: attention_backward_flops if name.endswith("_backward") else attention_flops for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")}
ATTENTION = {getattr(torch.ops.aten, name): formula for name, formula in ATTENTION_OPS.items()
             if hasattr(torch.ops.aten, name)}


@dataclass(frozen=True)
class Shapes:
    """A named set-up: the encoder's and the LLM's configs, the connector, and the run's sizes."""

    whisper: dict[str, Any]
    llm: dict[str, Any]
    taps: tuple[int, ...]
    qformer_layers: int
    qformer_intermediate: int
    query_layernorm: bool
    batch: int = 12  # samples per step (DeSTA2.5: 12 per GPU)
    pack_length: int = 1024  # tokens per packed row
    queries: int = 64


LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
SHAPES = {
    # Whisper large-v3 encoder + Llama-3.1-8B, 6-layer Q-Former as the DeSTA2.5 release
    "desta25": Shapes(dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                           num_mel_bins=128), LLAMA3_8B, (7, 15, 23, 31), 6, 3072, False),
    # Whisper small + Llama-3-8B, 2-layer Q-Former (DeSTA2)
    "desta2": Shapes(dict(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072,
                          num_mel_bins=80), LLAMA3_8B, (2, 5, 8, 11), 2, 3072, True),
    # Whisper tiny.en + SmolLM2-135M-Instruct, desta's small real set-up
    "smol": Shapes(dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                        num_mel_bins=80), dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                               num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                               tie_word_embeddings=True), (0, 1, 2, 3), 2, 1536, True),
}
# --small: every code path on a CPU in seconds (the sequences as long as the real ones: 64 queries a window)
SMALL = Shapes(dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=80),
               dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=512), (0, 1), 1, 128, False, batch=4)


class Clock:
    """The run's time budget: what is left, and whether a part that needs `seconds` still fits."""

    def __init__(self, budget: float):
        self.start, self.budget = time.perf_counter(), budget

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def fits(self, seconds: float, what: str) -> bool:
        if self.left() >= seconds:
            return True
        print(f"skipped {what}: {self.left():.0f} s left of the time budget, it needs about {seconds:.0f} s")
        return False


# ----- models -----

@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in `dtype` (an 8B model never exists in fp32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build(shapes: Shapes, device: str, dtype: torch.dtype) -> SimpleNamespace:
    """Random-weight encoder (frozen), connector (trainable, fp32) and LLM (frozen), on the device."""
    whisper_config = WhisperConfig(**shapes.whisper, max_source_positions=1500)
    llm_config = LlamaConfig(**shapes.llm)
    for config in (whisper_config, llm_config):
        config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        encoder = WhisperEncoder(whisper_config).eval().requires_grad_(False)
        llm = LlamaForCausalLM(llm_config).eval().requires_grad_(False)
    connector_config = SimpleNamespace(
        encoder_config=whisper_config, text_config=llm_config, tapped_layers=list(shapes.taps),
        num_queries=shapes.queries, query_init_std=1.0, qformer_layers=shapes.qformer_layers, qformer_heads=None,
        qformer_intermediate_size=shapes.qformer_intermediate, qformer_dropout=0.1, qformer_init="pytorch",
        query_layernorm=shapes.query_layernorm)
    with torch.device(device):
        connector = QFormerConnector(connector_config).float()
    return SimpleNamespace(encoder=encoder, connector=connector, llm=llm, taps=list(shapes.taps),
                           optimizer=torch.optim.AdamW(connector.parameters(), lr=1e-4))


# ----- data -----

def length_mix(count: int, queries: int, seed: int = 0) -> list[dict[str, int]]:
    """Samples as the DeSTA2.5 data has them: clips of 1-30 s (one window), a transcript of about 3 tokens a
    second (at most 100), answers of 20-200 tokens, about 40 tokens of chat template, system turn and prompt."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        seconds = float(rng.uniform(1, 30))
        transcript = min(100, round(3 * seconds))
        answer = int(rng.integers(20, 201))
        samples.append({"frames": 2 * round(seconds * FRAMES_PER_SECOND / 2), "head": 30, "audio": queries,
                        "transcript": transcript, "tail": 10, "answer": answer + 1})  # + the end-of-turn token
    return samples


def sample_tokens(sample: dict[str, int], vocab: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Random ids and labels of one sample: template and system turn, audio placeholders, transcript, prompt,
    answer; labels on the answer (and end of turn) only."""
    def words(n: int) -> list[int]:
        return rng.integers(10, vocab, n).tolist()

    ids = words(sample["head"]) + [AUDIO_ID] * sample["audio"] + words(sample["transcript"] + sample["tail"])
    answer = words(sample["answer"])
    return ids + answer, [IGNORE_INDEX] * len(ids) + answer


def make_batch(samples: list[dict[str, int]], vocab: int, device: str, padded_audio: bool, pack_length: int | None,
               mel_bins: int) -> dict[str, Any]:
    """One training batch: ids, labels, masks (padded rows, or packed rows with position ids), mel features at
    real length or padded to 30 s, and the spans (row, start, end) of each sample for per-sample losses."""
    rng = np.random.default_rng(1)
    tokens = [sample_tokens(s, vocab, rng) for s in samples]
    lengths = [len(ids) for ids, _ in tokens]
    rows = balance_rows(lengths, pack_length) if pack_length else [[i] for i in range(len(samples))]
    order = [i for row in rows for i in row]  # the audio windows follow the samples' order in the rows
    batch = pack_rows(tokens, rows, pad_id=1)
    spans = {}
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            spans[i] = (r, start, start + lengths[i])
            start += lengths[i]
    if not pack_length:
        del batch["position_ids"]  # rows of one sample: plain padded rows
    frames = WINDOW_FRAMES if padded_audio else max(s["frames"] for s in samples)
    mask = torch.zeros(len(samples), frames, dtype=torch.long)
    for k, i in enumerate(order):
        mask[k, : WINDOW_FRAMES if padded_audio else samples[i]["frames"]] = 1
    features = torch.randn(len(samples), mel_bins, frames) * mask[:, None, :]
    batch.update(input_features=features, feature_attention_mask=mask)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["spans"] = [spans[i] for i in range(len(samples))]
    batch["tokens"] = sum(lengths)
    return batch


# ----- one training step -----

def forward(m: SimpleNamespace, batch: dict[str, Any], logits_at: str):
    """The speech LLM's forward pass, as DestaModel.forward runs it: taps -> connector -> placeholders -> LLM."""
    states, step_mask = tapped_states(m.encoder, m.taps, batch["input_features"], batch["feature_attention_mask"])
    kind = states.device.type  # the frames cast once, to autocast's dtype, as DestaModel.embed_audio casts them
    states = states.to(torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32)
    audio = m.connector(states, step_mask)  # (windows, queries, hidden)
    embeds = merge_audio(m.llm.get_input_embeddings()(batch["input_ids"]), batch["input_ids"], AUDIO_ID, audio)
    return lm_forward(m.llm, embeds, batch["attention_mask"], batch["labels"], batch.get("position_ids"), logits_at,
                      use_cache=False)


def autocast(m: SimpleNamespace, device: str):
    """bf16 autocast where the frozen weights are bf16 (the trainable connector stays fp32), as training runs."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=m.llm.dtype == torch.bfloat16)


def train_step(m: SimpleNamespace, batch: dict[str, Any], logits_at: str, device: str) -> None:
    with autocast(m, device):
        loss = forward(m, batch, logits_at).loss
    loss.backward()
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)


def model_flops(shapes: Shapes, samples: list[dict[str, int]]) -> float:
    """The useful work of a training step on these samples: desta plan's FLOPs per sample (`sample_flops`) at each
    sample's real length (its tokens, its answer's positions, its encoder steps), summed."""
    w, m = shapes.whisper, shapes.llm
    whisper = WhisperArch(w["d_model"], w["encoder_layers"], 0, w["encoder_attention_heads"], w["encoder_ffn_dim"],
                          w["num_mel_bins"], 0)
    llm = LlmArch(m["hidden_size"], m["num_hidden_layers"], m["num_attention_heads"], m["num_key_value_heads"],
                  m["intermediate_size"], m["vocab_size"], m.get("tie_word_embeddings", False))
    total = 0.0
    for s in samples:
        tokens = s["head"] + s["audio"] + s["transcript"] + s["tail"] + s["answer"]
        total += sum(sample_flops(whisper, llm, list(shapes.taps), shapes.queries, shapes.qformer_layers,
                                  shapes.qformer_intermediate, tokens, s["answer"], 1, s["frames"] // 2).values())
    return total


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(m: SimpleNamespace, batch: dict[str, Any], logits_at: str, device: str, steps: int) -> dict[str, float]:
    """One step under the flop counter (it also warms up), then `steps` timed steps: their rates and peak memory, the
    executed FLOPs per step (the counter's) and the useful ones (batch["model_flops"])."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=ATTENTION) as counter:
        train_step(m, batch, logits_at, device)
    flops = counter.get_total_flops()
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(m, batch, logits_at, device)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    rows = batch["input_ids"].shape[0]
    return {"step_s": seconds, "samples_per_s": len(batch["spans"]) / seconds,
            "tokens_per_s": batch["tokens"] / seconds, "padding_share": padding_share(batch["attention_mask"]),
            "rows": rows, "width": batch["input_ids"].shape[1],
            "tflop_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
            "model_tflop_per_step": batch["model_flops"] / 1e12, "model_tflops": batch["model_flops"] / seconds / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}


def epoch_comparison(m: SimpleNamespace, shapes: Shapes, device: str, count: int) -> dict[str, dict[str, float]]:
    """`count` samples of the length mix, one pass in batches of shapes.batch samples, three ways: padded rows with
    batches grouped by duration (desta's data.group_by_duration), packed rows from batches in random order, and
    packed rows with batches grouped by duration. Real tokens per second, and the padding share of the LLM's
    positions and of the encoder's frames."""
    samples = length_mix(count, shapes.queries, seed=3)
    by_duration = sorted(range(count), key=lambda i: samples[i]["frames"])
    shuffled = np.random.default_rng(4).permutation(count).tolist()
    variants = {"padded, grouped by duration": (by_duration, None), "packed": (shuffled, shapes.pack_length),
                "packed, grouped by duration": (by_duration, shapes.pack_length)}
    vocab, bins = shapes.llm["vocab_size"], shapes.whisper["num_mel_bins"]
    results = {}
    for name, (order, pack_length) in variants.items():
        batches = [make_batch([samples[i] for i in order[start : start + shapes.batch]], vocab, device, False,
                              pack_length, bins) for start in range(0, count, shapes.batch)]
        train_step(m, batches[0], "labelled", device)  # warm-up for this variant's shapes
        synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            train_step(m, batch, "labelled", device)
        synchronize(device)
        seconds = time.perf_counter() - start
        positions = sum(b["attention_mask"].numel() for b in batches)
        frames = sum(b["feature_attention_mask"].numel() for b in batches)
        tokens = sum(b["tokens"] for b in batches)
        real_frames = sum(int(b["feature_attention_mask"].sum()) for b in batches)
        r = results[name] = {"tokens_per_s": tokens / seconds, "samples_per_s": count / seconds, "steps": len(batches),
                             "padding_share": 1 - tokens / positions, "frame_padding_share": 1 - real_frames / frames}
        print(f"  {name:28} {r['tokens_per_s']:10,.0f} tokens/s, {r['samples_per_s']:7.2f} samples/s; padding: "
              f"{r['padding_share']:.0%} of the LLM's positions, {r['frame_padding_share']:.0%} of the encoder's "
              "frames", flush=True)
    return results


# ----- checks -----

def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """Summed cross-entropy of each sample (row, start, end) from full logits (rows, seq, vocab)."""
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                                     ignore_index=IGNORE_INDEX, reduction="none")  # (rows, seq - 1)
    return torch.stack([token_losses[r, start : end - 1].sum() for r, start, end in spans])


@torch.no_grad()
def checks(m: SimpleNamespace, samples: list[dict[str, int]], shapes: Shapes, device: str) -> dict[str, float]:
    """Relative differences: the labelled-logits loss against the full-logits loss; packed against unpacked
    per-sample losses (the connector without dropout, so both passes see the same audio vectors)."""
    vocab, bins = shapes.llm["vocab_size"], shapes.whisper["num_mel_bins"]
    m.connector.eval()
    padded = make_batch(samples, vocab, device, False, None, bins)
    packed = make_batch(samples, vocab, device, False, shapes.pack_length, bins)
    with autocast(m, device):
        full = forward(m, padded, "all")
        labelled = forward(m, padded, "labelled")
        alone = per_sample_losses(full.logits, padded["labels"], padded["spans"])
        together = per_sample_losses(forward(m, packed, "all").logits, packed["labels"], packed["spans"])
    m.connector.train()
    return {"labelled_vs_all_loss": abs(labelled.loss.item() - full.loss.item()) / full.loss.item(),
            "packed_vs_unpacked_sample_loss": ((together - alone).abs() / alone).max().item()}


# ----- generation -----

def generation_rates(llm: LlamaForCausalLM, device: str, clock: Clock, small: bool) -> dict[str, dict[str, float]]:
    """Tokens/s of the transformers backend by batch setting (continuous batching included), on prompts of 120-180
    random tokens."""
    rng = np.random.default_rng(2)
    vocab = llm.config.vocab_size
    new_tokens = 8 if small else 128
    lengths = (12, 18) if small else (120, 180)
    settings = SamplingSettings(max_new_tokens=new_tokens)
    tokenizer = tiny_tokenizer()  # end-of-turn and padding ids; prompts are random ids of the LLM's vocabulary
    llm.generation_config.eos_token_id = None  # random weights: no end of turn, every row writes max_new_tokens
    cpu_budget = 4 * (lengths[1] + new_tokens)
    free = f"; {torch.cuda.mem_get_info(torch.device(device))[0] / 2**30:.0f} GiB free beside the LLM's weights" \
        if device.startswith("cuda") else ""
    print(f"generation (transformers backend, greedy, {new_tokens} new tokens per prompt{free}):")
    setups = [("batch 16", {"batch_size": 16}), ("batch 64", {"batch_size": 64}), ("batch 256", {"batch_size": 256}),
              ("token budget (default)", {"token_budget": "memory" if device.startswith("cuda") else cpu_budget}),
              ("static cache, token budget", {"token_budget": "memory" if device.startswith("cuda") else cpu_budget,
                                              "cache": "static"}),
              ("continuous batching", {"continuous": True, "token_budget": None if device.startswith("cuda")
                                       else 4 * cpu_budget})]
    results: dict[str, dict[str, float]] = {}
    warm = TransformersBackend(llm=llm, tokenizer=tokenizer, batch_size=2, device=device)
    warm.generate_ids([[11] * 8, [12] * 8], SamplingSettings(max_new_tokens=2))
    for name, kwargs in setups:
        backend = TransformersBackend(llm=llm, tokenizer=tokenizer, device=device, **kwargs)
        backend.eos_ids = set()  # the tokenizer's end ids are random tokens of this LLM: none ends an answer
        rows = backend.token_budget // (lengths[1] + new_tokens) if backend.token_budget else backend.batch_size
        if backend.continuous:  # one call, as the targets stage makes: as many prompts as four budgets' batches
            rows = 16 if small else 1024
        static = backend.cache == "static"
        parts = 2 if static else 1  # a static cache compiles on its first batch: time the second
        if not clock.fits(parts * generation_seconds(rows, lengths[1], new_tokens, llm, small)
                          + (STATIC_COMPILE_S if static and not small else 0), f"generation, {name}"):
            continue
        prompts = [rng.integers(10, vocab, int(rng.integers(*lengths))).tolist() for _ in range(parts * rows)]
        timings = []
        try:
            for part in range(parts):
                synchronize(device)
                start = time.perf_counter()
                out = backend.generate_ids(prompts[part * rows : (part + 1) * rows], settings)
                synchronize(device)
                timings.append((time.perf_counter() - start, sum(len(ids) for ids in out)))
        except Exception as error:  # a setting that fails here (a compile, memory) is reported, not fatal
            print(f"  {name:28} failed: {type(error).__name__}: {str(error)[:300]}")
            results[name] = {"failed": 1.0}
            continue
        seconds, tokens = timings[-1]
        results[name] = {"tokens_per_s": tokens / seconds, "rows_per_batch": rows, "seconds": seconds,
                         **({"first_batch_s": timings[0][0]} if static else {})}
        print(f"  {name:28} {rows:5d} {'prompts per call' if backend.continuous else 'rows per batch'}: "
              f"{tokens / seconds:9,.0f} tokens/s" + (f" (first batch, compiling: {timings[0][0]:.0f} s)" if static
                                                       else ""), flush=True)
    return results


def vllm_rate(config: LlamaConfig, device: str, clock: Clock, small: bool) -> dict[str, float] | None:
    """Tokens/s of vLLM's offline engine on random weights of the same config (load_format="dummy": no download),
    the same prompt and answer lengths; None, said, where vLLM is not installed or cannot run. Untested: no
    machine desta has measured on had vLLM."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("vllm") is None or not device.startswith("cuda"):
        print("  vLLM: not installed here (or no GPU): no figure")
        return None
    rows, new_tokens = (16, 8) if small else (1024, 128)
    if not clock.fits(60 + generation_seconds(rows, 180, new_tokens, None, small), "generation, vLLM"):
        return None
    try:
        from vllm import LLM, SamplingParams

        rng = np.random.default_rng(2)
        prompts = [{"prompt_token_ids": rng.integers(10, config.vocab_size, int(rng.integers(120, 181))).tolist()}
                   for _ in range(rows)]
        with tempfile.TemporaryDirectory() as folder:
            config.save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)  # never decodes: detokenize=False
            engine = LLM(model=folder, load_format="dummy", dtype="bfloat16", max_model_len=512, seed=0,
                         gpu_memory_utilization=0.85)
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
            engine.generate(prompts[:2], params, use_tqdm=False)  # warm-up
            start = time.perf_counter()
            outputs = engine.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    except Exception as error:  # reported, not fatal: the rest of the run stands
        print(f"  vLLM: failed: {type(error).__name__}: {str(error)[:300]}")
        return {"failed": 1.0}
    print(f"  {'vLLM (offline engine)':28} {rows:5d} prompts per call: {tokens / seconds:9,.0f} tokens/s", flush=True)
    return {"tokens_per_s": tokens / seconds, "prompts": rows, "seconds": seconds}


def generation_seconds(rows: int, prompt: int, new_tokens: int, llm: LlamaForCausalLM | None, small: bool) -> float:
    """A rough time for one generate batch on an H200 (or a CPU with --small): the prompt's FLOPs at 500 TFLOP/s,
    then each step reading the weights (4 TB/s; 8 B of them when `llm` is None) plus about 30 ms of Python and 30 us
    per row."""
    if small:
        return 0.5 + rows * new_tokens * 1e-3
    parameters = sum(p.numel() for p in llm.parameters()) if llm is not None else 8e9
    prefill = 2 * parameters * rows * prompt / 5e14
    return prefill + new_tokens * (2 * parameters / 4e12 + 0.03 + 3e-5 * rows)


# ----- the run -----

def matmul_tflops(device: str) -> float:
    """A square bf16 matrix product's rate on this device (fp32 on a CPU), TFLOP/s: the attainable peak."""
    n, dtype = (8192, torch.bfloat16) if device.startswith("cuda") else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    return 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12


def peak_of(name: str) -> float | None:
    """A CUDA device name's dense bf16 datasheet peak in FLOP/s (desta.train.plan.GPUS), None for a GPU it does not
    know.

    >>> peak_of("NVIDIA H100 PCIe") / 1e12, peak_of("NVIDIA H100 80GB HBM3") / 1e12, peak_of("NVIDIA B200")
    (756.0, 989.0, None)
    """
    return next((GPUS[kind].bf16_flops for key, kind in DEVICE_KINDS if key in name), None)


def nominal_peak(device: str) -> float | None:
    """This run's GPU's dense bf16 datasheet peak in FLOP/s (`peak_of`); None on a CPU."""
    if not device.startswith("cuda"):
        return None
    return peak_of(torch.cuda.get_device_name(torch.device(device)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="desta25")
    parser.add_argument("--small", action="store_true", help="tiny shapes: every code path in seconds on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="frozen weights (bf16 also turns on bf16 autocast); default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--time-budget", type=float, default=240.0, help="seconds for the whole run")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per mode (default 4; 1 with "
                                                                   "--small)")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default: the shapes')")
    parser.add_argument("--pack-length", type=int, default=None, help="tokens per packed row (default: the shapes')")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="which parts to run, comma-separated: train (checks, modes, largest batch), epoch "
                             "(packing against grouped padding), generation")
    parser.add_argument("--epoch", type=int, default=None, help="samples in the packing-against-grouped-padding pass "
                                                                "(default: 4 batches; 0: skip it)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu (with --small)")
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts takes {', '.join(PARTS)}; got {args.parts}")
    clock = Clock(args.time_budget)
    args.steps = args.steps or (1 if args.small else 4)
    base = SMALL if args.small else SHAPES[args.shapes]
    shapes = Shapes(**{**base.__dict__, "batch": args.batch or base.batch,
                       "pack_length": args.pack_length or base.pack_length})
    device, name = args.device, "small" if args.small else args.shapes
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    machine = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else (
        f"CPU, {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"{name} shapes on {machine}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{dtype}; batch {shapes.batch}, {args.steps} timed steps per mode; time budget {args.time_budget:.0f} s",
          flush=True)
    matmul = matmul_tflops(device)
    peak = nominal_peak(device)
    print(f"matrix product: {matmul:.3g} TFLOP/s measured" + (f"; nominal bf16 peak {peak / 1e12:.0f}" if peak else ""))
    m = build(shapes, device, dtype)
    vocab, bins = shapes.llm["vocab_size"], shapes.whisper["num_mel_bins"]
    samples = length_mix(shapes.batch, shapes.queries)
    found = checks(m, samples[: min(4, len(samples))], shapes, device)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    print(f"checks (relative differences, tolerance {tolerance:g}): " + ", ".join(
        f"{key} {value:.1e}" for key, value in found.items()), flush=True)
    if max(found.values()) > tolerance:
        raise SystemExit(f"a check failed: {found}")

    # mode: (logits at, encoder padded to 30 s, packed row length, checkpointing)
    modes = {"padded": ("all", True, None, False), "real": ("all", False, None, False),
             "logits": ("labelled", False, None, False), "checkpointing": ("labelled", False, None, True),
             "packing": ("labelled", False, shapes.pack_length, False)} if "train" in parts else {}
    train: dict[str, dict[str, Any]] = {}
    if modes:
        print(f"training, batch {shapes.batch}:")
    for mode, (logits_at, padded_audio, pack_length, checkpointing) in modes.items():
        estimate = 3 * (args.steps + 2) * (train.get("real", {}).get("step_s", 1.0))
        if not clock.fits(estimate, f"training mode {mode}"):
            continue
        if checkpointing:
            enable = getattr(m.llm, "activation_checkpointing_enable", None)
            enable() if enable else m.llm.gradient_checkpointing_enable({"use_reentrant": False})
            m.llm.train()  # transformers recomputes a layer only in training mode; the Llama has no dropout
        batch = make_batch(samples, vocab, device, padded_audio, pack_length, bins)
        batch["model_flops"] = model_flops(shapes, samples)
        train[mode] = time_steps(m, batch, logits_at, device, args.steps)
        if checkpointing:
            disable = getattr(m.llm, "activation_checkpointing_disable", None) or m.llm.gradient_checkpointing_disable
            disable()
            m.llm.eval()
        report(mode, train[mode], matmul, peak)

    largest: dict[str, Any] = {}
    sizes = [6] if args.small else [24, 32, 48, 64]
    if "logits" in train:
        print("largest batch (mode logits):")
    for size in sizes:
        if size <= shapes.batch or "logits" not in train:
            continue
        if not clock.fits(3 * (args.steps + 2) * train["logits"]["step_s"] * size / shapes.batch, f"batch {size}"):
            break
        mix = length_mix(size, shapes.queries)
        batch = make_batch(mix, vocab, device, False, None, bins)
        batch["model_flops"] = model_flops(shapes, mix)
        try:
            largest = {"batch": size, **time_steps(m, batch, "labelled", device, max(2, args.steps // 2))}
        except torch.cuda.OutOfMemoryError:
            print(f"  batch {size}: out of memory")
            m.optimizer.zero_grad(set_to_none=True)
            break
        finally:
            del batch
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        report(f"batch {size}", largest, matmul, peak)

    epoch: dict[str, Any] = {}
    count = args.epoch if args.epoch is not None else 4 * shapes.batch
    step_s = train.get("logits", {}).get("step_s", 1.0)
    if "epoch" in parts and count and clock.fits(4 * count / shapes.batch * step_s,
                                                 "packing against duration-grouped padding"):
        print(f"packing against duration-grouped padding, one pass over {count} samples of the length mix:")
        epoch = epoch_comparison(m, shapes, device, count)

    del m.encoder, m.connector, m.optimizer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    generation = generation_rates(m.llm, device, clock, args.small) if "generation" in parts else {}
    if "generation" in parts:
        config = m.llm.config
        del m.llm  # vLLM builds its own copy of the weights
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        vllm = vllm_rate(config, device, clock, args.small)
        if vllm is not None:
            generation["vLLM"] = vllm
    seconds = time.perf_counter() - clock.start
    print(f"total {seconds:.0f} s")
    print(json.dumps({"bench": "gpu", "shapes": name, "machine": machine, "torch": torch.__version__,
                      "transformers": transformers.__version__, "batch": shapes.batch, "steps": args.steps,
                      "matmul_tflops": round(matmul, 2), "nominal_peak_tflops": peak / 1e12 if peak else None,
                      "checks": found, "train": {k: rounded(v, matmul, peak) for k, v in train.items()},
                      "largest_batch": rounded(largest, matmul, peak) if largest else None,
                      "epoch": {k: {key: round(value, 4) for key, value in v.items()} for k, v in epoch.items()},
                      "generation": {k: {key: round(value, 3) for key, value in v.items()}
                                     for k, v in generation.items()}, "seconds": round(seconds, 1)}))


def mfu(result: dict[str, Any], matmul: float, peak: float | None) -> dict[str, float | None]:
    """Model FLOPs utilisation (the useful work per second) and executed FLOPs utilisation (the flop counter's
    FLOPs per second), each against the nominal peak (None on a CPU or an unknown GPU) and against the matrix
    product measured in the same run."""
    return {"mfu": result["model_tflops"] * 1e12 / peak if peak else None,
            "executed_utilization": result["achieved_tflops"] * 1e12 / peak if peak else None,
            "mfu_vs_matmul": result["model_tflops"] / matmul,
            "executed_vs_matmul": result["achieved_tflops"] / matmul}


def report(label: str, result: dict[str, Any], matmul: float, peak: float | None) -> None:
    shares = mfu(result, matmul, peak)
    memory = f", peak {result['peak_gib']:.1f} GiB" if result["peak_gib"] is not None else ""
    nominal = (f"MFU {shares['mfu']:.2f}, executed {shares['executed_utilization']:.2f} of the nominal peak; "
               if shares["mfu"] is not None else "")
    print(f"  {label:14} {result['samples_per_s']:8.2f} samples/s, {result['tokens_per_s']:10,.0f} tokens/s, "
          f"{result['rows']} rows x {result['width']} (padding {result['padding_share']:.0%}){memory}; "
          f"{result['model_tflop_per_step']:.2f} TFLOP/step useful, {result['tflop_per_step']:.2f} executed; "
          f"{nominal}{shares['mfu_vs_matmul']:.2f} (useful) of the matrix product", flush=True)


def rounded(result: dict[str, Any], matmul: float, peak: float | None) -> dict[str, Any]:
    merged = {**result, **mfu(result, matmul, peak)}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in merged.items()}


if __name__ == "__main__":
    main()
