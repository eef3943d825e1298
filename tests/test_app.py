"""desta app: the Gradio page answers real clients (gradio_client; a headless browser with the `browser` marker)."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf

from desta.audio.tts import Voice, synthesize
from desta.core.args import ConfigError, parse_command
from desta.core.generation import SamplingSettings
from desta.serving.app import AppConfig, LocalChat, RemoteChat, build_app, example_instructions
from desta.serving.engine import DestaEngine
from desta.serving.serve import ServeLimits

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent
TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(checkpoint):
    from desta.model.loading import load

    model, processor = load(checkpoint)
    return DestaEngine(model, processor, "tiny-desta")


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "question.wav"
    sf.write(path, synthesize("Excuse me, where is the station?", Voice(accent="British", variant="f2")), 16000)
    return path


def _launch(page):
    from gradio_client import Client

    _, url, _ = page.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    return Client(url, verbose=False)


def _content(message):
    content = message["content"]  # gradio 6 sends a list of {"text", "type"} parts
    return "".join(p["text"] for p in content) if isinstance(content, list) else content


def _expected(engine, messages, clips):
    return engine.generate(messages, clips, SamplingSettings(max_new_tokens=TOKENS))[0].text


def test_gradio_client_uploads_a_wav_and_gets_the_models_answer(engine, wav):
    from gradio_client import handle_file

    from desta.audio import load_audio

    chat = LocalChat(engine)  # the engine asks with the trained system prompt
    page = build_app(chat, ServeLimits(max_audio_seconds=30, max_tokens=64))
    try:
        client = _launch(page)
        history, transcript, duration = client.predict(handle_file(str(wav)), "Who is speaking?", TOKENS,
                                                       api_name="/chat")
        clip = load_audio(wav)
        system = [{"role": "system", "content": "Focus on the audio clips and instructions."}]
        first = system + [{"role": "user", "content": f"{engine.audio_token}\nWho is speaking?"}]
        answer = _expected(engine, first, [clip])
        assert [m["role"] for m in history] == ["user", "assistant"]
        assert _content(history[0]) == f"[question.wav, {len(clip) / 16000:.2f} s]\nWho is speaking?"
        assert _content(history[1]) == answer and answer  # streamed pieces add up to the model's answer
        assert transcript == engine.transcribe([clip])[0] and duration == f"{len(clip) / 16000:.2f} s"

        # a follow-up without a clip: the conversation keeps the first clip and both earlier turns
        history, _, duration = client.predict(None, "And what does she want?", TOKENS, api_name="/chat")
        second = first + [{"role": "assistant", "content": answer},
                          {"role": "user", "content": "And what does she want?"}]
        assert len(history) == 4 and _content(history[3]) == _expected(engine, second, [clip])
        assert duration == f"{len(clip) / 16000:.2f} s"

        client.predict(api_name="/new_conversation")
        history, transcript, duration = client.predict(None, "Say hello.", TOKENS, api_name="/chat")
        only_text = system + [{"role": "user", "content": "Say hello."}]
        assert len(history) == 2 and _content(history[1]) == _expected(engine, only_text, [])
        assert (transcript, duration) == ("", "")  # a text-only turn: no clip to describe
    finally:
        page.close()


def test_the_app_keeps_desta_serves_limits(engine, tmp_path):
    from gradio_client import handle_file

    long = tmp_path / "long.wav"
    sf.write(long, synthesize("This sentence is spoken for longer than the limit allows.", Voice()), 16000)
    page = build_app(LocalChat(engine), ServeLimits(max_audio_seconds=1.0, max_tokens=16))
    try:
        client = _launch(page)
        with pytest.raises(Exception, match=r"the clip is \d+ s long; this app accepts at most 1 s per clip"):
            client.predict(handle_file(str(long)), "Who speaks?", 8, api_name="/chat")
        with pytest.raises(Exception, match="Value 17 is greater than maximum value 16"):  # the slider's bound
            client.predict(None, "Hello?", 17, api_name="/chat")
        with pytest.raises(Exception, match="Record or upload a clip, or type an instruction"):
            client.predict(None, "  ", 8, api_name="/chat")
    finally:
        page.close()
    with pytest.raises(ConfigError, match="give one of: a DeSTA checkpoint"):
        parse_command(AppConfig, ["ckpt", "--server", "http://127.0.0.1:1/v1"], prog="desta app")
    assert parse_command(AppConfig, ["ckpt"], prog="desta app").host == "127.0.0.1"  # this machine only
    assert not parse_command(AppConfig, ["ckpt"], prog="desta app").share


def test_the_app_can_answer_through_a_running_desta_serve(engine, wav):
    """Pointed at `desta serve` instead of a model: the same answer as the model itself gives."""
    import uvicorn
    from gradio_client import handle_file

    from desta.audio import load_audio
    from desta.serving.serve import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    page = None
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        page = build_app(RemoteChat(f"http://127.0.0.1:{port}/v1"), ServeLimits())
        client = _launch(page)
        history, transcript, duration = client.predict(handle_file(str(wav)), "Who is speaking?", TOKENS,
                                                       api_name="/chat")
        messages = [{"role": "user", "content": f"{engine.audio_token}\nWho is speaking?"}]
        assert _content(history[1]) == _expected(engine, messages, [load_audio(wav)])
        assert transcript == "(the server does not return its transcript)" and duration.endswith(" s")
        with pytest.raises(ValueError, match=r"serves \['tiny-desta'\], not 'other'"):
            RemoteChat(f"http://127.0.0.1:{port}/v1", model="other")
    finally:
        if page is not None:
            page.close()
        server.should_exit = True
        thread.join(timeout=10)
    with pytest.raises(ConnectionError, match="cannot reach .*; start `desta serve CHECKPOINT`"):
        RemoteChat(f"http://127.0.0.1:{_free_port()}/v1")


def test_a_refused_upload_is_one_line_not_a_traceback(engine, tmp_path, capfd):
    from gradio_client import handle_file

    long, broken = tmp_path / "long.wav", tmp_path / "broken.wav"
    sf.write(long, synthesize("This sentence is spoken for longer than the limit allows.", Voice()), 16000)
    broken.write_bytes(b"RIFF not really a wave file")
    page = build_app(LocalChat(engine), ServeLimits(max_audio_seconds=1.0, max_tokens=16))
    try:
        client = _launch(page)
        capfd.readouterr()
        for clip in (long, broken):
            with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its AppError
                client.predict(handle_file(str(clip)), "Who speaks?", 8, api_name="/chat")
        err = capfd.readouterr().err
    finally:
        page.close()
    refused = [line for line in err.splitlines() if line.startswith("desta app: refused a request: ")]
    assert len(refused) == 2 and "s long; this app accepts at most 1 s per clip" in refused[0]
    assert "Traceback" not in err, err


def test_examples_are_eval_instructions_never_trained_on():
    from desta.prompts import EVAL_INSTRUCTIONS, TRAINING_POOLS

    examples = example_instructions()
    evaluated = {t for templates in EVAL_INSTRUCTIONS.values() for t in templates}
    trained = {p for pool in TRAINING_POOLS.values() for p in pool}
    assert len(examples) >= 5 and set(examples) <= evaluated and not set(examples) & trained


def test_other_commands_do_not_import_gradio():
    code = "import sys; from desta.cli import usage; usage(); print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.browser
def test_a_real_browser_uploads_a_clip_and_sees_the_answer(checkpoint, wav, tmp_path):
    """The page in headless Chromium: upload, ask, wait for the streamed answer, take a screenshot."""
    if not shutil.which("chromium") and not Path("/usr/bin/chromium").exists():
        pytest.skip("no Chromium: apt-get install chromium")
    pytest.importorskip("playwright")
    shot = tmp_path / "app.png"
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "browser_check.py"), str(checkpoint),
                             "--audio", str(wav), "--screenshot", str(shot), "--max-new-tokens", str(TOKENS)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert printed["answer"].strip() and printed["duration"].endswith(" s") and printed["transcript"]
    assert printed["external requests"] == "[]"  # the page loads nothing from outside this machine
    assert shot.stat().st_size > 20_000
