"""desta serve answers real HTTP clients; the targets stage's HTTP backend runs against it."""

import base64
import io
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from desta.core.generation import BackendError, OpenAIBackend, SamplingSettings
from desta.loading import build, save
from desta.tiny import save_tiny_bases
from desta.tts import synthesize

KEY = "test-key-not-a-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, env_key=None):
    port = _free_port()
    env = {**os.environ, "DESTA_API_KEY": env_key} if env_key else {k: v for k, v in os.environ.items()
                                                                     if k != "DESTA_API_KEY"}
    process = subprocess.Popen([sys.executable, "-m", "desta.cli", "serve", *args, "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    headers = {"Authorization": f"Bearer {env_key}"} if env_key else {}
    deadline = time.time() + 90
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers, timeout=1).status_code == 200:
                return process, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start in 90 s")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return save_tiny_bases(tmp_path_factory.mktemp("bases"))


@pytest.fixture(scope="module")
def text_server(bases):
    process, url = _start(["--llm", str(bases[1]), "--model-name", "tiny-llm", "--max-concurrent", "1"], KEY)
    yield url
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def desta_server(bases, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model, processor = build(str(bases[0]), str(bases[1]))
    save(model, processor, folder)
    process, url = _start([str(folder), "--model-name", "tiny-desta", "--max-body-mb", "0.5",
                           "--max-audio-seconds", "20"])
    yield url
    process.kill()
    process.wait()


def _wav_b64(samples: np.ndarray, fmt: str = "WAV", rate: int = 16000) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_text_completion_with_the_openai_client(text_server):
    from openai import OpenAI

    client = OpenAI(base_url=text_server, api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["tiny-llm"]
    reply = client.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 5
    stream = client.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=5, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces).strip() == reply.choices[0].message.content


def test_http_backend_success_matches_local_generation(text_server, bases):
    from desta.core.generation import TransformersBackend

    backend = OpenAIBackend(text_server, "tiny-llm", api_key=KEY)
    conversations = [[{"role": "user", "content": f"Say {word}"}] for word in ("one", "two", "three")]
    settings = SamplingSettings(max_new_tokens=6)
    remote = backend.generate(conversations, settings)
    local = TransformersBackend(str(bases[1])).generate(conversations, settings)
    assert [g.text for g in remote] == [g.text for g in local]


def test_http_backend_bad_model_name_lists_what_is_served(text_server):
    backend = OpenAIBackend(text_server, "gpt-7", api_key=KEY)
    with pytest.raises(BackendError, match=r"does not serve model 'gpt-7' \(HTTP 404\); available: \['tiny-llm'\]"):
        backend.generate([[{"role": "user", "content": "Hi"}]], SamplingSettings(max_new_tokens=2))


def test_http_backend_refused_key_is_clear_and_never_echoed(text_server):
    backend = OpenAIBackend(text_server, "tiny-llm", api_key="wrong-key-123")
    with pytest.raises(BackendError, match="refused the API key") as err:
        backend.generate([[{"role": "user", "content": "Hi"}]], SamplingSettings(max_new_tokens=2))
    assert "wrong-key-123" not in str(err.value)


def test_http_backend_timeout_retries_then_fails(text_server):
    backend = OpenAIBackend(text_server, "tiny-llm", api_key=KEY, timeout=0.001, max_retries=2, backoff=0.01)
    with pytest.raises(BackendError, match="failed 3 times; last error: "):
        backend.generate([[{"role": "user", "content": "Hi"}]], SamplingSettings(max_new_tokens=50))
    assert backend.retries == 2 and len(backend.failures) == 3
    # the first attempt timed out; later ones may find the server still busy with it (503)
    assert "Timeout" in backend.failures[0]
    assert all("Timeout" in f or "HTTP 503" in f for f in backend.failures)


def test_http_backend_retries_a_busy_server(text_server):
    backend = OpenAIBackend(text_server, "tiny-llm", api_key=KEY, concurrency=4, backoff=0.2, max_retries=8)
    conversations = [[{"role": "user", "content": f"Count to {n}"}] for n in range(4)]
    results = backend.generate(conversations, SamplingSettings(max_new_tokens=40))
    assert len(results) == 4 and all(r.completion_tokens > 0 for r in results)
    assert backend.retries >= 1  # the server holds one request at a time and answers 503 to the rest


def test_speech_model_answers_audio_parts(desta_server):
    from openai import OpenAI

    client = OpenAI(base_url=desta_server, api_key="unused")
    audio = _wav_b64(synthesize("Where is the station?"))
    content = [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
               {"type": "text", "text": "What can you hear from the audio?"}]
    reply = client.chat.completions.create(model="tiny-desta", messages=[{"role": "user", "content": content}],
                                           max_tokens=4)
    assert isinstance(reply.choices[0].message.content, str) and reply.usage.prompt_tokens > 64  # 64 audio slots
    flac = [{"type": "input_audio", "input_audio": {"data": _wav_b64(synthesize("Hello."), "FLAC"),
                                                    "format": "flac"}}, {"type": "text", "text": "Who?"}]
    stream = client.chat.completions.create(model="tiny-desta", messages=[{"role": "user", "content": flac}],
                                            max_tokens=4, stream=True)
    assert len(list(stream)) >= 2
    text_only = client.chat.completions.create(model="tiny-desta", max_tokens=3,
                                               messages=[{"role": "user", "content": "Hi"}])
    assert text_only.choices[0].finish_reason in ("stop", "length")


def test_bad_requests_get_4xx_json_errors(desta_server):
    url = f"{desta_server}/chat/completions"
    audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"not audio at all").decode(),
                                                         "format": "wav"}}
    cases = [
        ({"model": "tiny-desta", "messages": [{"role": "user", "content": [audio_part]}]}, 400,
         "cannot decode audio"),
        ({"model": "other", "messages": [{"role": "user", "content": "Hi"}]}, 404, "model 'other' not found"),
        ({"model": "tiny-desta", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**6}, 400,
         "max_tokens must be an integer in [1, 1024]"),
        ({"model": "tiny-desta", "messages": []}, 400, "non-empty list"),
        ({"model": "tiny-desta", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {  # 8 kHz FLAC: 30 s of audio inside the body limit
                "data": _wav_b64(np.tile(synthesize("Hello there.")[::2], 30), "FLAC", 8000), "format": "flac"}}]}]},
         400, "at most 20 s per part"),
    ]
    for body, status, message in cases:
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == status, (body.get("model"), response.text)
        assert message in response.json()["error"]["message"]
    huge = {"model": "tiny-desta", "messages": [{"role": "user", "content": "x" * 600_000}]}
    response = httpx.post(url, json=huge, timeout=30)
    assert response.status_code == 413 and "limit is 524288" in response.json()["error"]["message"]
    response = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_server_binds_loopback_by_default():
    from desta.core.args import parse_command
    from desta.serve import ServeConfig

    assert parse_command(ServeConfig, ["--llm", "x"]).host == "127.0.0.1"
