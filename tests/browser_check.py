"""The web app in a real browser: load the page, upload a clip, ask, wait for the answer, take a screenshot.

    python tests/browser_check.py [CHECKPOINT] [--audio WAV] [--screenshot PNG]

Without a checkpoint it builds tiny random models (the answer is noise; the page is what is checked).
Needs Chromium from the system packages (`apt-get install chromium`) and `pip install playwright`
(no `playwright install`: the system browser is used). Prints the answer, the transcript, the
duration and any request the page made to a host other than this machine; exits 1 on failure.
"""

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# No sandbox (containers), no GPU, and nothing that phones home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LOCAL = ("http://127.0.0.1", "http://localhost", "data:", "blob:")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's desta, run from anywhere


def _tiny_checkpoint(folder: Path) -> Path:
    from desta.model.loading import build, save
    from desta.model.tiny import save_tiny_bases

    model, processor = build(*(str(p) for p in save_tiny_bases(folder / "bases")))
    save(model, processor, folder / "ckpt")
    return folder / "ckpt"


def _clip(folder: Path) -> Path:
    import soundfile as sf

    from desta.audio.tts import Voice, synthesize

    path = folder / "question.wav"
    sf.write(path, synthesize("Excuse me, where is the station?", Voice(accent="British", variant="f2")), 16000)
    return path


def drive(url: str, audio: Path, instruction: str, screenshot: Path, timeout_s: float = 240) -> dict:
    """Upload `audio`, send `instruction`, wait until the streamed answer stops changing, screenshot the page."""
    from playwright.sync_api import sync_playwright

    external: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.on("request", lambda r: None if r.url.startswith(LOCAL) else external.append(r.url))
        page.goto(url, wait_until="load")
        page.locator("#instruction textarea").wait_for(timeout=60_000)  # the app has rendered
        page.locator("#audio input[type=file]").set_input_files(str(audio))
        page.locator("#audio audio, #audio button[aria-label='Clear']").first.wait_for(timeout=30_000)
        page.wait_for_timeout(500)  # the upload request finishes
        page.locator("#instruction textarea").fill(instruction)
        page.locator("#send").click()
        page.wait_for_function("document.querySelector('#duration textarea').value.length > 0",
                               timeout=timeout_s * 1000)
        bot = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
        bot.wait_for(timeout=timeout_s * 1000)
        answer, stable_since, deadline = None, time.time(), time.time() + timeout_s
        while time.time() - stable_since < 2.0 and time.time() < deadline:  # streaming: wait until it settles
            text = bot.inner_text()
            if text != answer:
                answer, stable_since = text, time.time()
            page.wait_for_timeout(200)
        result = {"answer": " ".join((answer or "").split()),
                  "transcript": page.locator("#transcript textarea").input_value(),
                  "duration": page.locator("#duration textarea").input_value(), "external requests": external}
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="DeSTA checkpoint folder (default: tiny random models)")
    parser.add_argument("--audio", help="clip to upload (default: a sentence spoken by espeak-ng)")
    parser.add_argument("--instruction", default="What does the speaker say, and how do they sound?")
    parser.add_argument("--screenshot", default="app-screenshot.png", help="where to write the PNG")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not Path(CHROMIUM).exists():
        print(f"no browser at {CHROMIUM}: apt-get install chromium", file=sys.stderr)
        return 1
    from desta.serving.app import AppConfig, build_app, make_chat

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        checkpoint = args.checkpoint or str(_tiny_checkpoint(folder))
        audio = Path(args.audio) if args.audio else _clip(folder)
        config = AppConfig(checkpoint=checkpoint, max_new_tokens=args.max_new_tokens)
        page = build_app(make_chat(config), config.limits(), config.max_new_tokens)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _, url, _ = page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            result = drive(url, audio, args.instruction, Path(args.screenshot))
        finally:
            page.close()
    for key, value in result.items():
        print(f"{key}: {value}")
    print(f"screenshot: {args.screenshot}")
    return 0 if result["answer"] and result["duration"] else 1


if __name__ == "__main__":
    sys.exit(main())
