"""`desta serve`: an OpenAI-compatible chat-completions server for a DeSTA checkpoint or a text LLM.

Reads a checkpoint folder (DeSTA) or a chat LLM folder/Hub id (text only). Serves
GET /v1/models and POST /v1/chat/completions with text and `input_audio` parts (base64 WAV, FLAC,
MP3), streaming (server-sent events) or not. Binds 127.0.0.1 unless told otherwise. Oversize
bodies, undecodable or too long audio, too many tokens, unknown models and bad keys get 4xx JSON
errors in the OpenAI shape; a busy server answers 503 with Retry-After so clients back off.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from desta.audio import SAMPLE_RATE, AudioError, load_audio
from desta.core.args import raise_problems
from desta.core.generation import SamplingSettings

if TYPE_CHECKING:
    from desta.inference import DestaEngine, TextEngine

AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")


@dataclass
class ServeLimits:
    """What one request may ask for."""

    max_body_bytes: int = 25 * 2**20  # 25 MiB of JSON, base64 audio included
    max_audio_seconds: float = 120.0  # per audio part
    max_tokens: int = 1024  # per answer
    max_concurrent: int = 1  # requests generating at once; more get 503 + Retry-After


class RequestError(Exception):
    """A request the server refuses: the HTTP status and the OpenAI-shaped error (message, code, param)."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error(status: int, message: str, code: str = "invalid_request_error", param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": code, "param": param, "code": code}},
                        status_code=status)


def parse_messages(body: dict, engine: DestaEngine | TextEngine,
                   limits: ServeLimits) -> tuple[list[dict], list[np.ndarray]]:
    """OpenAI messages -> chat messages with audio placeholders, and the decoded clips in order."""
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
            chat.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of parts",
                               param=f"messages[{i}].content")
        pieces = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(str(part.get("text", "")))
            elif kind == "input_audio":
                if not engine.accepts_audio:
                    raise RequestError(400, f"{where}: this server's model {engine.model_id!r} is text-only",
                                       param=where)
                audios.append(_decode_audio(part.get("input_audio") or {}, where, limits))
                pieces.append(engine.audio_token)
            else:
                raise RequestError(400, f"{where}: unsupported part type {kind!r}; use text or input_audio",
                                   param=where)
        chat.append({"role": message["role"], "content": "\n".join(pieces)})
    return chat, audios


def _decode_audio(part: dict, where: str, limits: ServeLimits) -> np.ndarray:
    fmt = str(part.get("format", "wav")).lower()
    if fmt not in AUDIO_FORMATS:
        raise RequestError(400, f"{where}: audio format {fmt!r} is not supported; use one of {AUDIO_FORMATS}",
                           param=where)
    try:
        data = base64.b64decode(part.get("data") or "", validate=True)
    except (binascii.Error, ValueError) as err:
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


def settings_from(body: dict, limits: ServeLimits) -> SamplingSettings:
    """The request's max_tokens (or max_completion_tokens), temperature, top_p, repetition_penalty and seed,
    checked against the limits; RequestError (400) when one is out of range or not a number."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or min(256, limits.max_tokens)
    if not isinstance(max_tokens, int) or max_tokens < 1 or max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens must be an integer in [1, {limits.max_tokens}], got {max_tokens!r}",
                           param="max_tokens")
    try:
        return SamplingSettings(max_new_tokens=max_tokens, temperature=float(body.get("temperature") or 0.0),
                                top_p=float(body.get("top_p") or 1.0),
                                repetition_penalty=float(body.get("repetition_penalty") or 1.0),
                                seed=int(body.get("seed") or 0))
    except (TypeError, ValueError) as err:
        raise RequestError(400, f"bad sampling setting: {err}") from err


def create_app(engine: DestaEngine | TextEngine, limits: ServeLimits | None = None,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI application around an engine (TextEngine or DestaEngine)."""
    limits = limits or ServeLimits()
    app = FastAPI(title="desta serve")
    slots = threading.BoundedSemaphore(limits.max_concurrent)

    def models_payload() -> dict:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "owned_by": "desta"}]}

    def authorised(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    @app.get("/v1/models")
    def list_models(request: Request):
        if not authorised(request):
            return _error(401, "invalid API key", "invalid_api_key")
        return models_payload()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return _error(413, f"request body is {int(declared)} bytes; the limit is {limits.max_body_bytes}")
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            return _error(413, f"request body is {len(raw)} bytes; the limit is {limits.max_body_bytes}")
        if not authorised(request):
            return _error(401, "invalid API key", "invalid_api_key")
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise RequestError(400, "the request body must be a JSON object")
            if body.get("model") != engine.model_id:
                raise RequestError(404, f"model {body.get('model')!r} not found; available: [{engine.model_id!r}]",
                                   "model_not_found", "model")
            settings = settings_from(body, limits)
            messages, audios = parse_messages(body, engine, limits)
        except json.JSONDecodeError as err:
            return _error(400, f"the request body is not valid JSON: {err.msg}")
        except RequestError as err:
            return _error(err.status, err.message, err.code, err.param)
        if not slots.acquire(blocking=False):
            response = _error(503, "the server is busy; retry shortly", "server_busy")
            response.headers["Retry-After"] = "1"
            return response
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not body.get("stream"):
            try:
                generation, prompt_tokens = await run_in_threadpool(engine.generate, messages, audios, settings)
            finally:
                slots.release()
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": created, "model": engine.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text},
                             "finish_reason": generation.finish_reason}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generation.completion_tokens,
                          "total_tokens": prompt_tokens + generation.completion_tokens},
            })

        def events():
            def chunk(delta: dict, finish: str | None = None) -> str:
                payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                           "model": engine.model_id, "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish}]}
                return f"data: {json.dumps(payload)}\n\n"

            try:
                yield chunk({"role": "assistant", "content": ""})
                for piece in engine.stream(messages, audios, settings):
                    if piece:
                        yield chunk({"content": piece})
                yield chunk({}, "stop")
                yield "data: [DONE]\n\n"
            finally:
                slots.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@dataclass
class ServeConfig:
    """Serve a DeSTA checkpoint (or a text LLM) behind an OpenAI-compatible chat-completions API."""

    POSITIONAL = ("checkpoint",)
    checkpoint: str | None = None
    """DeSTA checkpoint folder (or give llm)"""
    llm: str | None = None
    """serve a plain chat LLM (Hub id or folder) instead"""
    model_name: str | None = None
    """the model id clients ask for (default: the path given)"""
    host: str = "127.0.0.1"
    """bind address; 127.0.0.1 serves this machine only"""
    port: int = 8000
    """TCP port"""
    api_key_env: str = "DESTA_API_KEY"
    """environment variable holding the key clients must send (unset: no key)"""
    max_body_mb: float = 25.0
    """largest request body, MiB"""
    max_audio_seconds: float = 120.0
    """longest audio part"""
    max_tokens: int = 1024
    """largest max_tokens a request may ask"""
    max_concurrent: int = 1
    """requests generating at once; more get 503"""
    log_level: str = "warning"
    """uvicorn log level"""

    def __post_init__(self) -> None:
        problems = []
        if (self.checkpoint is None) == (self.llm is None):
            problems.append(("checkpoint", "give a DeSTA checkpoint or llm=MODEL for a text-only model, not both"))
        if not 0 < self.port < 65536:
            problems.append(("port", f"must be in 1-65535, got {self.port}"))
        if min(self.max_body_mb, self.max_audio_seconds) <= 0 or min(self.max_tokens, self.max_concurrent) < 1:
            problems.append(("max_body_mb", "the size, duration, token and concurrency limits must be positive"))
        raise_problems(problems)

    def limits(self) -> ServeLimits:
        """The per-request limits these settings give (max_body_mb converted to bytes)."""
        return ServeLimits(max_body_bytes=int(self.max_body_mb * 2**20), max_audio_seconds=self.max_audio_seconds,
                           max_tokens=self.max_tokens, max_concurrent=self.max_concurrent)


def serve(config: ServeConfig) -> None:
    """Load the model and serve until interrupted."""
    import os

    import uvicorn

    from desta.inference import load_engine

    engine = load_engine(config.checkpoint, config.llm, config.model_name)
    api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
    print(f"serving {engine.model_id!r} on http://{config.host}:{config.port}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)
    uvicorn.run(create_app(engine, config.limits(), api_key), host=config.host, port=config.port,
                log_level=config.log_level)
