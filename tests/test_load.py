"""A bounded load test of `desta serve`: many clients at once, for a fixed time, on the tiny models.

It keeps in CI what a real deployment relies on: under more requests than slots and queue, the server answers
each with 200 or a clean 503 (with Retry-After), never crashes, and its memory settles. The figures (requests
served, 503s, latency percentiles, memory growth) print as one JSON line; docs/reliability.md quotes them with the
machine they were measured on.
"""

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from desta.audio.tts import synthesize
from tests.test_serve import _memory_mib, _start, _wav_b64, bases, quiet_checkpoint  # noqa: F401 - fixtures

REQUESTS, THREADS, SECONDS = 200, 8, 60  # the bound: at most this many requests, clients, and seconds of sending


def _percentile(values, share):
    return float(np.percentile(values, share)) if values else None


@pytest.mark.slow
def test_the_server_under_load_answers_every_request_and_keeps_its_memory(quiet_checkpoint):  # noqa: F811
    process, url = _start([str(quiet_checkpoint), "--model-name", "tiny-desta", "--max-concurrent", "2",
                           "--queue", "4", "--queue-seconds", "5"])
    clip = _wav_b64(synthesize("Where is the station?"))
    audio = [{"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
             {"type": "text", "text": "What can you hear?"}]
    bodies = [{"model": "tiny-desta", "max_tokens": 8, "stream": i % 2 == 1,
               "messages": [{"role": "user", "content": audio if i % 4 < 2 else f"Say something about {i}."}]}
              for i in range(REQUESTS)]
    random.Random(0).shuffle(bodies)
    deadline = time.time() + SECONDS  # set again when the measured part starts

    def send(body):
        """The status (a stream that does not end with [DONE] counts as 500) and the Retry-After header."""
        if body["stream"]:
            with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=120) as response:
                lines = list(response.iter_lines())
                done = response.status_code != 200 or lines[-2] == "data: [DONE]"
                return response.status_code if done else 500, response.headers.get("Retry-After")
        response = httpx.post(f"{url}/chat/completions", json=body, timeout=120)
        return response.status_code, response.headers.get("Retry-After")

    def client(body):
        """(final status, seconds from the first try, 503 answers on the way), as a client that waits Retry-After
        seconds after a 503 and tries again, as the OpenAI client does (up to 30 times here, so that a slow or shared
        machine still serves every client that waits); (None, 0, 0) for a request not sent because the time was up."""
        if time.time() > deadline:
            return None, 0.0, 0
        started, busy = time.time(), 0
        status, retry_after = send(body)
        while status == 503 and busy < 30:
            assert retry_after == "1"
            busy += 1
            time.sleep(float(retry_after))
            status, retry_after = send(body)
        return status, time.time() - started, busy

    try:
        with ThreadPoolExecutor(THREADS) as pool:  # warm: every kind of request on every thread, not counted
            list(pool.map(send, bodies[:4 * THREADS]))
            before = _memory_mib(process)
            deadline = time.time() + SECONDS
            started = time.time()
            results = list(pool.map(client, bodies))
        elapsed = time.time() - started
        crashed = process.poll() is not None
        after = _memory_mib(process) if not crashed else None
    finally:
        process.kill()
        process.wait()
    sent = [r for r in results if r[0] is not None]
    served = [t for s, t, _ in sent if s == 200]
    figures = {"requests": len(sent), "served": len(served), "busy_503": sum(b for _, _, b in sent),
               "other": sorted({s for s, _, _ in sent} - {200, 503}), "crashes": int(crashed),
               "p50_s": round(_percentile(served, 50), 3), "p95_s": round(_percentile(served, 95), 3),
               "seconds": round(elapsed, 1), "memory_growth_mib": None if crashed else round(after - before, 1)}
    print(json.dumps(figures))
    assert figures["crashes"] == 0 and figures["other"] == []
    assert figures["served"] == len(sent)  # a client that waits as told is served
    assert figures["memory_growth_mib"] < 64
