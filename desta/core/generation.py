"""Text generation backends with one interface: transformers (default), vLLM, OpenAI-compatible HTTP.

Each takes chat conversations and sampling settings and returns, per conversation, the text, why
it stopped ("stop" or "length") and how many tokens it produced. Used by the targets stage, the
LLM judge of the eval stage and the text post-training strategies.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from desta.core.llm import load_chat_llm
from desta.core.sequences import Conversation, chat_tokens, end_of_turn_ids, pad_batch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class SamplingSettings:
    """How to sample; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (field name -> value), e.g. for a results file."""
        return asdict(self)


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


class TransformersBackend:
    """Batched generation with a transformers causal LM: left padding, batches sorted by prompt
    length (less padding), KV cache, greedy or sampled; `autocast` (e.g. torch.bfloat16) computes in that
    dtype under torch.autocast while the weights stay as loaded (on a CPU with bf16 instructions, faster
    than float32; the answers are those of a bf16 model, not identical to float32's)."""

    name = "transformers"

    def __init__(self, model: str | None = None, batch_size: int = 16, device: str | None = None,
                 dtype: torch.dtype | None = None, llm: PreTrainedModel | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, autocast: torch.dtype | None = None):
        if llm is None and model is None:
            raise ValueError("give a model id or folder, or an in-memory llm and tokenizer")
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
        self.eos_ids = end_of_turn_ids(tokenizer, self.llm.generation_config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, conversation: Conversation) -> list[int]:
        """Prompt token ids of a conversation, ending with the header that opens the assistant's turn."""
        return chat_tokens(self.tokenizer, conversation, add_generation_prompt=True, with_labels=False)[0]

    def _generate_kwargs(self, settings: SamplingSettings) -> dict[str, Any]:
        return generate_kwargs(settings, self.pad_id)

    @torch.no_grad()
    def generate(self, conversations: list[Conversation], settings: SamplingSettings) -> list[Generation]:
        """One Generation per conversation, in the order given; seeded by `settings.seed`."""
        torch.manual_seed(settings.seed)
        encoded = [self.encode(c) for c in conversations]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[Generation | None] = [None] * len(encoded)
        kwargs = self._generate_kwargs(settings)
        device_type = torch.device(self.device).type
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            inputs = pad_batch([encoded[i] for i in batch], self.pad_id, side="left")
            width = inputs["input_ids"].shape[1]
            # autocast: matmuls in `autocast`'s dtype; trainable weights are cast once per batch (autocast's cache),
            # frozen ones at every step; the stored weights do not change
            with torch.autocast(device_type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
                out = self.llm.generate(**{k: v.to(self.device) for k, v in inputs.items()}, **kwargs)
            for row, i in enumerate(batch):
                results[i] = self._finish(out[row, width:].tolist(), settings.max_new_tokens)
        return results  # type: ignore[return-value]

    def _finish(self, new_ids: list[int], limit: int) -> Generation:
        return finish_generation(new_ids, self.eos_ids, limit, self.tokenizer)


class VLLMBackend:
    """vLLM offline engine on a GPU (`pip install vllm`); same interface as the transformers backend."""

    name = "vllm"

    def __init__(self, model: str, **engine_kwargs: Any):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("the vllm backend needs `pip install vllm` on a CUDA machine") from err
        self.model_id = model
        self.engine = LLM(model=model, **engine_kwargs)

    def generate(self, conversations: list[Conversation], settings: SamplingSettings) -> list[Generation]:
        """One Generation per conversation, in the order given, from vLLM's chat interface."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
                                seed=settings.seed)
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
