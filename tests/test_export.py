import http.server
import json
import threading

import pytest
import soundfile as sf
import torch

from desta.audio.tts import synthesize
from desta.cli import main
from desta.evaluation.report import render_markdown
from desta.export import export, push
from desta.model.loading import build, load, save
from desta.model.tiny import save_tiny_bases
from tests.conftest import conversation


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    whisper_dir, llm_dir = save_tiny_bases(folder / "bases")
    model, processor = build(str(whisper_dir), str(llm_dir), lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    with torch.no_grad():  # stand-in for training: LoRA B starts at zero, make it matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    save(model, processor, folder / "ckpt")
    row = {"n": 2, "values": {"ckpt": 0.5, "text": 1.0, "forgetting:ckpt": -0.5},
           "ci": {"ckpt": [0.0, 1.0], "text": [1.0, 1.0], "forgetting:ckpt": [-1.0, 0.0]}}
    report = {"items": 2, "text_reference_llm": "tiny", "judge": None, "items_per_second": {"ckpt": 1.0, "text": 2.0},
              "systems": ["ckpt"], "interval": "bootstrap 95 %", "categories": {"gender": row}, "overall": row,
              "retention_probes": {}, "per_item": []}
    (folder / "ckpt" / "eval").mkdir()
    (folder / "ckpt" / "eval" / "report.json").write_text(json.dumps(report))
    (folder / "ckpt" / "eval" / "report.md").write_text(render_markdown(report))
    return folder / "ckpt"


def _logits(folder, clip):
    model, processor = load(folder)
    batch = processor([conversation()], audios=[[clip]], transcripts=[["excuse me"]])
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("full", [False, True])
def test_export_reloads_to_identical_logits(checkpoint, tmp_path, clip, full, monkeypatch):
    expected = _logits(checkpoint, clip)
    out = export(checkpoint, tmp_path / "out", full=full)
    monkeypatch.chdir(checkpoint.parent / "bases")  # the export names its local bases by folder name
    got = _logits(out, clip)
    torch.testing.assert_close(got, expected, atol=1e-5 if full else 0, rtol=1e-5 if full else 0)
    config = json.loads((out / "config.json").read_text())
    if full:  # loadable without the base checkpoints
        assert config["encoder_name_or_path"] is None and config["lora"] is None
        (checkpoint.parent / "bases").rename(checkpoint.parent / "bases-hidden")
        try:
            torch.testing.assert_close(_logits(out, clip), expected, atol=1e-5, rtol=1e-5)
        finally:
            (checkpoint.parent / "bases-hidden").rename(checkpoint.parent / "bases")
    else:
        assert (out / "model.safetensors").stat().st_size < 2_000_000


def test_model_card_has_metadata_usage_and_eval_table(checkpoint, tmp_path):
    out = export(checkpoint, tmp_path / "out", encoder_id="openai/whisper-tiny.en",
                 llm_id="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: desta\nlicense: apache-2.0\n")
    assert "base_model:\n  - openai/whisper-tiny.en\n  - HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| gender | 2 | 0.50 [0.00, 1.00] | 1.00 [1.00, 1.00] | -50% [-100%, +0%] ~ |" in card
    assert "desta.load(" in card and "desta chat" in card
    assert json.loads((out / "config.json").read_text())["llm_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("full", [False, True])
def test_no_local_path_is_written(checkpoint, tmp_path, full):
    (checkpoint / "run_config.yaml").write_text(f"output_dir: {checkpoint}\ndata:\n  train: {tmp_path}/t/dataset\n")
    (checkpoint / "summary.json").write_text(json.dumps({"steps": 3, "train_rows": 5}))
    try:
        out = export(checkpoint, tmp_path / "out", full=full)
    finally:
        (checkpoint / "run_config.yaml").unlink()
        (checkpoint / "summary.json").unlink()
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt", ".jinja"):
            text = path.read_text()
            assert str(tmp_path) not in text and str(checkpoint.parent) not in text, path.name
    card = (out / "README.md").read_text()
    assert "- output folder: `ckpt`" in card and "- data: `t`" in card
    if not full:
        assert "| LLM (frozen) | tiny-llm |" in card and "named by their folder name only" in card
        assert json.loads((out / "config.json").read_text())["llm_name_or_path"] == "tiny-llm"


def test_dry_run_push_lists_the_files(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), str(tmp_path / "out"), "--push", "me/tiny-desta", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for name in ("README.md", "config.json", "model.safetensors", "desta_processor.json", "tokenizer.json"):
        assert f"would upload {name} (" in printed


class _Refuses(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args):
        pass


def test_push_errors_are_clear_and_never_show_the_token(tmp_path, monkeypatch):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.json").write_text("{}")
    secret = "hf_thisisnotarealtoken123"
    monkeypatch.setenv("HF_TOKEN", secret)
    server = http.server.HTTPServer(("127.0.0.1", 0), _Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(PermissionError, match="refused the token") as err:
            push(tmp_path / "f", "me/x", endpoint=f"http://127.0.0.1:{server.server_address[1]}")
        assert secret not in str(err.value)
    finally:
        server.shutdown()
    with pytest.raises(ConnectionError, match="cannot reach the Hub") as err:
        push(tmp_path / "f", "me/x", endpoint="http://127.0.0.1:9")
    assert secret not in str(err.value)


def test_chat_streams_an_answer_and_answers_a_batch(checkpoint, tmp_path, capsys):
    sf.write(tmp_path / "a.wav", synthesize("Where is the station?"), 16000)
    assert main(["chat", str(checkpoint), "--audio", str(tmp_path / "a.wav"), "What can you hear?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["chat", str(checkpoint), "Hello without audio", "--max-new-tokens", "3"]) == 0
    rows = [{"audio": "a.wav", "instruction": "Who speaks?"}, {"audio": ["a.wav", "a.wav"], "instruction": "Same?"},
            {"audio": "missing.wav", "instruction": "?"}, {"instruction": "Just text."}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    # a row that failed makes the exit status 1 (it was 0), with the count
    assert main(["chat", str(checkpoint), "--batch", str(tmp_path / "rows.jsonl"), "--max-new-tokens", "3"]) == 1
    assert "answered 3 of 4 rows (1 with errors)" in capsys.readouterr().out
    answers = [json.loads(x) for x in (tmp_path / "rows.answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and "answer" in answers[0] and "answer" in answers[1] and "answer" in answers[3]
    assert "file not found" in answers[2]["error"]
    (tmp_path / "good.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert main(["chat", str(checkpoint), "--batch", str(tmp_path / "good.jsonl"), "--max-new-tokens", "3"]) == 0


def test_chat_refuses_a_clip_over_its_length_limit_before_the_model_loads(tmp_path, capsys):
    import numpy as np

    sf.write(tmp_path / "long.wav", np.tile(synthesize("Where is the station?"), 4), 16000)
    seconds = sf.info(tmp_path / "long.wav").duration
    not_a_checkpoint = tmp_path  # never read: the clip is refused first
    assert main(["chat", str(not_a_checkpoint), "--audio", str(tmp_path / "long.wav"), "Who?",
                 "--max-audio-seconds", "2"]) == 2
    assert f"the clip is {seconds:.1f} s long; desta chat takes at most 2 s" in capsys.readouterr().err
    (tmp_path / "rows.jsonl").write_text(json.dumps({"audio": "long.wav", "instruction": "Who?"}) + "\n")
    from desta.serving.chat import answer_batch

    counts = answer_batch(None, None, tmp_path / "rows.jsonl", tmp_path / "out.jsonl", 1, 2, max_audio_seconds=2)
    assert counts == {"rows": 1, "answered": 0, "failed": 1}
    assert "desta chat takes at most 2 s" in json.loads((tmp_path / "out.jsonl").read_text())["error"]


def test_full_export_transcribes_and_answers_as_the_checkpoint(checkpoint, tmp_path, clip, short_clip):
    """The whole-model export carries both bases' generation settings (Whisper's no-timestamps token and length
    limit): its transcripts, and so its answers, are the checkpoint's, not only its logits at fixed inputs."""
    out = export(checkpoint, tmp_path / "full", full=True)
    answers = []
    for folder in (checkpoint, out):
        model, processor = load(folder)
        messages = processor.conversation("What can you hear from the audio?")
        answers.append((model.transcribe(processor, [clip, short_clip]),
                        model.chat(processor, [messages], [[clip]], max_new_tokens=6, do_sample=False),
                        model.whisper.generation_config.to_dict(), model.llm.generation_config.to_dict()))
    assert answers[1] == answers[0]


def test_export_into_an_existing_folder_needs_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    export(checkpoint, out)
    (out / "stale.safetensors").write_text("from an earlier export")
    with pytest.raises(FileExistsError, match="already exists; give another output folder, or --overwrite"):
        export(checkpoint, out)
    assert main(["export", str(checkpoint), str(out)]) == 2
    assert "--overwrite to replace it" in capsys.readouterr().err
    assert main(["export", str(checkpoint), str(out), "--overwrite"]) == 0
    assert not (out / "stale.safetensors").exists() and (out / "model.safetensors").exists()  # replaced, not mixed
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an earlier desta export"):
        export(checkpoint, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="holds the checkpoint being exported"):
        export(checkpoint, checkpoint, overwrite=True)


# ----- checkpoints that load from any folder -----

def test_a_checkpoint_made_with_relative_base_paths_loads_from_another_folder(tmp_path, monkeypatch, clip):
    """Training records its bases as given; `desta chat` from another folder then failed ("Repo id must be in the
    form"). The config now holds their absolute paths."""
    monkeypatch.chdir(tmp_path)
    save_tiny_bases("bases")
    model, processor = build("bases/tiny-whisper", "bases/tiny-llm")
    save(model, processor, "run")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["chat", "../run", "Hello?", "--max-new-tokens", "2"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["encoder_name_or_path"] == str(tmp_path / "bases" / "tiny-whisper")


def test_a_moved_export_loads_beside_its_bases_and_a_missing_base_fails_at_once(checkpoint, tmp_path, monkeypatch,
                                                                                  clip):
    """An export names a local base by its folder name; moved with a bases/ folder beside it (as desta demo lays
    them out), it loads from anywhere. Without its base it fails at once, naming the base and the fix, instead of
    retrying the Hub for most of a minute."""
    import shutil
    import time

    expected = _logits(checkpoint, clip)
    demo = tmp_path / "moved-demo"
    export(checkpoint, demo / "export")
    shutil.copytree(checkpoint.parent / "bases", demo / "bases")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    torch.testing.assert_close(_logits(demo / "export", clip), expected, atol=0, rtol=0)
    shutil.rmtree(demo / "bases" / "tiny-whisper")
    started = time.time()
    with pytest.raises(FileNotFoundError) as err:
        load(demo / "export")
    assert time.time() - started < 10
    message = str(err.value)
    assert message.startswith("the Whisper base 'tiny-whisper' is not a folder here (looked in ")
    assert str(demo / "bases" / "tiny-whisper") in message and "--encoder-id" in message and "--full" in message


def test_a_base_from_another_machines_hub_cache_loads_from_this_ones(checkpoint, tmp_path, monkeypatch, clip):
    """A checkpoint trained on a base from the Hub cache records the snapshot folder; on another machine (or after
    the cache moved) the same repository is found in this machine's cache, with no network."""
    import shutil

    from huggingface_hub import constants

    expected = _logits(checkpoint, clip)
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-whisper" / "snapshots" / "0123abc"
    shutil.copytree(checkpoint.parent / "bases" / "tiny-whisper", snapshot)
    moved = tmp_path / "ckpt"
    shutil.copytree(checkpoint, moved)
    config = json.loads((moved / "config.json").read_text())
    config["encoder_name_or_path"] = "/elsewhere/.cache/huggingface/hub/models--someone--tiny-whisper/snapshots/0123abc"
    (moved / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    torch.testing.assert_close(_logits(moved, clip), expected, atol=0, rtol=0)
