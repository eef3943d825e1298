"""The voice catalogue and voice-disjoint synthetic splits: rows record their voice, held-out voices and eval
sentences never reach training, missing voices are reported with their install command."""

import json

import pytest
from datasets import load_from_disk

from desta.audio import voices
from desta.audio.synth import SynthConfig, VoicePlan, grammar_size, row_for, synth_corpus
from desta.audio.voices import CATALOGUE, VoiceUnavailable, hold_out, select
from desta.cli import main
from desta.describe import DescribeConfig, describe

POOL = tuple(v.id for v in select(["all"]))


def test_catalogue_has_four_engines_and_their_voices():
    engines = {v.engine for v in CATALOGUE.values()}
    assert engines == {"espeak", "mbrola", "flite", "piper"}
    assert len(select(["espeak"])) == 48 and len(select(["mbrola"])) == 20 and len(select(["flite"])) == 4
    assert CATALOGUE["mbrola:mb-de4-en"].accent == "German" and CATALOGUE["mbrola:mb-us1"].gender == "Female"
    assert "non-commercial" in CATALOGUE["mbrola:mb-us1"].licence
    with pytest.raises(ValueError, match=r"unknown voices \['mbrola:mb-xx9'\].*desta voices"):
        select(["mbrola:mb-xx9"])


def test_rows_record_engine_voice_and_its_labels():
    plan = VoicePlan(pool=POOL)
    rows = [row_for(i, seed=0, plan=plan) for i in range(300)]
    assert {r.engine for r in rows} == {"espeak", "mbrola", "flite", "piper"}
    for row in rows:
        voice = CATALOGUE[row.voice]
        assert (row.engine, row.gender, row.accent, row.licence) == (voice.engine, voice.gender, voice.accent,
                                                                      voice.licence)
    assert row_for(7, seed=0, plan=plan) == row_for(7, seed=0, plan=plan)


def test_held_out_voices_never_speak_in_the_training_split():
    held = hold_out(select(["all"]), ["mbrola:mb-us1", "flite:awb"], share=0.2, seed=0)
    assert {"mbrola:mb-us1", "flite:awb"} <= set(held) and len(held) >= 15
    assert held == hold_out(select(["all"]), ["mbrola:mb-us1", "flite:awb"], share=0.2, seed=0)  # seed-stable
    train = [row_for(i, seed=0, plan=VoicePlan(pool=POOL, held_out=tuple(held))) for i in range(1500)]
    assert not {r.voice for r in train} & set(held)
    assert len({r.voice for r in train}) > 40
    evaluation = [row_for(i, seed=1, plan=VoicePlan(pool=POOL, held_out=tuple(held), split="eval"))
                  for i in range(200)]
    unseen = [r for r in evaluation if r.voice in held]
    assert 0.35 < len(unseen) / len(evaluation) < 0.65  # about half the eval clips from held-out voices
    assert {r.voice for r in evaluation} - set(held)  # and the rest from training voices


def test_no_eval_sentence_is_a_training_sentence():
    assert grammar_size() > 800_000
    train = {row_for(i, seed, VoicePlan()).transcript for seed in (0, 1) for i in range(2000)}
    evaluation = {row_for(i, seed, VoicePlan(split="eval")).transcript for seed in (0, 1) for i in range(500)}
    assert len(evaluation) > 450 and len(train) > 3500
    assert not train & evaluation


def test_synth_config_errors_name_the_voices_and_the_fix():
    with pytest.raises(ValueError, match=r"hold_out: hold_out names voices that are not in the voice pool: "
                                         r"\['flite:slt'\]"):
        SynthConfig(out="x", voices=["espeak"], hold_out=["flite:slt"])
    with pytest.raises(ValueError, match="holds out every voice of the pool"):
        SynthConfig(out="x", voices=["flite:slt"], hold_out=["flite:slt"])


def test_missing_voices_are_reported_once_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(voices, "MBROLA_DATA", tmp_path / "no-mbrola")  # as on a machine without mbrola-XX
    monkeypatch.setenv("PATH", str(tmp_path))  # and without the flite program
    voices._flite_voices.cache_clear()
    try:
        plan = VoicePlan(pool=("espeak:en-us+f1", "mbrola:mb-us1", "mbrola:mb-de4-en", "flite:slt"))
        with pytest.raises(VoiceUnavailable) as caught:
            synth_corpus(tmp_path / "c", num_clips=4, plan=plan, progress=False)
        message = str(caught.value)
        assert "mbrola:mb-us1, mbrola:mb-de4-en" in message and "apt-get install -y" in message
        assert "mbrola-us1 mbrola-de4" in message and "apt-get install -y flite" in message
        assert "espeak:en-us+f1" not in message and message.count("mbrola:mb-us1") == 1
        assert not (tmp_path / "c" / "manifest.jsonl").exists()  # nothing written, nothing spoken instead
        assert main(["synth", "--out", str(tmp_path / "c"), "--num-clips", "2", "--voices", "flite:slt"]) == 2
        assert "install: apt-get install -y flite" in capsys.readouterr().err
    finally:
        voices._flite_voices.cache_clear()


def test_describe_carries_voice_and_engine_through(tmp_path):
    plan = VoicePlan(pool=("espeak:en-us+f1", "espeak:en-gb-scotland+m2"), held_out=("espeak:en-gb-scotland+m2",),
                     split="eval")
    manifest = synth_corpus(tmp_path / "c", num_clips=4, seed=2, plan=plan, progress=False)
    record = json.loads((tmp_path / "c" / "voices.json").read_text())
    assert record["held_out"] == ["espeak:en-gb-scotland+m2"] and record["split"] == "eval"
    describe(DescribeConfig(source=str(manifest), out=str(tmp_path / "d"), mapping="synthetic", progress=False))
    described = load_from_disk(str(tmp_path / "d" / "dataset"))
    rows = {json.loads(line)["id"]: json.loads(line) for line in manifest.read_text().splitlines()}
    for row in described:
        assert (row["voice"], row["engine"]) == (rows[row["id"]]["voice"], "espeak")
        assert row["accent"] == CATALOGUE[row["voice"]].accent


def test_a_rerun_never_reuses_clips_made_for_other_rows(tmp_path):
    first = VoicePlan(pool=("espeak:en-us+f1",))
    manifest = synth_corpus(tmp_path, num_clips=2, seed=5, plan=first, progress=False)
    before = (tmp_path / "audio" / "synth-5-000000.wav").read_bytes()
    assert synth_corpus(tmp_path, num_clips=3, seed=5, plan=first, progress=False) == manifest  # resumes, extends
    assert (tmp_path / "audio" / "synth-5-000000.wav").read_bytes() == before
    other = VoicePlan(pool=("espeak:en-029+m4",))
    with pytest.raises(ValueError, match=r"holds 3 clips made for other rows \(e.g. synth-5-000000: "
                                         r"'espeak:en-us\+f1' saying .*--overwrite"):
        synth_corpus(tmp_path, num_clips=3, seed=5, plan=other, progress=False)
    synth_corpus(tmp_path, num_clips=3, seed=5, plan=other, progress=False, overwrite=True)
    assert (tmp_path / "audio" / "synth-5-000000.wav").read_bytes() != before
    assert {json.loads(line)["voice"] for line in manifest.read_text().splitlines()} == {"espeak:en-029+m4"}


def test_compare_splits_reports_unseen_voices_and_no_shared_sentence(tmp_path):
    from desta.audio.synth import compare_splits

    pool, held = ("espeak:en-us+f1", "espeak:en-us+m1", "espeak:en-029+f2"), ("espeak:en-029+f2",)
    train = synth_corpus(tmp_path / "t", num_clips=6, plan=VoicePlan(pool, held), progress=False)
    evaluation = synth_corpus(tmp_path / "e", num_clips=6, seed=1, plan=VoicePlan(pool, held, "eval"),
                              progress=False)
    report = compare_splits(train, evaluation)
    assert report["unseen_voices"] == ["espeak:en-029+f2"] and report["shared_sentences"] == []
    eval_rows = [json.loads(line) for line in evaluation.read_text().splitlines()]
    assert report["unseen_clips"] == sum(r["voice"] == "espeak:en-029+f2" for r in eval_rows) > 0
