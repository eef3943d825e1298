"""Text generation backends with one interface: transformers (default), vLLM, OpenAI-compatible HTTP.

Each takes chat conversations and sampling settings and returns, per conversation, the text, why
it stopped ("stop" or "length") and how many tokens it produced. Used by the targets stage, the
LLM judge of the eval stage and the text post-training strategies.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from desta.core.args import raise_problems
from desta.core.llm import load_chat_llm
from desta.core.sequences import Conversation, chat_tokens, end_of_turn_ids, pad_batch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class SamplingSection:
    """How answers are sampled (a config section: `sampling.temperature=0.7`)."""

    max_new_tokens: int = 256
    """longer answers are cut"""
    temperature: float = 0.0
    """0: greedy"""
    top_p: float = 1.0
    """nucleus sampling mass (with temperature > 0)"""
    repetition_penalty: float = 1.0
    """above 1 discourages repeats"""

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(("max_new_tokens", f"must be at least 1, got {self.max_new_tokens}"))
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            problems.append(("temperature", f"temperature must be 0 or more and top_p in (0, 1], got "
                                            f"{self.temperature} and {self.top_p}"))
        if self.repetition_penalty <= 0:
            problems.append(("repetition_penalty", f"must be positive, got {self.repetition_penalty}"))
        raise_problems(problems)

    def seeded(self, seed: int) -> SamplingSettings:
        """These settings with a seed, as a backend takes them."""
        return SamplingSettings(**asdict(self), seed=seed)


@dataclass
class SamplingSettings(SamplingSection):
    """How to sample one call: the section's settings and the seed the draws depend on."""

    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (field name -> value), e.g. for a results file."""
        return asdict(self)


GenerationKind = Literal["transformers", "vllm", "http"]


@dataclass
class GenerationSection:
    """Where and how fast answers are generated (a config section: `generation.batch_size=48`). Only `kind`,
    `model` and `dtype` decide the answers (`identity`); the rest sets how fast they come."""

    kind: GenerationKind = "transformers"
    """transformers (batched, CPU or GPU), vllm (GPU; untested on a GPU: only what it hands vLLM is tested), http
    (an OpenAI-compatible server)"""
    model: str = ""
    """the LLM (Hub id or folder; the served model name for http)"""
    base_url: str | None = None
    """http: the server, e.g. http://127.0.0.1:8000/v1 (key from $OPENAI_API_KEY)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """weights of the LLM (transformers): auto is bfloat16 on a GPU and float32 on a CPU; bfloat16 on a CPU with
    bf16 instructions is about twice as fast (answers of a bf16 model, not identical to float32's)"""
    batch_size: int = 16
    """prompts per generate batch when batching by prompts (transformers)"""
    batching: Literal["auto", "continuous", "tokens", "prompts"] = "auto"
    """transformers: continuous: transformers' continuous batching (a finished answer's place takes the next prompt:
    no batch waits for its longest answer); tokens: each batch holds as many prompts as fit token_budget (longest
    prompts first); prompts: batch_size prompts; auto: continuous on a GPU, tokens wherever token_budget is given,
    else prompts (a CPU)"""
    token_budget: int | None = None
    """tokens per generate batch when batching by tokens: rows x (longest prompt + max_new_tokens); with continuous
    batching, the tokens its key/value cache holds; null: sized from the GPU's free memory"""
    cache: Literal["dynamic", "static"] = "dynamic"
    """transformers' key/value cache: dynamic, or static (preallocated; transformers compiles the decoding step
    on a GPU: faster once compiled, one compile per batch shape)"""
    prompts_per_call: int | None = None
    """greedy runs hand the backend this many prompts at once (several chunks, each still written on its own), so
    token-budget batches can fill; null: the chunk size, or with a token budget 4 x token_budget / max_new_tokens.
    Sampled runs hand one chunk at a time, so a resumed chunk samples the same"""
    max_model_len: int | None = None
    """vllm: tokens per sequence the engine plans for (prompt + answer); null: the model's own, which can leave
    little memory for the cache"""
    gpu_memory_utilization: float = 0.9
    """vllm: share of each GPU's memory for the weights and the key/value cache"""
    tensor_parallel_size: int = 1
    """vllm: GPUs the model is split over"""
    concurrency: int = 8
    """http: requests in flight"""
    timeout: float = 120.0
    """http: seconds per request"""
    max_retries: int = 4
    """http: retries per request"""

    def __post_init__(self) -> None:
        problems = []
        if self.kind == "http" and self.model and not self.base_url:
            problems.append(("base_url", "the http backend needs base_url, e.g. http://127.0.0.1:8000/v1"))
        if min(self.batch_size, self.concurrency, self.tensor_parallel_size) < 1 or self.max_retries < 0:
            problems.append(("batch_size", "batch_size, concurrency and tensor_parallel_size must be at least 1, "
                                           "max_retries 0 or more"))
        for name in ("token_budget", "prompts_per_call", "max_model_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append((name, f"must be at least 1 (or null), got {getattr(self, name)}"))
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}"))
        if self.timeout <= 0:
            problems.append(("timeout", f"must be positive, got {self.timeout}"))
        raise_problems(problems)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the answers, what a resumed run must match (`kind` recorded as "backend", the
        name job files have always used)."""
        return {"backend": self.kind, "model": self.model, "dtype": self.dtype}

    def backend(self, seed: int = 0) -> Backend:
        """The backend these settings describe (`seed`: vLLM's engine seed)."""
        if self.kind == "http":
            return make_backend("http", self.model, base_url=self.base_url, concurrency=self.concurrency,
                                timeout=self.timeout, max_retries=self.max_retries)
        if self.kind == "vllm":
            return make_backend("vllm", self.model, max_model_len=self.max_model_len, seed=seed,
                                gpu_memory_utilization=self.gpu_memory_utilization,
                                tensor_parallel_size=self.tensor_parallel_size)
        from desta.core.llm import default_device

        batching = self.batching
        if batching == "auto":
            batching = "continuous" if default_device() == "cuda" and self.cache == "dynamic" else (
                "tokens" if self.token_budget is not None else "prompts")
        budget = self.token_budget or ("memory" if batching == "tokens" else None)
        return make_backend("transformers", self.model, batch_size=self.batch_size,
                            dtype=None if self.dtype == "auto" else getattr(torch, self.dtype),
                            token_budget=budget if batching != "prompts" else None, cache=self.cache,
                            continuous=batching == "continuous")


@dataclass
class Generation:
    """One answer: its text, why it stopped and how many tokens it took."""

    text: str
    finish_reason: str  # "stop": ended by itself; "length": cut at max_new_tokens
    completion_tokens: int


class Backend(Protocol):
    """What every generation backend offers: a name, the model it serves and batched `generate`."""

    name: str
    model_id: str

    def generate(self, conversations: list[Conversation], settings: SamplingSettings) -> list[Generation]:
        """One Generation per conversation, in the order given."""


class BackendError(RuntimeError):
    """A generation backend failed in a way a retry will not fix; the message says what to do."""


def generate_kwargs(settings: SamplingSettings, pad_id: int) -> dict[str, Any]:
    """transformers `generate` arguments for the settings: greedy at temperature 0, sampled above."""
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": pad_id,
                              "repetition_penalty": settings.repetition_penalty}
    if settings.temperature > 0:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def finish_generation(new_ids: list[int], eos_ids: set[int], limit: int,
                      tokenizer: PreTrainedTokenizerBase) -> Generation:
    """New token ids -> text up to the first end-of-turn token, and whether the limit cut it off."""
    end = next((k for k, t in enumerate(new_ids) if t in eos_ids), None)
    kept = new_ids if end is None else new_ids[:end]
    reason = "stop" if end is not None or len(new_ids) < limit else "length"
    return Generation(tokenizer.decode(kept, skip_special_tokens=True).strip(), reason, len(kept))


# The prompt widths a static cache is compiled for are rounded up to this many tokens (left padding), so a run
# compiles the decoding step for a few shapes rather than one per batch.
STATIC_WIDTH_MULTIPLE = 64
# The share of a GPU's free memory a memory-sized token budget takes: the rest absorbs what the estimate leaves
# out (the allocator's fragmentation, sampling's temporaries).
MEMORY_SHARE = 0.8
# After a batch runs out of GPU memory the budget (or batch size) shrinks to this share; after GROW_AFTER batches in a
# row that fit, it grows back by as much, up to where it started: one bad batch does not slow the rest of a run.
SHRINK = 0.75
GROW_AFTER = 8
# Tokens per page of continuous batching's paged key/value cache when a token budget sizes it (transformers' default
# page: 256 tokens; a budget of a few thousand tokens gets pages small enough to share out).
CONTINUOUS_PAGE = 64
# A vLLM request's seed: the call's seed x REQUEST_SEEDS + its position (the targets stage seeds each chunk seed +
# chunk, so requests of different chunks never share a seed).
REQUEST_SEEDS = 1_000_000


def bytes_per_token(config: Any, element_size: int = 2) -> int:
    """GPU memory one token of a generate batch holds, in bytes: its keys and values in every layer (2 x layers x
    key/value heads x head width) and, while the prompt is read, its activations (hidden states and the MLP's
    intermediate values, about 4 x hidden + 3 x intermediate), all in the weights' dtype.

    >>> from transformers import LlamaConfig  # Llama-3.1-8B: 128 KiB of cache and 116 KiB of activations
    >>> bytes_per_token(LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
    ...                             num_key_value_heads=8, intermediate_size=14336))
    249856
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    cache = 2 * config.num_hidden_layers * kv_heads * head_dim
    activations = 4 * config.hidden_size + 3 * config.intermediate_size
    return (cache + activations) * element_size


def memory_token_budget(llm: PreTrainedModel, device: str, share: float = MEMORY_SHARE) -> int:
    """The token budget of a generate batch (prompt + new tokens, summed over its rows) that fits in `share` of the
    CUDA device's free memory now, the LLM's weights already loaded."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"a token budget sized from free memory needs a CUDA device, not {device}; give "
                         "token_budget (tokens per batch) or batch by prompts (batch_size)")
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free * share) // bytes_per_token(llm.config, next(llm.parameters()).element_size())


def budget_batches(lengths: list[int], max_new_tokens: int, token_budget: int, multiple: int = 1) -> list[list[int]]:
    """Prompt indices, longest first, cut into batches that hold at most `token_budget` tokens once padded: rows x
    (the batch's longest prompt, rounded up to `multiple`, + max_new_tokens). A prompt too long for the budget
    still gets a batch of its own.

    >>> budget_batches([100, 40, 90, 30, 60], max_new_tokens=20, token_budget=300)
    [[0, 2], [4, 1, 3]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, start = [], 0
    while start < len(order):
        width = -(-lengths[order[start]] // multiple) * multiple + max_new_tokens
        rows = max(1, token_budget // width)
        batches.append(order[start : start + rows])
        start += rows
    return batches


class TransformersBackend:
    """Batched generation with a transformers causal LM, greedy or sampled, stopping at the end-of-turn ids (passed
    as eos_token_id, whatever the model's generation config names). `autocast` (e.g. torch.bfloat16) computes in
    that dtype under torch.autocast while the weights stay as loaded (on a CPU with bf16 instructions, faster than
    float32; the answers are those of a bf16 model, not identical to float32's).

    Three ways to batch:
    - `continuous`: transformers' continuous batching (`generate_batch`, a paged key/value cache): a finished
      answer's slot takes the next prompt at once, so no batch waits for its longest answer; the default on a GPU.
      `token_budget` sizes its cache (in pages of CONTINUOUS_PAGE tokens); None: from the GPU's free memory.
      Padded batches are used instead where it cannot apply (a logits processor, autocast, the static cache).
    - `token_budget`: padded batches of as many prompts as fit that many tokens (prompt + new tokens per row,
      `budget_batches`), longest prompts first; "memory" sizes it from the GPU's free memory (`memory_token_budget`).
    - else `batch_size` prompts per padded batch.
    A padded batch that runs out of GPU memory is planned again in smaller batches: the budget (or batch size)
    shrinks to SHRINK of itself and grows back after GROW_AFTER batches that fit. Any other error surfaces as it is.
    `cache` "static": transformers' preallocated key/value cache for padded batches, whose decoding step
    transformers compiles on a GPU (prompt widths rounded up to STATIC_WIDTH_MULTIPLE)."""

    name = "transformers"
    logits_processor: Any = None  # a transformers LogitsProcessor(List) every generate call applies, e.g. RuleAdapter

    def __init__(self, model: str | None = None, batch_size: int = 16, device: str | None = None,
                 dtype: torch.dtype | None = None, llm: PreTrainedModel | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, autocast: torch.dtype | None = None,
                 token_budget: int | Literal["memory"] | None = None, cache: Literal["dynamic", "static"] = "dynamic",
                 continuous: bool = False):
        if llm is None and model is None:
            raise ValueError("give a model id or folder, or an in-memory llm and tokenizer")
        if cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")
        if token_budget not in (None, "memory") and (not isinstance(token_budget, int) or token_budget < 1):
            raise ValueError(f"token_budget must be a positive number of tokens, 'memory' or None, got "
                             f"{token_budget!r}")
        if continuous and (cache == "static" or token_budget == "memory"):
            raise ValueError("continuous batching has its own paged cache, sized from free memory unless token_budget "
                             "gives its tokens: drop cache='static' and token_budget='memory', or continuous")
        if (device or "").startswith("cuda") or (llm is None and device is None and torch.cuda.is_available()):
            # grown, not reserved in fixed blocks: batches of changing shapes fragment the cache allocator less
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        if llm is None:
            llm, tokenizer = load_chat_llm(model, device=device, dtype=dtype)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {model or 'the given model'} has no chat template; "
                             "use a chat (instruct) model")
        self.device = device or str(next(llm.parameters()).device)
        self.llm = llm.to(self.device).eval()
        self.tokenizer = tokenizer
        self.model_id = str(model or getattr(self.llm.config, "_name_or_path", "") or "in-memory")
        self.batch_size = batch_size
        self.autocast = autocast
        self.cache = cache
        self.continuous = continuous
        self.token_budget = memory_token_budget(self.llm, self.device) if token_budget == "memory" else token_budget
        self.full_budget, self.full_batch_size, self.fitted = self.token_budget, batch_size, 0
        self.eos_ids = end_of_turn_ids(tokenizer, self.llm.generation_config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def prompts_per_call(self) -> int | None:
        """Prompts a greedy targets run hands over at once with continuous batching: thousands (it schedules them
        itself). None: the targets stage decides (four token budgets' worth, or one chunk)."""
        if self.continuous:
            return 4096
        return None

    def encode(self, conversation: Conversation) -> list[int]:
        """Prompt token ids of a conversation, ending with the header that opens the assistant's turn."""
        return chat_tokens(self.tokenizer, conversation, add_generation_prompt=True, with_labels=False)[0]

    def _generate_kwargs(self, settings: SamplingSettings) -> dict[str, Any]:
        kwargs = generate_kwargs(settings, self.pad_id)
        # the chat's end of turn, whatever the generation config says (none known: the generation config's)
        kwargs["eos_token_id"] = sorted(self.eos_ids) or None
        if self.logits_processor is not None:
            kwargs["logits_processor"] = self.logits_processor
        return kwargs

    @torch.no_grad()
    def generate(self, conversations: list[Conversation], settings: SamplingSettings) -> list[Generation]:
        """One Generation per conversation, in the order given; seeded by `settings.seed`."""
        new_ids = self.generate_ids([self.encode(c) for c in conversations], settings)
        return [self._finish(ids, settings.max_new_tokens) for ids in new_ids]

    def batches(self, lengths: list[int], max_new_tokens: int) -> list[list[int]]:
        """How prompts of these lengths are batched when padded: indices, longest prompts first."""
        if self.token_budget is None:
            order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
            return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        multiple = STATIC_WIDTH_MULTIPLE if self.cache == "static" else 1
        return budget_batches(lengths, max_new_tokens, self.token_budget, multiple)

    def uses_continuous(self) -> bool:
        """Whether the next call batches continuously: asked for, and nothing it cannot apply is set."""
        return self.continuous and self.logits_processor is None and self.autocast is None

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[int]]:
        """The new token ids after each prompt's ids, in the order given (up to max_new_tokens, end-of-turn
        included); seeded by `settings.seed`."""
        if self.uses_continuous():
            return self._generate_continuous(prompts, settings)
        torch.manual_seed(settings.seed)
        results: list[list[int] | None] = [None] * len(prompts)
        kwargs = self._generate_kwargs(settings)
        if self.cache == "static":
            kwargs["cache_implementation"] = "static"
        pending = list(range(len(prompts)))
        while pending:
            plan = self.batches([len(prompts[i]) for i in pending], settings.max_new_tokens)
            batches = [[pending[k] for k in batch] for batch in plan]
            for number, batch in enumerate(batches):
                try:
                    out, width = self._generate_batch([prompts[i] for i in batch], kwargs)
                except torch.cuda.OutOfMemoryError:
                    if len(batch) == 1:
                        raise
                    torch.cuda.empty_cache()
                    self._shrink(len(batch))
                    pending = [i for later in batches[number:] for i in later]  # planned again, in smaller batches
                    break
                for row, i in enumerate(batch):
                    results[i] = out[row, width:].tolist()
                self._grow()
            else:
                pending = []
        return results  # type: ignore[return-value]

    def _shrink(self, rows: int) -> None:
        """After a batch of `rows` prompts ran out of GPU memory: a smaller token budget (or batch size) from now on,
        SHRINK of it, until GROW_AFTER batches in a row fit."""
        if self.token_budget is not None:
            self.token_budget = max(1, math.floor(self.token_budget * SHRINK))
        else:
            self.batch_size = max(1, math.floor(rows * SHRINK))
        self.fitted = 0
        warnings.warn(f"a batch of {rows} prompts ran out of GPU memory; the next run in smaller batches (token budget "
                      f"{self.token_budget}, batch size {self.batch_size}), growing back after {GROW_AFTER} that fit",
                      stacklevel=3)

    def _grow(self) -> None:
        """One more batch fitted: after GROW_AFTER in a row, the budget (or batch size) grows back by what a shrink
        takes, up to where it started."""
        self.fitted += 1
        if self.fitted < GROW_AFTER:
            return
        self.fitted = 0
        if self.token_budget is not None and self.full_budget is not None:
            self.token_budget = min(self.full_budget, math.ceil(self.token_budget / SHRINK))
        else:
            self.batch_size = min(self.full_batch_size, math.ceil(self.batch_size / SHRINK))

    def _generate_batch(self, prompts: list[list[int]], kwargs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """One generate call on left-padded prompts: the output ids (rows, width + new) and the padded width."""
        inputs = pad_batch(prompts, self.pad_id, side="left")
        if self.cache == "static":  # a few widths, so the compiled decoding step is reused
            extra = -inputs["input_ids"].shape[1] % STATIC_WIDTH_MULTIPLE
            inputs = {k: torch.nn.functional.pad(v, (extra, 0), value=self.pad_id if k == "input_ids" else 0)
                      for k, v in inputs.items()}
        # autocast: matmuls in `autocast`'s dtype; trainable weights are cast once per batch (autocast's cache),
        # frozen ones at every step; the stored weights do not change
        device_type = torch.device(self.device).type
        with torch.autocast(device_type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            out = self.llm.generate(**{k: v.to(self.device) for k, v in inputs.items()}, **kwargs)
        return out, inputs["input_ids"].shape[1]

    def _generate_continuous(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[int]]:
        """All prompts through transformers' continuous batching: the new ids of each, in the order given."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        if not prompts:
            return []
        config = GenerationConfig(**self._generate_kwargs(settings))
        # the cache: sized from free memory on a GPU unless a token budget gives it; an unsupported setting is an
        # error, not dropped (transformers' default drops it, which would change the answers silently)
        sizes = {} if self.token_budget is None else {
            "page_size": CONTINUOUS_PAGE, "num_blocks": max(1, self.token_budget // CONTINUOUS_PAGE),
            "max_batch_tokens": self.token_budget}
        batching = ContinuousBatchingConfig(seed=settings.seed, drop_unsupported_processors=False, **sizes)
        outputs = self.llm.generate_batch(prompts, generation_config=config, continuous_batching_config=batching,
                                          progress_bar=False)
        results = list(outputs.values())  # in the order of the prompts
        failed = [f"{r.request_id}: {r.error}" for r in results if r.error is not None]
        if len(results) != len(prompts) or failed:
            raise BackendError(f"continuous batching answered {len(results) - len(failed)} of {len(prompts)} prompts "
                               f"({'; '.join(failed[:3]) or 'the others are missing'}); its log above says why. "
                               "Rerun with batching=tokens to batch without it")
        return [list(r.generated_tokens) for r in results]

    def _finish(self, new_ids: list[int], limit: int) -> Generation:
        return finish_generation(new_ids, self.eos_ids, limit, self.tokenizer)


class VLLMBackend:
    """vLLM's offline engine on a GPU (`pip install vllm`); same interface as the transformers backend.

    Untested on a GPU: vLLM needs a CUDA machine with vLLM installed, which desta's test machines are not. What it
    hands vLLM (engine settings, one request per prompt with its own seed, the end-of-turn ids as stop_token_ids,
    thousands of prompts per call) is tested against a stand-in of vLLM's LLM interface (tests/test_generation.py);
    the transformers backend is the measured one (bench/gpu.py, docs/gpu.md)."""

    name = "vllm"
    prompts_per_call = 4096  # vLLM schedules the requests itself: the more it sees at once, the fuller its batches

    def __init__(self, model: str, max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 tensor_parallel_size: int = 1, seed: int = 0, **engine_kwargs: Any):
        """The engine on `model`: `max_model_len` tokens per sequence (None: the model's), `gpu_memory_utilization`
        of each GPU's memory for weights and cache, the model split over `tensor_parallel_size` GPUs."""
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("the vllm backend needs `pip install vllm` on a CUDA machine") from err
        from transformers import GenerationConfig

        self.model_id = model
        settings = {"max_model_len": max_model_len, "gpu_memory_utilization": gpu_memory_utilization,
                    "tensor_parallel_size": tensor_parallel_size, "seed": seed}
        self.engine = LLM(model=model, **{k: v for k, v in settings.items() if v is not None}, **engine_kwargs)
        try:
            generation_config = GenerationConfig.from_pretrained(model)
        except OSError:  # a checkpoint without generation_config.json: the tokenizer's ids and the template's
            generation_config = None
        self.eos_ids = end_of_turn_ids(self.engine.get_tokenizer(), generation_config)

    def generate(self, conversations: list[Conversation], settings: SamplingSettings) -> list[Generation]:
        """One Generation per conversation, in the order given, from vLLM's chat interface: one request each, seeded
        by `settings.seed` and its position (REQUEST_SEEDS apart: no two requests of a run share a seed), stopping at
        the end-of-turn ids."""
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                 top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
                                 seed=settings.seed * REQUEST_SEEDS + i, stop_token_ids=sorted(self.eos_ids))
                  for i in range(len(conversations))]
        outputs = self.engine.chat(conversations, params, use_tqdm=False)
        return [Generation(o.outputs[0].text.strip(), "length" if o.outputs[0].finish_reason == "length"
                           else "stop", len(o.outputs[0].token_ids)) for o in outputs]


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions server (vLLM serve, llama.cpp, TGI, `desta serve`).

    Requests run `concurrency` at a time; timeouts, 429 and 5xx answers are retried with exponential
    backoff; a refused key or an unknown model name stops at once with what to do. The key comes from
    `api_key` or $OPENAI_API_KEY and is sent only in the Authorization header, never printed.
    """

    name = "http"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 0.5):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.model_id = model
        self.concurrency, self.max_retries, self.backoff = concurrency, max_retries, backoff
        key = api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.retries = 0  # retried requests so far, for logs and tests
        self.failures: list[str] = []  # why each failed attempt failed, newest last

    def _models(self) -> list[str]:
        try:
            return [m["id"] for m in self.client.get("/models").json().get("data", [])]
        except Exception:  # the listing is a courtesy in an error message; its own failure is not the story
            return []

    def _one(self, conversation: Conversation, settings: SamplingSettings) -> Generation:
        import httpx

        body: dict[str, Any] = {"model": self.model_id, "messages": conversation, "seed": settings.seed,
                                "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                                "top_p": settings.top_p}
        if settings.repetition_penalty != 1.0:
            body["repetition_penalty"] = settings.repetition_penalty  # vLLM and desta accept it
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.client.post("/chat/completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as err:
                last = f"{type(err).__name__}: {err}"
                self.failures.append(last)
                continue
            if response.status_code in (401, 403):
                raise BackendError(f"{self.base_url} refused the API key (HTTP {response.status_code}); set "
                                   "OPENAI_API_KEY (or pass api_key) to a key this server accepts")
            if response.status_code == 404 or (response.status_code == 400 and "model" in response.text.lower()):
                raise BackendError(f"{self.base_url} does not serve model {self.model_id!r} "
                                   f"(HTTP {response.status_code}); available: {self._models()}")
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                self.failures.append(last)
                continue
            if response.status_code != 200:
                raise BackendError(f"{self.base_url} rejected the request (HTTP {response.status_code}): "
                                   f"{response.text[:300]}")
            choice = response.json()["choices"][0]
            usage = response.json().get("usage") or {}
            return Generation((choice["message"].get("content") or "").strip(),
                              "length" if choice.get("finish_reason") == "length" else "stop",
                              int(usage.get("completion_tokens", 0)))
        raise BackendError(f"{self.base_url} failed {self.max_retries + 1} times; last error: {last}")

    def generate(self, conversations: list[Conversation], settings: SamplingSettings) -> list[Generation]:
        """One Generation per conversation, in the order given; `concurrency` requests in flight."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda c: self._one(c, settings), conversations))


def make_backend(kind: str, model: str, **kwargs: Any) -> Backend:
    """A backend by name: transformers, vllm, or http (needs base_url)."""
    if kind == "transformers":
        return TransformersBackend(model, **kwargs)
    if kind == "vllm":
        return VLLMBackend(model, **kwargs)
    if kind == "http":
        if not kwargs.get("base_url"):
            raise ValueError("the http backend needs base_url, e.g. http://127.0.0.1:8000/v1")
        return OpenAIBackend(model=model, **kwargs)
    raise ValueError(f"unknown generation backend {kind!r}; choose transformers, vllm or http")
