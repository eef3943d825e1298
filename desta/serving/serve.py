"""`desta serve`: an OpenAI-compatible chat-completions server for a DeSTA checkpoint or a text LLM.

Reads a checkpoint folder (DeSTA) or a chat LLM folder/Hub id (text only). Serves
GET /v1/models and POST /v1/chat/completions with text and `input_audio` parts (base64 WAV, FLAC,
MP3), streaming (server-sent events) or not. Binds 127.0.0.1 unless told otherwise.

What one client can do to the others is bounded: with a key set, every path (the API docs
included) needs it, compared in constant time, before any of the body is read; the body is read
only up to its limit; a prompt longer than the model's context (or max_prompt_tokens) is refused
before generating; sampling settings are checked as the OpenAI API checks them; a streaming client
that goes away stops its generation and frees its slot at once. Oversize bodies, undecodable or
too long audio, too many tokens, unknown models and bad keys get 4xx JSON errors in the OpenAI
shape. A request that finds every slot taken waits in a bounded queue (`queue` requests, each at
most `queue_seconds`), first come first served; beyond that it gets 503 with Retry-After so clients
back off. A slot is freed when its generation ends, before a stream's last events are sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import math
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from desta.audio import SAMPLE_RATE, AudioError, load_audio
from desta.core.args import raise_problems
from desta.core.extras import require_extra
from desta.core.generation import SamplingSettings
from desta.prompts import speech_messages
from desta.serving.engine import MAX_AUDIO_SECONDS, PromptTooLong

if TYPE_CHECKING:
    from desta.serving.engine import DestaEngine, Stream, TextEngine

AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.manual_seed takes (a signed 64-bit integer)


@dataclass
class ServeLimits:
    """What one request may ask for."""

    max_body_bytes: int = 25 * 2**20  # 25 MiB of JSON, base64 audio included
    max_audio_seconds: float = MAX_AUDIO_SECONDS  # per audio part
    max_tokens: int = 1024  # per answer
    max_concurrent: int = 1  # requests generating at once; more wait in the queue
    max_prompt_tokens: int | None = None  # None: what the model's context holds besides the answer
    queue: int = 8  # requests that may wait for a slot; more get 503 + Retry-After at once
    queue_seconds: float = 30.0  # how long a queued request waits for a slot before its 503


class Slot:
    """A request's place among the generating ones; `release` frees it once, from any thread."""

    def __init__(self, slots: Slots):
        self.slots, self.released, self.lock = slots, False, threading.Lock()

    def release(self) -> None:
        """Free the slot (hand it to the longest-waiting request, if any); later calls do nothing."""
        with self.lock:
            if self.released:
                return
            self.released = True
        self.slots.give_back()


class Slots:
    """`size` requests generate at once; up to `queue` more wait, first come first served, each at most `wait`
    seconds. Taken in the event loop; given back from any thread (a generation ends in a worker thread)."""

    def __init__(self, size: int, queue: int, wait: float):
        self.free, self.queue, self.wait = size, queue, wait
        self.lock = threading.Lock()
        self.waiting: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()

    async def take(self) -> Slot | None:
        """A slot, at once or after waiting in the queue; None when the queue is full or the wait ran out."""
        loop = asyncio.get_running_loop()
        with self.lock:
            if self.free and not self.waiting:
                self.free -= 1
                return Slot(self)
            if len(self.waiting) >= self.queue:
                return None
            place = (loop, loop.create_future())
            self.waiting.append(place)
        try:
            await asyncio.wait_for(asyncio.shield(place[1]), self.wait)
        except BaseException as err:  # the wait ran out, or the request was cancelled while queued
            with self.lock:
                handed = place not in self.waiting  # give_back took it off the queue: the slot is this request's
                if not handed:
                    self.waiting.remove(place)
            if handed and isinstance(err, TimeoutError):
                return Slot(self)
            if handed:
                Slot(self).release()  # cancelled as a slot arrived: pass it on
            if isinstance(err, TimeoutError):
                return None
            raise
        return Slot(self)

    def give_back(self) -> None:
        """A slot ends: the first queued request gets it, or it becomes free."""
        with self.lock:
            if self.waiting:
                loop, future = self.waiting.popleft()
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))
            else:
                self.free += 1


class RequestError(Exception):
    """A request the server refuses: the HTTP status and the OpenAI-shaped error (message, code, param)."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error(status: int, message: str, code: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "param": param, "code": code}},
                        status_code=status)


def _check_text(text: str, engine: DestaEngine | TextEngine, where: str) -> str:
    """Text from a client, refused when it holds a token the chat template or the audio slots reserve (it would
    be read as one: a fake turn or an audio placeholder with no audio)."""
    reserved = sorted((t for t in [engine.audio_token, *engine.special_tokens] if t and t in text), key=text.find)
    if reserved:
        raise RequestError(400, f"{where}: the text holds {reserved[0]!r}, a token this model reserves (audio "
                                "placeholder or chat markup); send audio as an input_audio part and remove it",
                           param=where)
    return text


def parse_messages(body: dict, engine: DestaEngine | TextEngine,
                   limits: ServeLimits) -> tuple[list[dict], list[np.ndarray]]:
    """OpenAI messages -> chat messages with audio placeholders, and the decoded clips in order. A message's
    audio parts are heard before its text, as in training (desta.prompts.speech_messages); the engine adds the
    system prompt the model was trained with when the request sends none."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    chat, audios = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"messages[{i}] needs a role of system, user or assistant",
                               param=f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, str):
            chat.append({"role": message["role"], "content": _check_text(content, engine, f"messages[{i}].content")})
            continue
        if not isinstance(content, list):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of parts",
                               param=f"messages[{i}].content")
        pieces, clips = [], 0
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text", ""), str):
                    raise RequestError(400, f"{where}.text must be a string", param=where)
                pieces.append(_check_text(part.get("text", ""), engine, where))
            elif kind == "input_audio":
                if not engine.accepts_audio:
                    raise RequestError(400, f"{where}: this server's model {engine.model_id!r} is text-only",
                                       param=where)
                audios.append(_decode_audio(part.get("input_audio") or {}, where, limits))
                clips += 1
            else:
                raise RequestError(400, f"{where}: unsupported part type {kind!r}; use text or input_audio",
                                   param=where)
        chat += speech_messages([{"role": message["role"], "text": "\n".join(pieces), "clips": clips}],
                                engine.audio_token or "", None)
    return chat, audios


def _decode_audio(part: dict, where: str, limits: ServeLimits) -> np.ndarray:
    fmt = str(part.get("format", "wav")).lower()
    if fmt not in AUDIO_FORMATS:
        raise RequestError(400, f"{where}: audio format {fmt!r} is not supported; use one of {AUDIO_FORMATS}",
                           param=where)
    try:
        data = base64.b64decode(part.get("data") or "", validate=True)
    except (binascii.Error, ValueError, TypeError) as err:
        raise RequestError(400, f"{where}: input_audio.data is not valid base64 ({err})", param=where) from err
    try:
        samples = load_audio(data, name=where)
    except AudioError as err:
        raise RequestError(400, str(err), param=where) from err
    seconds = len(samples) / SAMPLE_RATE
    if seconds > limits.max_audio_seconds:
        raise RequestError(400, f"{where}: audio is {seconds:.0f} s long; this server accepts at most "
                                f"{limits.max_audio_seconds:.0f} s per part", param=where)
    return samples


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    """A sampling number from the request: absent or null gives the default; anything but a finite number in
    range is a RequestError naming the parameter."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(400, f"{name} must be a number, got {value!r}", param=name)
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise RequestError(400, f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    """An integer from the request (not a bool, not a float), in [low, high]; None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(400, f"{name} must be an integer in [{low}, {high}], got {value!r}", param=name)
    return value


def settings_from(body: dict, limits: ServeLimits) -> SamplingSettings:
    """The request's max_tokens (or max_completion_tokens), temperature, top_p, repetition_penalty and seed,
    checked as the OpenAI API checks them; RequestError (400) naming the parameter otherwise."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 1, limits.max_tokens)
    if body.get("n") not in (None, 1):
        raise RequestError(400, f"n must be 1 (one answer per request), got {body.get('n')!r}", param="n")
    if body.get("stream") not in (None, True, False):
        raise RequestError(400, f"stream must be true or false, got {body.get('stream')!r}", param="stream")
    seed = _integer(body, "seed", *SEED_RANGE)
    return SamplingSettings(max_new_tokens=min(256, limits.max_tokens) if max_tokens is None else max_tokens,
                            temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, math.inf, low_open=True),
                            seed=seed or 0)


class RequireKey:
    """ASGI middleware: with a key set, every HTTP request (the API docs and schema included) must carry
    `Authorization: Bearer KEY`, compared in constant time, before the app reads any of its body."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 401 to a request without the key; pass the others on."""
        if scope["type"] == "http" and self.expected is not None:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _error(401, "invalid API key", "invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class GuardedStream(StreamingResponse):
    """A server-sent event stream whose clean-up runs as soon as the response ends in any way: finished,
    failed, or the client gone (noticed while waiting for the next token, not only at the next send)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], stop: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream")
        self.on_close, self.stop = on_close, stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream, watching for the client going away; then close the content and run the clean-up."""
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.stop()  # ends the generation at its next token; the stream then finishes by itself

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch)
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    group.cancel_scope.cancel()
        except (ClientDisconnect, OSError):
            pass  # the client left: nothing to answer
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.on_close()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, read no further than `limit` bytes (RequestError 413 beyond it)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # stop reading: the rest is never held in memory
            raise RequestError(413, f"request body is over {limit} bytes; the limit is {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _request_body(raw: bytes, engine: DestaEngine | TextEngine) -> dict[str, Any]:
    """A chat-completions body: a JSON object asking for the served model (RequestError otherwise; a body that is
    not JSON raises json.JSONDecodeError or UnicodeDecodeError)."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if body.get("model") != engine.model_id:
        raise RequestError(404, f"model {body.get('model')!r} not found; available: [{engine.model_id!r}]",
                           "model_not_found", "model")
    return body


def _busy(limits: ServeLimits) -> JSONResponse:
    """503 with Retry-After: every slot taken (and the queue full, or its wait over)."""
    waited = f" after waiting {limits.queue_seconds:g} s" if limits.queue else ""
    response = _error(503, f"the server is busy{waited}; retry shortly", "server_busy")
    response.headers["Retry-After"] = "1"
    return response


def create_app(engine: DestaEngine | TextEngine, limits: ServeLimits | None = None,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI application around an engine (TextEngine or DestaEngine)."""
    limits = limits or ServeLimits()
    app = FastAPI(title="desta serve")
    app.add_middleware(RequireKey, api_key=api_key)
    slots = Slots(limits.max_concurrent, limits.queue, limits.queue_seconds)

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "owned_by": "desta"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        try:
            body = _request_body(await _read_body(request, limits.max_body_bytes), engine)
            settings = settings_from(body, limits)
            include_usage = _include_usage(body)
            messages, audios = parse_messages(body, engine, limits)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(400, f"the request body is not valid JSON: {getattr(err, 'msg', err)}")
        except RequestError as err:
            return _error(err.status, err.message, err.code, err.param)
        except ClientDisconnect:
            return _error(400, "the client went away before sending the whole body")
        slot = await slots.take()
        if slot is None:
            return _busy(limits)
        if await request.is_disconnected():  # left while queued: nobody to answer
            slot.release()
            return _error(400, "the client went away while waiting for a slot")
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not body.get("stream"):
            try:
                generation, prompt_tokens = await run_in_threadpool(engine.generate, messages, audios, settings,
                                                                    limits.max_prompt_tokens)
            except PromptTooLong as err:
                return _error(400, str(err), "context_length_exceeded", "messages")
            finally:
                slot.release()
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": created, "model": engine.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text},
                             "finish_reason": generation.finish_reason}],
                "usage": _usage(prompt_tokens, generation.completion_tokens),
            })
        try:
            stream = await run_in_threadpool(engine.stream, messages, audios, settings,
                                             max_prompt_tokens=limits.max_prompt_tokens, on_done=slot.release)
        except PromptTooLong as err:
            slot.release()
            return _error(400, str(err), "context_length_exceeded", "messages")
        except BaseException:
            slot.release()
            raise
        return GuardedStream(_events(stream, completion_id, created, engine.model_id, include_usage),
                             on_close=lambda: _finish(stream, slot), stop=stream.stopped.set)

    return app


def _include_usage(body: dict) -> bool:
    """The request's stream_options.include_usage (only with stream: true, as the OpenAI API has it)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not body.get("stream"):
        raise RequestError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(400, f"stream_options must be an object like {{\"include_usage\": true}}, got "
                                f"{options!r}", param="stream_options")
    return bool(options.get("include_usage"))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _events(stream: Stream, completion_id: str, created: int, model_id: str,
                  include_usage: bool = False) -> AsyncIterator[str]:
    """The stream's pieces as server-sent events in the OpenAI chunk shape: the last one with the finish reason
    ("length" when cut at max_tokens), then with `include_usage` a chunk with no choices and the usage (every
    chunk before it has "usage": null), then [DONE]."""
    def event(choices: list[dict], usage: dict | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                   "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def chunk(delta: dict, finish: str | None = None) -> str:
        return event([{"index": 0, "delta": delta, "finish_reason": finish}])

    yield chunk({"role": "assistant", "content": ""})
    pieces = iter(stream)
    while (piece := await run_in_threadpool(next, pieces, None)) is not None:
        if piece:
            yield chunk({"content": piece})
    generation = stream.generation
    yield chunk({}, generation.finish_reason if generation else "stop")
    if include_usage and generation:
        yield event([], _usage(stream.prompt_tokens, generation.completion_tokens))
    yield "data: [DONE]\n\n"


async def _finish(stream: Stream, slot: Slot) -> None:
    """Stop the generation (a no-op when it ended by itself), wait for its thread, free the slot (if the end of
    generation has not freed it already)."""
    try:
        await run_in_threadpool(stream.stop)
    finally:
        slot.release()


@dataclass
class ServeConfig:
    """Serve a DeSTA checkpoint (or a text LLM) behind an OpenAI-compatible chat-completions API."""

    POSITIONAL = ("checkpoint",)
    checkpoint: str | None = None
    """DeSTA checkpoint folder (or give llm)"""
    llm: str | None = None
    """serve a plain chat LLM (Hub id or folder) instead"""
    model_name: str | None = None
    """the model id clients ask for (default: the checkpoint folder's name, or the Hub id)"""
    host: str = "127.0.0.1"
    """bind address; 127.0.0.1 serves this machine only"""
    port: int = 8000
    """TCP port"""
    api_key_env: str = "DESTA_API_KEY"
    """environment variable holding the key clients must send (unset: no key)"""
    max_body_mb: float = 25.0
    """largest request body, MiB"""
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    """longest audio part, seconds (a longer one is refused, naming its length)"""
    max_tokens: int = 1024
    """largest max_tokens a request may ask"""
    max_concurrent: int = 1
    """requests generating at once; more wait in the queue"""
    queue: int = ServeLimits.queue
    """requests that may wait for a slot (first come, first served); more get 503 at once (0: no queue)"""
    queue_seconds: float = ServeLimits.queue_seconds
    """longest wait in the queue before a 503"""
    max_prompt_tokens: int | None = None
    """longest prompt in tokens (null: what the model's context holds besides max_tokens)"""
    log_level: str = "warning"
    """uvicorn log level"""

    def __post_init__(self) -> None:
        problems = []
        if (self.checkpoint is None) == (self.llm is None):
            problems.append(("checkpoint", "give a DeSTA checkpoint or llm=MODEL for a text-only model, not both"))
        if not 0 < self.port < 65536:
            problems.append(("port", f"must be in 1-65535, got {self.port}"))
        if min(self.max_body_mb, self.max_audio_seconds) <= 0 or min(self.max_tokens, self.max_concurrent,
                                                                     self.max_prompt_tokens or 1) < 1:
            problems.append(("max_body_mb", "the size, duration, token and concurrency limits must be positive"))
        if self.queue < 0 or not self.queue_seconds > 0:
            problems.append(("queue", f"queue must be 0 or more and queue_seconds positive, got {self.queue} and "
                                      f"{self.queue_seconds}"))
        raise_problems(problems)

    def limits(self) -> ServeLimits:
        """The per-request limits these settings give (max_body_mb converted to bytes)."""
        return ServeLimits(max_body_bytes=int(self.max_body_mb * 2**20), max_audio_seconds=self.max_audio_seconds,
                           max_tokens=self.max_tokens, max_concurrent=self.max_concurrent,
                           max_prompt_tokens=self.max_prompt_tokens, queue=self.queue,
                           queue_seconds=self.queue_seconds)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; OSError naming the address and the fix when it is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise OSError(f"cannot bind {host}:{port}: unknown host ({err.strerror}); give --host 127.0.0.1 or an "
                      "address of this machine") from None
    family, kind, protocol, _, address = infos[0]
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT can be reused
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot bind {host}:{port}: {err.strerror}; another program (or desta serve) is using the "
                      "port: stop it or give --port") from None
    sock.listen(2048)
    return sock


def serve(config: ServeConfig) -> None:
    """Take the port (before the model loads, so a busy port is said at once), load the model, serve until
    interrupted."""
    import os

    require_extra("serve", "desta serve")
    import uvicorn

    from desta.serving.engine import load_engine

    sock = bind(config.host, config.port)
    engine = load_engine(config.checkpoint, config.llm, config.model_name)
    api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
    print(f"serving {engine.model_id!r} on http://{config.host}:{config.port}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config.limits(), api_key), log_level=config.log_level))
    server.run(sockets=[sock])
