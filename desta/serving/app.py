"""`desta app`: a web demo in the browser (Gradio) for a checkpoint, a text LLM, or a running `desta serve`.

Record from the microphone or upload a clip, type an instruction (or pick one of the eval
instructions), and watch the answer stream in beside Whisper's transcript of the clip and its
duration. Follow-up turns keep the conversation and its clips; a turn without a clip is a text-only
turn. Binds 127.0.0.1 and shares no public link unless told; the size, duration, token and
concurrency limits are those of `desta serve`; a request the page turns away (no input, a clip too
long, too large or undecodable) is one line on stderr, not a traceback. Gradio is imported inside
these functions only, so no other command pays for it.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from desta.audio import SAMPLE_RATE, load_audio
from desta.core.args import raise_problems
from desta.core.extras import require_extra
from desta.core.generation import SamplingSettings
from desta.core.hub import public_name
from desta.prompts import speech_messages, with_system
from desta.serving.serve import AUDIO_FORMATS, ServeLimits

if TYPE_CHECKING:
    import gradio

    from desta.serving.engine import DestaEngine, TextEngine

DEFAULTS = ServeLimits()
# The eval instructions offered as examples: one phrasing per category that needs no label list.
EXAMPLE_CATEGORIES = ("transcription", "gender", "speaking_speed", "pitch", "volume", "duration", "open")


def example_instructions() -> list[str]:
    """Instructions from desta's eval set (never in a training pool), one per category, to click and ask."""
    from desta.prompts import EVAL_INSTRUCTIONS

    found = [next((t for t in EVAL_INSTRUCTIONS.get(c, []) if "{" not in t), None) for c in EXAMPLE_CATEGORIES]
    return [t for t in found if t]


@dataclass
class Clip:
    """A clip of the conversation: where the browser put it, what Whisper heard, how long it is."""

    path: str
    transcript: str | None
    seconds: float


class LocalChat:
    """Answers from a model loaded in this process: a DeSTA checkpoint (DestaEngine) or a text LLM. The engine
    asks with its system prompt (the one a checkpoint was trained with, unless the app was told another)."""

    def __init__(self, engine: DestaEngine | TextEngine):
        self.engine = engine
        self.model_id, self.accepts_audio = engine.model_id, engine.accepts_audio
        self.system_prompt = engine.system_prompt

    def transcribe(self, samples: Any) -> str | None:
        """Whisper's transcript of one clip (samples at 16 kHz), as the model itself receives it."""
        return self.engine.transcribe([samples])[0]

    def messages(self, turns: list[dict]) -> list[dict]:
        """The conversation as chat messages: the system prompt, and one audio placeholder before the text of a
        turn with a clip (desta.prompts.speech_messages)."""
        return speech_messages([{"role": t["role"], "text": t["text"], "clips": int(bool(t.get("clip")))}
                                for t in turns], self.engine.audio_token or "", self.system_prompt)

    def stream(self, turns: list[dict], clips: list[Clip], settings: SamplingSettings) -> Iterator[str]:
        """Pieces of the answer to the conversation's last turn, as they are generated."""
        audios = [load_audio(c.path) for c in clips]
        if not self.accepts_audio:
            yield from self.engine.stream(self.messages(turns), [], settings)
            return
        yield from self.engine.stream(self.messages(turns), audios, settings, transcripts=[c.transcript
                                                                                           for c in clips])


class RemoteChat:
    """Answers from a running `desta serve` (or any OpenAI-compatible server taking input_audio parts),
    streamed as server-sent events. The server transcribes clips itself and does not return what it heard."""

    accepts_audio = True

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 system_prompt: str | None = None, timeout: float = 600.0):
        import httpx

        self.base_url, self.system_prompt = base_url.rstrip("/"), system_prompt
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        try:
            listing = self.client.get("/models")
        except httpx.HTTPError as err:
            raise ConnectionError(f"cannot reach {self.base_url}/models ({err}); start `desta serve CHECKPOINT` "
                                  "there, or give the right server URL (ending in /v1)") from err
        if listing.status_code != 200:
            raise ConnectionError(f"{self.base_url}/models answered HTTP {listing.status_code}: "
                                  f"{listing.text[:200]}; is the API key in the api_key_env variable right?")
        served = [m["id"] for m in listing.json().get("data", [])]
        if model is not None and model not in served:
            raise ValueError(f"{self.base_url} serves {served}, not {model!r}; give model_name from that list")
        if not served:
            raise ValueError(f"{self.base_url} serves no model")
        self.model_id = model or served[0]

    def transcribe(self, samples: Any) -> str | None:
        """None: the server does not say what its Whisper heard."""
        return None

    def messages(self, turns: list[dict]) -> list[dict]:
        """The conversation in the OpenAI shape: a turn with a clip carries it as a base64 input_audio part."""
        out = []
        for turn in turns:
            if not turn.get("clip"):
                out.append({"role": turn["role"], "content": turn["text"]})
                continue
            suffix = Path(turn["clip"]).suffix.lstrip(".").lower()
            data = base64.b64encode(Path(turn["clip"]).read_bytes()).decode()
            out.append({"role": turn["role"], "content": [
                {"type": "input_audio", "input_audio": {"data": data, "format": suffix if suffix in AUDIO_FORMATS
                                                        else "wav"}},
                {"type": "text", "text": turn["text"]}]})
        return with_system(out, self.system_prompt)

    def stream(self, turns: list[dict], clips: list[Clip], settings: SamplingSettings) -> Iterator[str]:
        """Pieces of the answer as the server streams them; an error answer raises with the server's message."""
        body = {"model": self.model_id, "messages": self.messages(turns), "stream": True,
                "max_tokens": settings.max_new_tokens, "temperature": settings.temperature, "seed": settings.seed}
        with self.client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text[:300]
                raise RuntimeError(f"{self.base_url} answered HTTP {response.status_code}: {message}")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                piece = json.loads(line[len("data: "):])["choices"][0]["delta"].get("content")
                if piece:
                    yield piece


def _shown(turn: dict) -> dict:
    """A turn as the chatbot shows it: a user turn with a clip names the clip and its length first."""
    text = turn["text"]
    if turn.get("clip"):
        text = f"[{Path(turn['clip']).name}, {turn['seconds']:.2f} s]" + (f"\n{text}" if text else "")
    return {"role": turn["role"], "content": text}


def _clip(chat: LocalChat | RemoteChat, audio_path: str, limits: ServeLimits) -> Clip:
    """A clip of the page's turn, checked against the server's limits and transcribed (ValueError: why it is
    refused)."""
    if not chat.accepts_audio:
        raise ValueError(f"{chat.model_id} is a text-only model: leave the audio empty")
    size = os.path.getsize(audio_path)
    if size > limits.max_body_bytes:
        raise ValueError(f"the clip is {size / 2**20:.1f} MiB; this app accepts at most "
                         f"{limits.max_body_bytes / 2**20:.1f} MiB")
    samples = load_audio(audio_path, name=Path(audio_path).name)  # AudioError (a ValueError) says why not
    seconds = len(samples) / SAMPLE_RATE
    if seconds > limits.max_audio_seconds:
        raise ValueError(f"the clip is {seconds:.0f} s long; this app accepts at most "
                         f"{limits.max_audio_seconds:.0f} s per clip")
    return Clip(audio_path, chat.transcribe(samples), seconds)


def _page(gr: Any, chat: LocalChat | RemoteChat, limits: ServeLimits, max_new_tokens: int,
          respond: Callable[..., Iterator[tuple]], clear: Callable[[], tuple]) -> gradio.Blocks:
    """The page's layout (gradio as `gr`): audio, instruction, buttons and examples beside the conversation,
    Whisper's transcript and the duration; Send streams `respond` (its `/chat` endpoint), New conversation `clear`."""
    kind = "speech" if chat.accepts_audio else "text-only"
    shown = public_name(chat.model_id)
    with gr.Blocks(title=f"desta: {shown}", analytics_enabled=False) as app:
        gr.Markdown(f"## desta · `{shown}` ({kind})\n"
                    + ("Record or upload a clip, ask about it, and keep asking: each turn may add a clip, or none "
                       f"for a text-only turn. Clips up to {limits.max_audio_seconds:.0f} s."
                       if chat.accepts_audio else "A text-only model: type and send."))
        state = gr.State({"turns": [], "clips": []})
        with gr.Row():
            with gr.Column(scale=2):
                # upload first: the file input exists as soon as the page loads (the microphone is one click away)
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio (optional)",
                                 elem_id="audio", visible=chat.accepts_audio)
                instruction = gr.Textbox(label="Instruction", lines=2, elem_id="instruction",
                                         placeholder="Ask about the clip, e.g. What does the speaker say?")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    new = gr.Button("New conversation", elem_id="new")
                tokens = gr.Slider(1, limits.max_tokens, value=min(max_new_tokens, limits.max_tokens), step=1,
                                   label="Max new tokens", elem_id="tokens")
                gr.Examples([[e] for e in example_instructions()], inputs=[instruction],
                            label="Instructions from desta's eval set")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420)
                with gr.Row():
                    transcript = gr.Textbox(label="Whisper transcript (latest clip)", elem_id="transcript",
                                            interactive=False, visible=chat.accepts_audio, max_lines=4, scale=3)
                    duration = gr.Textbox(label="Duration", elem_id="duration", interactive=False,
                                          visible=chat.accepts_audio)
        inputs, outputs = [audio, instruction, tokens, state], [chatbot, transcript, duration, state]
        # after a turn the inputs empty: a follow-up refers to the clips already in the conversation
        send.click(respond, inputs, outputs, api_name="chat").success(
            lambda: (None, ""), None, [audio, instruction], api_visibility="private")
        instruction.submit(respond, inputs, outputs, api_visibility="private").success(
            lambda: (None, ""), None, [audio, instruction], api_visibility="private")
        new.click(clear, None, [*outputs, audio, instruction], api_name="new_conversation")
    return app


def build_app(chat: LocalChat | RemoteChat, limits: ServeLimits = DEFAULTS, max_new_tokens: int = 256,
              temperature: float = 0.0) -> gradio.Blocks:
    """The Gradio page around a chat: audio in (upload or microphone), an instruction, the streamed answer,
    Whisper's transcript and the duration; its `/chat` endpoint answers gradio_client too."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
    require_extra("app", "desta app")
    import gradio as gr

    def refuse(message: str) -> gradio.Error:
        """The error the page shows for a request it turns away, logged as one line (not a traceback)."""
        print(f"desta app: refused a request: {message}", file=sys.stderr, flush=True)
        return gr.Error(message, print_exception=False)

    def respond(audio_path: str | None, instruction: str, tokens: float, state: dict) -> Iterator[tuple]:
        turns, clips = list(state["turns"]), [Clip(**c) for c in state["clips"]]
        instruction = (instruction or "").strip()
        if not audio_path and not instruction:
            raise refuse("Record or upload a clip, or type an instruction.")
        turn: dict[str, Any] = {"role": "user", "text": instruction, "clip": None}
        if audio_path:
            try:
                clips.append(_clip(chat, audio_path, limits))
            except ValueError as err:
                raise refuse(str(err)) from err
            turn.update(clip=audio_path, seconds=clips[-1].seconds)
        turns.append(turn)
        last = clips[-1] if clips else None
        heard = "" if last is None else (last.transcript if last.transcript is not None
                                         else "(the server does not return its transcript)")
        duration = "" if last is None else f"{last.seconds:.2f} s"
        shown = [_shown(t) for t in turns] + [{"role": "assistant", "content": ""}]
        settings = SamplingSettings(max_new_tokens=int(tokens), temperature=temperature)
        answer = ""
        try:
            for piece in chat.stream(turns, clips, settings):
                answer += piece
                shown[-1]["content"] = answer
                yield shown, heard, duration, state
        except (RuntimeError, ValueError, OSError) as err:
            raise gr.Error(str(err)) from err
        turns.append({"role": "assistant", "text": answer.strip(), "clip": None})
        shown[-1]["content"] = answer.strip()
        state = {"turns": turns, "clips": [vars(c) for c in clips]}
        yield shown, heard, duration, state

    def clear() -> tuple:
        return [], "", "", {"turns": [], "clips": []}, None, ""

    app = _page(gr, chat, limits, max_new_tokens, respond, clear)
    app.queue(default_concurrency_limit=limits.max_concurrent)
    return app


@dataclass
class AppConfig:
    """A web demo (Gradio) for a DeSTA checkpoint, a text LLM, or a running desta serve."""

    POSITIONAL = ("checkpoint",)
    checkpoint: str | None = None
    """DeSTA checkpoint or exported folder (or give llm, or server)"""
    llm: str | None = None
    """a plain chat LLM (Hub id or folder) instead: text-only mode"""
    server: str | None = None
    """URL of a running desta serve (OpenAI-compatible), e.g. http://127.0.0.1:8000/v1, instead of a model here"""
    model_name: str | None = None
    """with server: the served model to ask (default: the first it lists)"""
    api_key_env: str = "DESTA_API_KEY"
    """with server: environment variable holding its API key (unset: none)"""
    system: str | None = None
    """system prompt; null: the one the checkpoint was trained with (with server: none)"""
    host: str = "127.0.0.1"
    """bind address; 127.0.0.1 serves this machine only"""
    port: int = 7860
    """TCP port"""
    share: bool = False
    """also open a public gradio.live link (reaches Gradio's share server)"""
    max_body_mb: float = DEFAULTS.max_body_bytes / 2**20
    """largest clip file, MiB (as desta serve)"""
    max_audio_seconds: float = DEFAULTS.max_audio_seconds
    """longest clip (as desta serve)"""
    max_tokens: int = DEFAULTS.max_tokens
    """largest answer length the slider allows (as desta serve)"""
    max_concurrent: int = DEFAULTS.max_concurrent
    """answers generating at once; more wait in Gradio's queue"""
    max_new_tokens: int = 256
    """answer length the slider starts at"""
    temperature: float = 0.0
    """0: greedy"""

    def __post_init__(self) -> None:
        problems = []
        if sum(x is not None for x in (self.checkpoint, self.llm, self.server)) != 1:
            problems.append(("checkpoint", "give one of: a DeSTA checkpoint, llm=MODEL (text only), or "
                                           "server=URL of a running desta serve"))
        if not 0 < self.port < 65536:
            problems.append(("port", f"must be in 1-65535, got {self.port}"))
        if min(self.max_body_mb, self.max_audio_seconds) <= 0 or min(self.max_tokens, self.max_concurrent) < 1:
            problems.append(("max_body_mb", "the size, duration, token and concurrency limits must be positive"))
        if not 1 <= self.max_new_tokens <= self.max_tokens or self.temperature < 0:
            problems.append(("max_new_tokens", f"must be in [1, max_tokens={self.max_tokens}], and temperature 0 "
                                               "or more"))
        raise_problems(problems)

    def limits(self) -> ServeLimits:
        """The per-answer limits these settings give (max_body_mb converted to bytes)."""
        return ServeLimits(max_body_bytes=int(self.max_body_mb * 2**20), max_audio_seconds=self.max_audio_seconds,
                           max_tokens=self.max_tokens, max_concurrent=self.max_concurrent)


def make_chat(config: AppConfig) -> LocalChat | RemoteChat:
    """The chat the settings ask for: a model loaded here, or a client of a running server."""
    if config.server:
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        return RemoteChat(config.server, config.model_name, key, config.system or None)
    from desta.serving.engine import load_engine

    return LocalChat(load_engine(config.checkpoint, config.llm, system_prompt=config.system))


def app(config: AppConfig) -> None:
    """Load the model (or connect to the server) and serve the page until interrupted."""
    chat = make_chat(config)
    page = build_app(chat, config.limits(), config.max_new_tokens, config.temperature)
    print(f"desta app for {chat.model_id!r} on http://{config.host}:{config.port}"
          + (" (and a public share link)" if config.share else ""), flush=True)
    page.launch(server_name=config.host, server_port=config.port, share=config.share,
                max_file_size=config.limits().max_body_bytes, show_error=True)
