"""Real speech: the G.722 loader decodes as FFmpeg does, and the Asterisk prompts become a described corpus."""

import gzip
import io
import json

import numpy as np
import pytest
import soundfile as sf
from datasets import load_from_disk

from desta.audio import SAMPLE_RATE, load_audio_ref
from desta.audio.asterisk import DOCS, INSTALL, SOUNDS, asterisk_source, read_g722
from desta.audio.tts import Voice, synthesize
from desta.cli import main

G722 = pytest.importorskip("G722", reason="needs the g722 package: pip install g722 (or pip install 'desta[voices]')")
ALLISON = SOUNDS / "en_US_f_Allison"


def _asterisk_or_skip():
    if not (ALLISON.is_dir() and (DOCS / "asterisk-core-sounds-en" / "core-sounds-en.txt.gz").is_file()):
        pytest.skip("the Asterisk prompts are not installed; install: " + INSTALL.format(lang="en"))


def test_g722_loader_reads_a_prompt_to_the_samples_ffmpeg_decodes():
    _asterisk_or_skip()
    av = pytest.importorskip("av", reason="the reference decoder is FFmpeg's, through PyAV: pip install av")
    path = ALLISON / "agent-pass.g722"
    with av.open(str(path), format="g722") as container:
        stream = container.streams.audio[0]
        assert stream.rate == SAMPLE_RATE
        reference = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(stream)])
    samples = read_g722(path)
    assert samples.dtype == np.float32 and len(samples) == path.stat().st_size * 2  # 4 bits a sample
    assert np.array_equal((samples * 32768).astype(np.int16), reference)


def _encode(samples: np.ndarray) -> bytes:
    return bytes(G722.G722(SAMPLE_RATE, 64000).encode((samples * 32767).astype(np.int16)))


def test_a_speaker_folder_becomes_rows_with_labels_and_rejects(tmp_path):
    folder = tmp_path / "sounds" / "fr_CA_f_Test"
    (folder / "digits").mkdir(parents=True)
    speech = synthesize("Bonjour, vous avez un nouveau message.", Voice(accent="British", variant="f1"))
    (folder / "vm-youhave.g722").write_bytes(_encode(speech))
    (folder / "digits" / "1.g722").write_bytes(_encode(speech[: SAMPLE_RATE // 2]))
    (folder / "beep.g722").write_bytes(_encode(np.sin(np.arange(8000) / 3).astype(np.float32) * 0.3))
    (folder / "unlisted.g722").write_bytes(_encode(speech))
    (tmp_path / "sounds" / "fr").symlink_to(folder)  # an alias, as Debian's alternatives make: not read twice
    docs = tmp_path / "docs" / "asterisk-core-sounds-fr"
    docs.mkdir(parents=True)
    with gzip.open(docs / "core-sounds-fr.txt.gz", "wt") as handle:
        handle.write("; Core Asterisk Sounds in French\n\nvm-youhave: Vous avez\n"
                     "digits/1: un\nbeep: [bip]\n")
    dataset, rejects = asterisk_source(tmp_path / "sounds", docs=tmp_path / "docs")
    rows = {row["id"]: row for row in dataset}
    assert sorted(rows) == ["digits/1@fr-CA", "vm-youhave@fr-CA"]
    row = rows["vm-youhave@fr-CA"]
    assert {k: row[k] for k in ("transcript", "language", "locale", "gender", "speaker", "accent", "engine",
                                "voice", "licence")} == {
        "transcript": "Vous avez", "language": "French", "locale": "fr-CA", "gender": "Female", "speaker": "Test",
        "accent": "Canadian", "engine": "human", "voice": "asterisk:Test", "licence": "CC-BY-SA-3.0"}
    decoded = load_audio_ref(row["audio"])
    assert abs(len(decoded) - len(speech)) <= 1  # G.722 packs two samples a byte
    n = len(speech) - 64
    best = max(np.corrcoef(decoded[lag : lag + n], speech[:n])[0, 1] for lag in range(48))  # the codec's delay
    assert best > 0.9  # the same speech
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons == {"beep@fr-CA": "not speech: [bip]",
                       "unlisted@fr-CA": "no transcript for 'unlisted' in core-sounds-fr.txt.gz"}
    assert [r["id"] for r in asterisk_source(folder / "digits", docs=tmp_path / "docs")[0]] == ["digits/1@fr-CA"]
    with pytest.raises(FileNotFoundError, match="holds no Asterisk speaker folders.*apt-get install"):
        asterisk_source(tmp_path / "docs", docs=tmp_path / "docs")


def test_describe_mapping_asterisk_reads_the_installed_prompts(tmp_path, capsys):
    _asterisk_or_skip()
    out = tmp_path / "d"
    assert main(["describe", "--source", str(ALLISON / "digits"), "--mapping", "asterisk", "--out", str(out),
                 "--no-progress"]) == 0
    described = load_from_disk(str(out / "dataset"))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    files = sorted((ALLISON / "digits").glob("*.g722"))
    assert len(described) + len(rejects) == len(files) and len(described) >= 30
    row = next(r for r in described if r["id"] == "digits/7@en-US")
    assert (row["transcript"], row["gender"], row["accent"], row["language"], row["voice"]) == (
        "seven", "Female", "American", "English", "asterisk:Allison")
    assert abs(row["duration"] - (ALLISON / "digits" / "7.g722").stat().st_size / 8000) < 0.01
    assert row["description"].startswith("[00:00-00:01] seven (Gender: Female, Accent: American")
    assert all(r["reason"].startswith(("no transcript", "not speech")) for r in rejects)
    assert sf.info(io.BytesIO(row["audio"]["bytes"])).format == "FLAC"  # the dataset carries the audio itself
