import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from datasets import Audio, Dataset, load_from_disk

from desta.audio.synth import row_for, synth_corpus
from desta.cli import main
from desta.core.chunks import ChunkingSection
from desta.describe.attributes import LabelError, normalize_label
from desta.describe.run import DescribeConfig, describe, finish_row, merge
from desta.describe.sources import load_mapping


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    return synth_corpus(folder, num_clips=12, seed=3, progress=False)


def _rows(out):
    dataset = load_from_disk(str(out / "dataset"))
    return [{k: v for k, v in row.items() if k != "audio"} for row in dataset]


def test_synthetic_corpus_labels_depend_only_on_seed_and_index(corpus, tmp_path):
    assert row_for(5, seed=3) == row_for(5, seed=3) and row_for(5, seed=3) != row_for(5, seed=4)
    again = synth_corpus(tmp_path, num_clips=12, seed=3, progress=False)
    assert again.read_text() == corpus.read_text()
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len({r["transcript"] for r in rows}) > 8 and {r["gender"] for r in rows} == {"Female", "Male"}


def test_describe_synthetic_corpus(corpus, tmp_path):
    summary = describe(DescribeConfig(source=str(corpus), out=str(tmp_path / "d"), mapping="synthetic",
                                      progress=False, chunking=ChunkingSection(chunk_size=5)))
    assert summary["inputs"] == summary["described"] == 12 and summary["rejected"] == 0
    rows = _rows(tmp_path / "d")
    first = rows[0]
    assert first["description"].startswith(f"[00:00-00:0{round(first['duration'])}] {first['transcript']} (Gender: ")
    assert json.loads(first["sources"])["gender"] == "metadata" and json.loads(first["sources"])["pitch"] == "signal"
    agree = np.mean([r["pitch"] == r["pitch_label"] for r in rows])
    assert agree >= 0.75  # measured pitch bins follow the voice settings


def test_bad_inputs_land_in_rejects_and_counts_add_up(corpus, tmp_path):
    good = json.loads(corpus.read_text().splitlines()[0])
    audio = tmp_path / "audio"
    audio.mkdir()
    y, _ = sf.read(corpus.parent / good["path"], dtype="float32")
    sf.write(audio / "stereo8k.wav", np.stack([y[::2], y[::2]], axis=1), 8000)  # odd rate, two channels: fine
    sf.write(audio / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(audio / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    nan = y.copy()
    nan[100] = np.nan
    sf.write(audio / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(audio / "long.wav", np.tile(y, 4), 16000)
    (audio / "corrupt.wav").write_bytes(b"RIFF not really a wave file")
    base = {"transcript": good["transcript"], "gender": "F", "accent": "British", "emotion": "neutral"}
    lines = [json.dumps({"path": str(corpus.parent / good["path"]), **base}),
             json.dumps({"path": "audio/stereo8k.wav", **base}),
             json.dumps({"path": "audio/missing.wav", **base}),
             json.dumps({"path": "audio/corrupt.wav", **base}),
             json.dumps({"path": "audio/empty.wav", **base}),
             json.dumps({"path": "audio/silent.wav", **base}),
             json.dumps({"path": "audio/nan.wav", **base}),
             json.dumps({"path": "audio/long.wav", **base}),
             json.dumps({"path": "audio/stereo8k.wav", **base, "gender": "robot", "id": "robot"}),
             '{"path": "audio/stereo8k.wav", "transcript": ',
             json.dumps({"transcript": "no path here"})]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    max_seconds = 2.5 * len(y) / 16000
    summary = describe(DescribeConfig(source=str(manifest), out=str(tmp_path / "d"), progress=False,
                                      max_seconds=max_seconds, allow_absolute_paths=True,
                                      chunking=ChunkingSection(chunk_size=4)))
    rejects = [json.loads(x) for x in (tmp_path / "d" / "rejects.jsonl").read_text().splitlines()]
    reasons = " | ".join(r["reason"] for r in rejects)
    for expected in ["file not found", "cannot decode audio", "empty", "silent", "NaN or infinite", "too long",
                     "unknown gender label 'robot'", "malformed JSON", "no 'path' column value"]:
        assert expected in reasons, expected
    assert summary == {"inputs": 11, "described": 2, "rejected": 9, "duplicate_ids": 0, "hours": summary["hours"]}
    assert all({"id", "source", "reason"} <= set(r) for r in rejects)


def test_missing_transcript_without_asr_is_rejected(corpus, tmp_path):
    rows = [json.loads(line) for line in corpus.read_text().splitlines()[:2]]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(corpus.parent / r["path"])}) + "\n" for r in rows))
    summary = describe(DescribeConfig(source=str(manifest), out=str(tmp_path / "d"), progress=False,
                                      allow_absolute_paths=True))
    assert summary["rejected"] == 2
    assert "no --asr-model" in (tmp_path / "d" / "rejects.jsonl").read_text()


def test_interrupted_run_resumes_without_redoing_or_duplicating(corpus, tmp_path, monkeypatch):
    import desta.describe.run as stage

    full = tmp_path / "full"
    describe(DescribeConfig(source=str(corpus), out=str(full), progress=False, chunking=ChunkingSection(chunk_size=3)))
    calls = {"n": 0}
    real = stage.analyse_row

    def dies_on_seventh_row(*args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # as if killed in the middle of chunk 2
        return real(*args)

    monkeypatch.setattr(stage, "analyse_row", dies_on_seventh_row)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        describe(DescribeConfig(source=str(corpus), out=str(out), progress=False,
                                chunking=ChunkingSection(chunk_size=3)))
    assert sorted(p.name for p in (out / "parts").glob("part-*[0-9].jsonl")) == ["part-000000.jsonl",
                                                                                  "part-000001.jsonl"]
    assert not list((out / "parts").glob("*.tmp"))
    calls["n"] = 0
    monkeypatch.setattr(stage, "analyse_row", lambda *a: (calls.__setitem__("n", calls["n"] + 1), real(*a))[1])
    describe(DescribeConfig(source=str(corpus), out=str(out), progress=False, chunking=ChunkingSection(chunk_size=3)))
    assert calls["n"] == 6  # only the two unfinished chunks ran again
    assert _strip_measures(_rows(out)) == _strip_measures(_rows(full))


def test_kill_9_then_rerun_gives_every_row_once(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    manifest = synth_corpus(tmp_path / "c", num_clips=150, seed=1, progress=False)
    command = [sys.executable, "-m", "desta.cli", "describe", "--source", str(manifest), "--out",
               str(tmp_path / "d"), "--chunking.chunk-size", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "d" / "parts" / "part-000002.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list((tmp_path / "d" / "parts").glob("part-*[0-9].jsonl")))
    assert 3 <= done_before < 75 and not (tmp_path / "d" / "dataset").exists()
    subprocess.run(command, check=True, capture_output=True)
    ids = [r["id"] for r in _rows(tmp_path / "d")]
    assert sorted(ids) == [f"synth-1-{i:06d}" for i in range(150)]


def _strip_measures(rows):
    # espeak-ng audio is fixed on disk, so every field must match exactly
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def test_shards_merge_to_the_unsharded_output(corpus, tmp_path, capsys):
    one = describe(DescribeConfig(source=str(corpus), out=str(tmp_path / "one"), progress=False,
                                  chunking=ChunkingSection(chunk_size=4)))
    assert (one["inputs"], one["described"]) == (12, 12)  # the figures, and the line the command prints
    assert str(one).startswith("inputs 12 = described 12 + rejected 0 (")
    assert str(tmp_path / "one" / "dataset") in str(one)
    for index in range(2):
        assert main(["describe", "--source", str(corpus), "--out", str(tmp_path / "two"), "--chunking.chunk-size", "4",
                     "--chunking.num-shards", "2", "--chunking.shard-index", str(index)]) == 0
    assert "merge with" in capsys.readouterr().out
    assert main(["describe", "--chunking.merge", "--out", str(tmp_path / "two")]) == 0
    assert "inputs 12 = described 12 + rejected 0" in capsys.readouterr().out
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one")


def test_long_clip_gets_one_bracket_per_window(corpus, tmp_path):
    from desta.model.tiny import save_tiny_bases

    y, _ = sf.read(corpus.parent / json.loads(corpus.read_text().splitlines()[0])["path"], dtype="float32")
    sf.write(tmp_path / "long.wav", np.tile(y, int(np.ceil(45 * 16000 / len(y))))[: 45 * 16000], 16000)
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "long.wav", "gender": "M"}) + "\n")
    whisper_dir, _ = save_tiny_bases(tmp_path / "bases")
    describe(DescribeConfig(source=str(tmp_path / "m.jsonl"), out=str(tmp_path / "d"), progress=False,
                            asr_model=str(whisper_dir)))
    lines = _rows(tmp_path / "d")[0]["description"].splitlines()
    assert [line[:13] for line in lines] == ["[00:00-00:30]", "[00:30-00:45]"]
    assert all(line.endswith("Duration: 45s)") for line in lines)


def test_merge_refuses_missing_chunks(corpus, tmp_path):
    describe(DescribeConfig(source=str(corpus), out=str(tmp_path / "d"), progress=False,
                            chunking=ChunkingSection(chunk_size=4, num_shards=3, shard_index=0)))
    with pytest.raises(ValueError, match="2 of 3 chunks are not done"):
        merge(tmp_path / "d")




def test_csv_manifest_with_worker_processes(corpus, tmp_path):
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    lines = ["path,transcript,gender"] + [f"{corpus.parent / r['path']},\"{r['transcript']}\",{r['gender'][0]}"
                                          for r in rows[:4]]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    summary = describe(DescribeConfig(source=str(tmp_path / "m.csv"), out=str(tmp_path / "d"), progress=False,
                                      num_proc=2, allow_absolute_paths=True, chunking=ChunkingSection(chunk_size=2)))
    assert summary["described"] == 4
    assert [r["gender"] for r in _rows(tmp_path / "d")] == [r["gender"] for r in rows[:4]]


def test_audio_classification_model_fills_missing_labels(corpus, tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_feat_extract_layers=2,
                            vocab_size=32, id2label={0: "female", 1: "male"}, label2id={"female": 0, "male": 1})
    model_dir = tmp_path / "gender-model"
    Wav2Vec2ForSequenceClassification(config).save_pretrained(model_dir)
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(model_dir)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()[:3]]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(corpus.parent / r["path"]), "transcript": r["transcript"]})
                                + "\n" for r in rows))
    describe(DescribeConfig(source=str(manifest), out=str(tmp_path / "d"), progress=False,
                            classifiers={"gender": str(model_dir)}, allow_absolute_paths=True))
    described = _rows(tmp_path / "d")
    assert len(described) == 3
    assert all(r["gender"] in ("Female", "Male") and json.loads(r["sources"])["gender"] == "model"
               for r in described)


@pytest.mark.parametrize("attribute, value, expected", [
    ("gender", "F", "Female"), ("gender", "female", "Female"), ("gender", "woman", "Female"),
    ("gender", "M", "Male"), ("emotion", "NEU", "Neutral"), ("emotion", "hap", "Happy"), ("emotion", "exc", "Happy"),
    ("emotion", "fru", "Frustrated"), ("age", "23", "Young adult"), ("age", "sixties", "Senior"),
    ("accent", "northern irish", "Northern Irish"), ("gender", "", None), ("age", None, None),
])
def test_label_normalisation(attribute, value, expected):
    assert normalize_label(attribute, value) == expected


def test_unknown_label_names_the_known_set():
    with pytest.raises(LabelError, match=r"unknown emotion label 'bored'; known: \['Angry'"):
        normalize_label("emotion", "bored")


CORPUS_FIXTURES = {
    # mapping: (columns of one row as the corpus ships them, expected normalised labels)
    "librispeech": ({"id": "84-121123-0000", "text": "GO DO YOU HEAR", "speaker_id": 84, "chapter_id": 121123},
                    {"transcript": "GO DO YOU HEAR"}),
    "libritts_r": ({"id": "84_121123_000007_000001", "text_normalized": "Go, do you hear?", "speaker_id": "84"},
                   {"transcript": "Go, do you hear?"}),
    "vctk": ({"speaker_id": "p225", "text_id": "p225_001", "text": "Please call Stella.", "age": "23",
              "gender": "F", "accent": "Southern England"},
             {"gender": "Female", "age": "Young adult", "accent": "Southern England"}),
    "cremad": ({"file": "1001_DFA_ANG_XX", "sentence_text": "Don't forget a jacket.", "actor_id": "1001",
                "sex": "Male", "age": "51", "emotion": "ANG"},
               {"gender": "Male", "age": "Middle-aged", "emotion": "Angry"}),
    "iemocap": ({"file": "Ses01F_impro01_F000", "transcription": "Excuse me.", "speaker": "Ses01F",
                 "gender": "F", "major_emotion": "neu"}, {"gender": "Female", "emotion": "Neutral"}),
    "commonvoice": ({"path": "common_voice_en_1.mp3", "sentence": "Hello there.", "client_id": "abc",
                     "gender": "female_feminine", "age": "thirties", "accents": "Scottish English"},
                    {"gender": "Female", "age": "Young adult", "accent": "Scottish English"}),
    "synthetic": ({"transcript": "Hi.", "gender": "Male", "accent": "Caribbean", "emotion": "Neutral"},
                  {"gender": "Male", "accent": "Caribbean", "emotion": "Neutral"}),
}


@pytest.mark.parametrize("name", sorted(CORPUS_FIXTURES))
def test_corpus_mapping_on_its_fixture(name, corpus, tmp_path):
    columns, expected = CORPUS_FIXTURES[name]
    clip_path = corpus.parent / json.loads(corpus.read_text().splitlines()[0])["path"]
    data = {k: [v] for k, v in columns.items()}
    data["audio"] = [{"bytes": clip_path.read_bytes(), "path": None}]  # audio embedded, as Hub datasets ship it
    Dataset.from_dict(data).cast_column("audio", Audio(decode=False)).save_to_disk(str(tmp_path / "src"))
    assert load_mapping(name)  # the mapping file parses
    summary = describe(DescribeConfig(source=str(tmp_path / "src"), out=str(tmp_path / "d"), mapping=name,
                                      progress=False))
    assert summary["described"] == 1, (tmp_path / "d" / "rejects.jsonl").read_text()
    row = _rows(tmp_path / "d")[0]
    for key, value in expected.items():
        assert row[key] == value, key
    assert row["transcript"] == columns.get("text", columns.get("text_normalized", columns.get(
        "sentence_text", columns.get("transcription", columns.get("sentence", columns.get("transcript"))))))


@pytest.mark.real
def test_whisper_transcribes_missing_transcripts(real_models, tmp_path):
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    from desta.audio.synth import sentence
    from desta.audio.tts import Voice, synthesize

    texts = [sentence(np.random.default_rng([9, i])) for i in range(6)]
    lines = []
    for i, text in enumerate(texts):  # a clear voice: American, default rate and volume
        sf.write(tmp_path / f"{i}.wav", synthesize(text, Voice(accent="American", variant="m1")), 16000)
        lines.append(json.dumps({"path": f"{i}.wav", "id": str(i)}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    describe(DescribeConfig(source=str(tmp_path / "m.jsonl"), out=str(tmp_path / "d"), progress=False,
                            asr_model=str(real_models / "whisper-tiny.en")))
    rows = _rows(tmp_path / "d")
    normalize = EnglishTextNormalizer()
    wer = jiwer.wer([normalize(t) for t in texts], [normalize(r["transcript"]) for r in rows])
    assert wer < 0.35, wer
    assert all(json.loads(r["sources"])["transcript"] == "model" for r in rows)


@pytest.mark.real
def test_faster_whisper_backend(real_models, clip):
    pytest.importorskip("faster_whisper")
    from desta.audio.asr import make_transcriber

    if not (real_models / "ct2-whisper-tiny.en").is_dir():
        pytest.skip("no CTranslate2 Whisper folder")
    transcriber = make_transcriber("faster-whisper", str(real_models / "ct2-whisper-tiny.en"), device="cpu")
    assert "station" in transcriber([clip])[0].lower()


def test_unknown_asr_backend_is_named():
    from desta.audio.asr import make_transcriber

    with pytest.raises(ValueError, match=r"unknown ASR backend 'kaldi'; choose one of \['faster-whisper'"):
        make_transcriber("kaldi", "x")


# ----- reliability: reruns, ids, bad manifest lines -----

def _manifest(folder, corpus, count, order=None):
    """A manifest in `folder` over the first `count` clips of the corpus (copied in), in `order`."""
    import shutil

    rows = [json.loads(line) for line in corpus.read_text().splitlines()[:count]]
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    for row in rows:
        shutil.copy(corpus.parent / row["path"], folder / row["path"])
    order = order or range(count)
    (folder / "m.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    return folder / "m.jsonl", {r["id"]: r["transcript"] for r in rows}


def _own_rows(out, transcripts):
    """How many described rows carry their own clip's audio, transcript and description (synthetic clips are
    named by their ids; a mixed-up row holds one clip's audio and another's text)."""
    return sum(transcripts[r["id"]] == r["transcript"] and f"] {transcripts[r['id']]} (" in r["description"]
               and Path(r["audio"]["path"]).stem == r["id"] for r in load_from_disk(str(out / "dataset")))


def test_rerun_after_the_manifest_changed_is_refused_not_mixed_up(corpus, tmp_path):
    manifest, transcripts = _manifest(tmp_path, corpus, 6)
    out = tmp_path / "d"
    describe(DescribeConfig(source=str(manifest), out=str(out), progress=False, chunking=ChunkingSection(chunk_size=2)))
    _, _ = _manifest(tmp_path, corpus, 6, order=[5, 4, 3, 2, 1, 0])  # same path, rows reordered
    with pytest.raises(ValueError, match=r"was made from a different source/settings \(source_fingerprint: .*use a "
                                         r"new --out or --chunking.overwrite"):
        describe(DescribeConfig(source=str(manifest), out=str(out), progress=False,
                                chunking=ChunkingSection(chunk_size=2)))
    with pytest.raises(ValueError, match=r"different source/settings \(max_seconds: 600.0 -> 5.0; source_fing"):
        describe(DescribeConfig(source=str(manifest), out=str(out), progress=False, max_seconds=5.0,
                                chunking=ChunkingSection(chunk_size=2)))
    summary = describe(DescribeConfig(source=str(manifest), out=str(out), progress=False,
                                      chunking=ChunkingSection(chunk_size=2, overwrite=True)))
    assert summary["described"] == 6 and _own_rows(out, transcripts) == 6
    assert [r["id"] for r in _rows(out)] == sorted(transcripts, reverse=True)  # the new order


def test_the_same_manifest_under_another_path_resumes(corpus, tmp_path, monkeypatch):
    manifest, transcripts = _manifest(tmp_path, corpus, 4)
    describe(DescribeConfig(source=str(manifest), out=str(tmp_path / "d"), progress=False,
                            chunking=ChunkingSection(chunk_size=2)))
    monkeypatch.chdir(tmp_path)
    summary = describe(DescribeConfig(source="m.jsonl", out="d", progress=False,
                                      chunking=ChunkingSection(chunk_size=2)))
    assert summary["described"] == 4 and _own_rows(tmp_path / "d", transcripts) == 4


def test_interrupted_run_then_a_changed_manifest_is_refused(corpus, tmp_path, monkeypatch):
    import desta.describe.run as stage

    manifest, transcripts = _manifest(tmp_path, corpus, 6)
    real, calls = stage.analyse_row, {"n": 0}

    def dies_on_fifth_row(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(stage, "analyse_row", dies_on_fifth_row)
    with pytest.raises(KeyboardInterrupt):
        describe(DescribeConfig(source=str(manifest), out=str(tmp_path / "d"), progress=False,
                                chunking=ChunkingSection(chunk_size=2)))
    monkeypatch.setattr(stage, "analyse_row", real)
    _manifest(tmp_path, corpus, 6, order=[1, 0, 3, 2, 5, 4])
    with pytest.raises(ValueError, match="different source/settings"):
        describe(DescribeConfig(source=str(manifest), out=str(tmp_path / "d"), progress=False,
                                chunking=ChunkingSection(chunk_size=2)))


def test_merge_matches_rows_by_id_and_refuses_parts_of_another_source(corpus, tmp_path):
    manifest, _ = _manifest(tmp_path, corpus, 4)
    out = tmp_path / "d"
    describe(DescribeConfig(source=str(manifest), out=str(out), progress=False, chunking=ChunkingSection(chunk_size=2)))
    part = out / "parts" / "part-000000.jsonl"
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    rows[0]["id"] = "someone-else"  # a part whose row belongs to no source row
    part.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"1 source rows have no result .*1 results match no source row"):
        merge(out)


def test_duplicate_and_null_ids(corpus, tmp_path):
    manifest, transcripts = _manifest(tmp_path, corpus, 3)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows.append({**rows[0], "transcript": "A different clip under the same id."})
    rows.append({**rows[1], "id": None, "path": rows[1]["path"]})  # null id: the file name is the id
    rows[1]["id"] = "clip-one"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = describe(DescribeConfig(source=str(manifest), out=str(tmp_path / "d"), progress=False))
    assert summary["duplicate_ids"] == 1 and summary["inputs"] == 5 and summary["described"] == 4
    ids = [r["id"] for r in _rows(tmp_path / "d")]
    assert ids == [rows[0]["id"], "clip-one", rows[2]["id"], Path(rows[1]["path"]).stem] and "None" not in ids
    reject = json.loads((tmp_path / "d" / "rejects.jsonl").read_text())
    assert reject["source"] == "m.jsonl:4" and "duplicate id" in reject["reason"] and "first used on line 1" in \
        reject["reason"]
    from datasets import Dataset

    clip = (tmp_path / rows[0]["path"]).read_bytes()
    Dataset.from_dict({"id": ["a", None, "a", "seven"], "transcript": ["Hi there.", "Hello you.", "Other.", "Seven."],
                       "audio": [{"bytes": clip, "path": None}] * 4}).cast_column(
        "audio", Audio(decode=False)).save_to_disk(str(tmp_path / "src"))
    summary = describe(DescribeConfig(source=str(tmp_path / "src"), out=str(tmp_path / "d2"), progress=False))
    assert [r["id"] for r in _rows(tmp_path / "d2")] == ["a", "row-00000001", "seven"] and summary["duplicate_ids"] == 1


def test_clips_shorter_than_min_seconds_are_rejected(corpus, tmp_path):
    y, _ = sf.read(corpus.parent / json.loads(corpus.read_text().splitlines()[0])["path"], dtype="float32")
    sf.write(tmp_path / "blip.wav", y[:800] + 0.05, 16000)  # 0.05 s
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "blip.wav", "transcript": "Hi."}) + "\n")
    summary = describe(DescribeConfig(source=str(tmp_path / "m.jsonl"), out=str(tmp_path / "d"), progress=False))
    assert summary["rejected"] == 1
    assert "too short (0.05 s < min_seconds 0.3 s)" in (tmp_path / "d" / "rejects.jsonl").read_text()


def test_manifest_paths_stay_in_the_manifest_folder(corpus, tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "/etc/passwd", "transcript": "x"}) + "\n"
                                      + json.dumps({"path": "../../outside.wav", "transcript": "x"}) + "\n")
    describe(DescribeConfig(source=str(tmp_path / "m.jsonl"), out=str(tmp_path / "d"), progress=False))
    rejects = [json.loads(x) for x in (tmp_path / "d" / "rejects.jsonl").read_text().splitlines()]
    assert all("leads outside the manifest's folder" in r["reason"] and "--allow-absolute-paths" in r["reason"]
               for r in rejects) and len(rejects) == 2
    describe(DescribeConfig(source=str(tmp_path / "m.jsonl"), out=str(tmp_path / "d2"), progress=False,
                            allow_absolute_paths=True))
    assert "/etc/passwd: cannot decode audio" in (tmp_path / "d2" / "rejects.jsonl").read_text()


def _bad_input_campaign(folder, corpus):
    """A JSONL and a CSV manifest holding every kind of bad line met in practice, each with the reason its
    reject must give (None: the line is usable and must be described as itself); plus the good rows."""
    good = [json.loads(line) for line in corpus.read_text().splitlines()[:3]]
    audio = folder / "audio"
    audio.mkdir(parents=True)
    y, _ = sf.read(corpus.parent / good[0]["path"], dtype="float32")
    for row in good:
        sf.write(folder / row["path"], sf.read(corpus.parent / row["path"], dtype="float32")[0], 16000)
    sf.write(audio / "stereo8k.wav", np.stack([y[::2], y[::2]], axis=1), 8000)
    sf.write(audio / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(audio / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(audio / "blip.wav", y[:800] + 0.05, 16000)
    nan = y.copy()
    nan[100] = np.nan
    sf.write(audio / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(audio / "long.wav", np.tile(y, 8), 16000)
    (audio / "corrupt.wav").write_bytes(b"RIFF not really a wave file")
    (audio / "text.wav").write_text("just text")
    said = {"transcript": "Fine words here.", "gender": "F"}
    jsonl = [  # (line, expected reason or None)
        (json.dumps(good[0]), None), (json.dumps(good[1]), None), (json.dumps(good[2]), None),
        (json.dumps({"path": "audio/stereo8k.wav", **said}), None),
        (json.dumps({"path": "audio/stereo8k.wav", **said, "id": None}), "duplicate id 'stereo8k'"),
        (json.dumps({"path": "audio/stereo8k.wav", **said, "id": 17}), None),
        (json.dumps({"path": "audio/stereo8k.wav", **said, "id": "extra", "unknown_column": [1, 2]}), None),
        (json.dumps({**good[0], "transcript": "A second row with the first id."}), f"duplicate id '{good[0]['id']}'"),
        ('{"path": "audio/stereo8k.wav", "transcript": ', "malformed JSON"),
        ('["audio/stereo8k.wav", "hello"]', "not a JSON object but a list"),
        ('"audio/stereo8k.wav"', "not a JSON object but a str"),
        ("42", "not a JSON object but a int"), ("null", "not a JSON object but a NoneType"),
        (json.dumps({"transcript": "no path here"}), "no 'path' column value"),
        (json.dumps({"path": "", "id": "empty-path"}), "no 'path' column value"),
        (b'{"path": "audio/caf\xe9.wav", "id": "latin1"}', "not UTF-8 (byte 0xe9"),
        ('{"path": "audio/a\\udcff.wav", "id": "surrogate"}', "column 'path' holds text that is not valid UTF-8"),
        (json.dumps({"path": "/etc/passwd", "id": "abs"}), "leads outside the manifest's folder"),
        (json.dumps({"path": "../outside.wav", "id": "up"}), "leads outside the manifest's folder"),
        (json.dumps({"path": "audio", "id": "folder", **said}), "file not found"),
        (json.dumps({"path": "audio/missing.wav", **said}), "file not found"),
        (json.dumps({"path": "audio/corrupt.wav", **said}), "cannot decode audio"),
        (json.dumps({"path": "audio/text.wav", **said}), "cannot decode audio"),
        (json.dumps({"path": "audio/empty.wav", **said}), "empty"),
        (json.dumps({"path": "audio/silent.wav", **said}), "silent"),
        (json.dumps({"path": "audio/nan.wav", **said}), "NaN or infinite"),
        (json.dumps({"path": "audio/long.wav", **said}), "too long"),
        (json.dumps({"path": "audio/blip.wav", **said}), "too short"),
        (json.dumps({"path": "audio/stereo8k.wav", "id": "robot", "transcript": "x", "gender": "robot"}),
         "unknown gender label 'robot'"),
        (json.dumps({"path": "audio/stereo8k.wav", "id": "mute"}), "no transcript in the metadata"),
    ]
    (folder / "m.jsonl").write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode()
                                                for line, _ in jsonl) + b"\n\n")
    csv_lines = [
        (f"{good[1]['path']},{good[1]['id']}-csv,\"{good[1]['transcript']}\"", None),
        ('audio/stereo8k.wav,quote,"an unterminated quote', "malformed CSV (unexpected end of data"),
        (f"{good[2]['path']},after-the-quote,Still read.", None),
        ('audio/stereo8k.wav,"half"quoted,x', "malformed CSV (',' expected after '\"'"),
        ("audio/stereo8k.wav,too,many,fields", "4 fields where the header has 3"),
        ("audio/stereo8k.wav", "1 fields where the header has 3"),
        (b"audio/stereo8k.wav,bad-byte,\xff\xfe", "not UTF-8 (byte 0xff"),
    ]
    (folder / "m.csv").write_bytes(b"path,id,transcript\n" + b"\n".join(
        line if isinstance(line, bytes) else line.encode() for line, _ in csv_lines) + b"\n")
    return jsonl, csv_lines


def _expected_row(manifest, line):
    """(id, transcript) of a usable manifest line."""
    if manifest.suffix == ".csv":
        import csv

        _, row_id, transcript = next(csv.reader([line]))
        return row_id, transcript
    record = json.loads(line)
    return str(record.get("id") or Path(record["path"]).stem), record.get("transcript")


def test_bad_input_campaign_every_line_is_described_or_rejected_with_its_reason(corpus, tmp_path):
    jsonl, csv_lines = _bad_input_campaign(tmp_path, corpus)
    tried = handled = lost = mixed = 0
    for manifest, cases in ((tmp_path / "m.jsonl", jsonl), (tmp_path / "m.csv", csv_lines)):
        out = tmp_path / f"out-{manifest.suffix[1:]}"
        summary = describe(DescribeConfig(source=str(manifest), out=str(out), progress=False, max_seconds=10.0,
                                          chunking=ChunkingSection(chunk_size=4)))
        assert summary["inputs"] == len(cases)
        lost += summary["inputs"] - summary["described"] - summary["rejected"]
        rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
        expected = {}
        for line_no, (line, reason) in enumerate(cases, start=2 if manifest.suffix == ".csv" else 1):
            at_line = [r for r in rejects if r["source"] == f"{manifest.name}:{line_no}"]
            if reason is None:
                assert not at_line, at_line
                row_id, transcript = _expected_row(manifest, line)
                expected[row_id] = transcript
                continue
            tried += 1
            if not at_line:  # a readable line whose audio or labels fail: its reject carries its id
                at_line = [r for r in rejects if r["id"] == _expected_row(manifest, line)[0]]
            assert len(at_line) == 1 and reason in at_line[0]["reason"], (line, at_line)
            handled += 1
        rows = _rows(out)
        assert sorted(r["id"] for r in rows) == sorted(expected)
        mixed += sum(row["transcript"] != expected[row["id"]] or f"] {expected[row['id']]} (" not in row["description"]
                     for row in rows)
    print(f"\nbad describe inputs tried {tried}, handled cleanly {handled}, rows lost {lost}, silent mix-ups {mixed}")
    assert tried >= 27 and handled == tried and lost == 0 and mixed == 0


def _lhotse_recording(folder, name, texts, rate=22050):
    """A WAV of espeak-ng speech (one utterance per text, back to back) and its lhotse Recording."""
    from lhotse import Recording

    from desta.audio.tts import Voice, synthesize

    voices = [Voice(accent="British", variant="f2"), Voice(accent="American", variant="m3")]
    pieces = [synthesize(t, voices[i % 2]) for i, t in enumerate(texts)]
    import librosa

    samples = librosa.resample(np.concatenate(pieces), orig_sr=16000, target_sr=rate)
    sf.write(folder / f"{name}.wav", samples, rate)
    return Recording.from_file(folder / f"{name}.wav", recording_id=name), [len(p) / 16000 for p in pieces]


def test_lhotse_cutset_is_a_describe_source(tmp_path):
    """Supervision text, speaker, gender and custom emotion/age become desta's attributes with no mapping;
    a cut holding two supervisions gives two rows with their own audio; an unreadable cut is a reject."""
    from lhotse import CutSet, MonoCut, SupervisionSegment

    whole, (seconds,) = _lhotse_recording(tmp_path, "utt0", ["Please call Stella at the station."])
    pair, lengths = _lhotse_recording(tmp_path, "conv1", ["Good morning to you.", "The train is late again."])
    cuts = [MonoCut(id="utt0", start=0.0, duration=whole.duration, channel=0, recording=whole, supervisions=[
        SupervisionSegment(id="utt0", recording_id="utt0", start=0.0, duration=whole.duration, channel=0,
                           text="Please call Stella at the station.", speaker="p225", gender="F",
                           language="English", custom={"emotion": "happy", "age": 23})])]
    cuts.append(MonoCut(id="conv1", start=0.0, duration=pair.duration, channel=0, recording=pair, supervisions=[
        SupervisionSegment(id="conv1-a", recording_id="conv1", start=0.0, duration=lengths[0], channel=0,
                           text="Good morning to you.", speaker="spk1", gender="female"),
        SupervisionSegment(id="conv1-b", recording_id="conv1", start=lengths[0], duration=lengths[1], channel=0,
                           text="The train is late again.", speaker="spk2", gender="M",
                           custom={"emotion": "sad"})]))
    gone, _ = _lhotse_recording(tmp_path, "gone", ["Deleted after the manifest was written."])
    cuts.append(MonoCut(id="gone", start=0.5, duration=1.0, channel=0, recording=gone, supervisions=[]))
    CutSet.from_cuts(cuts).to_file(tmp_path / "cuts.jsonl.gz")
    (tmp_path / "gone.wav").unlink()

    summary = describe(DescribeConfig(source=str(tmp_path / "cuts.jsonl.gz"), out=str(tmp_path / "d"),
                                      progress=False))
    assert summary == {"inputs": 4, "described": 3, "rejected": 1, "duplicate_ids": 0, "hours": pytest.approx(
        (seconds + sum(lengths)) / 3600, abs=2e-4)}
    assert "lhotse cannot read the audio" in (tmp_path / "d" / "rejects.jsonl").read_text()
    rows = {r["id"]: r for r in _rows(tmp_path / "d")}
    first = rows["utt0"]
    assert (first["transcript"], first["speaker"], first["gender"], first["emotion"], first["age"],
            first["language"]) == ("Please call Stella at the station.", "p225", "Female", "Happy", "Young adult",
                                   "English")
    assert first["description"].startswith("[00:00-00:0") and "Please call Stella at the station. (Gender: Female, " \
        "Emotion: Happy, Age: Young adult" in first["description"]
    assert json.loads(first["sources"])["gender"] == "metadata"
    a, b = rows["conv1-a"], rows["conv1-b"]
    assert (a["transcript"], a["gender"], a["emotion"]) == ("Good morning to you.", "Female", None)
    assert (b["transcript"], b["gender"], b["emotion"]) == ("The train is late again.", "Male", "Sad")
    assert a["duration"] == pytest.approx(lengths[0], abs=0.01) and b["duration"] == pytest.approx(lengths[1], abs=0.01)


def test_lhotse_prepare_folder_reads_the_part_asked_for(tmp_path):
    """`lhotse prepare` writes <corpus>_recordings_<part>.jsonl.gz and _supervisions_<part>: --split picks one."""
    from lhotse import RecordingSet, SupervisionSegment, SupervisionSet

    out = tmp_path / "manifests"
    out.mkdir()
    for part, text in (("dev-clean", "Go do you hear."), ("test-clean", "The boat sailed away.")):
        recording, _ = _lhotse_recording(tmp_path, part, [text], rate=16000)
        RecordingSet.from_recordings([recording]).to_file(out / f"librispeech_recordings_{part}.jsonl.gz")
        SupervisionSet.from_segments([SupervisionSegment(
            id=f"{part}-0", recording_id=part, start=0.0, duration=recording.duration, channel=0, text=text.upper(),
            speaker="84", language="English")]).to_file(out / f"librispeech_supervisions_{part}.jsonl.gz")
    assert main(["describe", "--source", str(out), "--split", "test-clean", "--out", str(tmp_path / "d")]) == 0
    (row,) = _rows(tmp_path / "d")
    assert row["transcript"] == "THE BOAT SAILED AWAY." and row["speaker"] == "84" and row["gender"] is None
    with pytest.raises(ValueError, match=r"parts \['dev-clean', 'test-clean'\], not 'train'; pass --split"):
        describe(DescribeConfig(source=str(out), out=str(tmp_path / "e"), progress=False))


def test_description_for_a_known_row():
    result = {"duration": 2.2, "transcript": "Excuse me?", "gender": "Female", "emotion": "Neutral",
              "accent": "British", "age": None, "pitch": "High", "volume": "Low", "noise": "Clean",
              "f0_hz": 250.0, "level_dbfs": -30.0, "snr_db": 40.0, "active_seconds": 1.0, "sources": {}}
    row = finish_row(result, ["gender", "emotion", "accent", "age", "pitch", "volume", "speaking_speed",
                              "duration"])
    assert row["description"] == ("[00:00-00:02] Excuse me? (Gender: Female, Emotion: Neutral, Accent: British, "
                                  "Pitch: High, Volume: Low, Speaking speed: Slow, Duration: 2s)")
    short = finish_row(result, ["gender", "duration"])
    assert short["description"] == "[00:00-00:02] Excuse me? (Gender: Female, Duration: 2s)"
