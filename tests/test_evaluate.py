import re
from pathlib import Path

import pytest
from datasets import Audio, Dataset, load_from_disk

from desta.cli import main
from desta.core.instructions import INSTRUCTION_KINDS, follows, instruction_text, is_refusal
from desta.describe.description import with_transcript
from desta.evaluation.items import COLUMN_MAPS, build_eval_set, load_eval_set
from desta.evaluation.run import EvalConfig, evaluate
from desta.evaluation.scoring import score_item
from desta.prompts import EVAL_INSTRUCTIONS, TRAINING_POOLS
from tests.conftest import described_dataset

GENDERS = ["Female", "Male"]








# One passing and one failing answer per IFEval instruction kind desta draws from.
IFEVAL_CASES = {
    "detectable_format:json_format": ({}, '```json\n{"gender": "female"}\n```', "gender: female"),
    "length_constraints:number_words": ({"num_words": 5, "relation": "less than"}, "A woman speaks.",
                                        "A woman speaks slowly and calmly here."),
    "change_case:english_lowercase": ({}, "a woman asks where the station is.", "A woman asks where the station is."),
    "change_case:english_capital": ({}, "A WOMAN ASKS WHERE THE STATION IS.", "A woman asks where the station is."),
    "startend:end_checker": ({"end_phrase": "That is all."}, "A woman speaks. That is all.",
                             "That is all. A woman speaks."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Who speaks?"}, "Who speaks? A woman.", "A woman speaks."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* calm voice\n* British accent",
                                              "* calm voice\n* British accent\n* slow"),
    "keywords:existence": ({"keywords": ["voice", "tone"]}, "Her voice has a calm tone.", "She sounds calm."),
    "keywords:forbidden_words": ({"forbidden_words": ["speaker", "voice"]}, "She sounds calm.",
                                 "The speaker sounds calm."),
    "keywords:frequency": ({"keyword": "voice", "frequency": 2, "relation": "at least"},
                           "A calm voice, a low voice.", "A calm voice."),
    "startend:quotation": ({}, '"A woman asks for the station."', "A woman asks for the station."),
    "detectable_format:title": ({}, "<<The station>> A woman asks for it.", "A woman asks for the station."),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            "Section 1\nA woman.\nSection 2\nShe asks.", "A woman asks."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "A woman asks.\nP.S. She is calm.",
                                      "A woman asks."),
    "punctuation:no_comma": ({}, "A woman asks calmly.", "A woman asks, calmly."),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "A woman asks.\n\n***\n\nShe is calm.",
                                             "A woman asks. She is calm."),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 1}, "A *calm* woman asks.",
                                                      "A calm woman asks."),
    "detectable_content:number_placeholders": ({"num_placeholders": 1}, "Meet me at [address].", "Meet me there."),
}


def test_every_drawn_instruction_kind_is_tested():
    assert set(IFEVAL_CASES) == set(INSTRUCTION_KINDS) and len(INSTRUCTION_KINDS) >= 15


@pytest.mark.parametrize("kind", sorted(IFEVAL_CASES))
def test_ifeval_checkers_on_known_answers(kind):
    kwargs, passing, failing = IFEVAL_CASES[kind]
    spec = {"id": kind, "kwargs": kwargs}
    assert instruction_text(spec)  # IFEval's own wording
    assert follows(passing, spec).value == 1.0, passing
    assert follows(failing, spec).value == 0.0, failing
    assert follows("   ", spec).value == 0.0  # an empty answer never follows




def test_refusal_detection():
    assert is_refusal("I'm sorry, but I can't help with that request.")
    assert is_refusal("I cannot assist with making weapons.")
    assert not is_refusal("To stop a stuck process, run kill -9 PID.")


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    return described_dataset(tmp_path_factory.mktemp("eval"), num_clips=4, seed=8)


def _normal(text):
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def test_eval_set_draws_seeded_phrasings_disjoint_from_training(described, tmp_path):
    dataset = load_from_disk(str(described))
    items = build_eval_set(dataset, seed=3)
    assert [i["instruction"] for i in items] == [i["instruction"] for i in build_eval_set(dataset, seed=3)]
    assert [i["instruction"] for i in items] != [i["instruction"] for i in build_eval_set(dataset, seed=4)]
    single = {a for a in ("gender", "accent", "emotion", "speaking_speed", "pitch", "volume")
              if len(set(dataset[a]) - {None}) < 2}  # nothing to tell apart (synthetic speech has one emotion)
    assert "emotion" in single and {i["category"] for i in items} == set(EVAL_INSTRUCTIONS) - single
    assert all(len(templates) >= 6 for templates in EVAL_INSTRUCTIONS.values())
    training = {_normal(p) for pool in TRAINING_POOLS.values() for p in pool}
    assert not [i["instruction"] for i in items if _normal(i["instruction"].split("\n")[0]) in training]
    many = [i for seed in range(4) for i in build_eval_set(dataset, seed=seed)]
    assert len({i["instruction"] for i in many if i["category"] == "gender"}) >= 4  # phrasings vary per item
    yesno = [i for i in many if i["check"]["style"] == "yesno"]
    assert yesno and {i["answer"] for i in yesno} == {"yes", "no"}
    following = [i for i in items if i["category"] == "instruction_following"]
    assert len(following) == 2 * len(dataset)
    per_clip: dict[str, list[str]] = {}
    for item in following:
        per_clip.setdefault(item["id"], []).append(item["check"]["instruction"]["id"])
    assert all(len(set(kinds)) == 2 for kinds in per_clip.values())  # two different instruction kinds per clip
    assert main(["eval-set", "--source", str(described), "--out", str(tmp_path / "set"), "--seed", "3"]) == 0
    assert [r["instruction"] for r in load_eval_set(tmp_path / "set")] == [i["instruction"] for i in items]


def test_eval_set_keeps_only_voices_the_training_clips_never_use(described, tmp_path, capsys):
    dataset = load_from_disk(str(described))
    voices = sorted(set(dataset["voice"]))
    assert len(voices) >= 2
    heard = dataset.filter(lambda row: row["voice"] == voices[0])
    heard.save_to_disk(str(tmp_path / "train"))
    assert main(["eval-set", "--source", str(described), "--out", str(tmp_path / "set"),
                 "--unseen-voices-of", str(tmp_path / "train")]) == 0
    kept = load_eval_set(tmp_path / "set")
    assert set(kept["voice"]) == set(voices[1:])
    assert set(kept["id"]) == {row["id"] for row in dataset if row["voice"] != voices[0]}
    dataset.save_to_disk(str(tmp_path / "all"))
    dataset.remove_columns("voice").save_to_disk(str(tmp_path / "anon"))
    for train, error in (("all", "no unseen voice"), ("anon", "has no voice column"), ("missing", "not found")):
        assert main(["eval-set", "--source", str(described), "--out", str(tmp_path / "none"),
                     "--unseen-voices-of", str(tmp_path / train)]) == 2
        assert error in capsys.readouterr().err






def test_asr_reference_reads_the_whisper_transcript_not_the_gold(described, checkpoint, tmp_path, monkeypatch):
    import desta.evaluation.systems as evaluation
    from desta.audio import load_audio_ref
    from desta.model.loading import load

    assert main(["eval-set", "--source", str(described), "--out", str(tmp_path / "set"), "--max-clips", "2",
                 "--categories", "gender,transcription"]) == 0
    read: list[list[str]] = []
    real = evaluation.text_answers

    def recording(backend, items, descriptions, *args):
        read.append(list(descriptions))
        return real(backend, items, descriptions, *args)

    monkeypatch.setattr(evaluation, "text_answers", recording)
    report = evaluate(EvalConfig(checkpoints=[str(checkpoint)], eval_set=str(tmp_path / "set"),
                                 out=str(tmp_path / "report"), max_new_tokens=4, probes=False, progress=False))
    gold_read, asr_read = read
    model, processor = load(checkpoint)
    for item, gold_description, asr_description in zip(load_eval_set(tmp_path / "set"), gold_read, asr_read,
                                                        strict=True):
        heard = model.transcribe(processor, [load_audio_ref(item["audio"])])[0]
        assert gold_description == item["description"] and item["transcript"] in gold_description
        assert asr_description == with_transcript(item["description"], heard)
        assert item["transcript"] not in asr_description
    assert report["asr_reference_of"] == {"speech": "text_asr"} and report["whisper_wer"]["speech"] > 0.5


def test_eval_writes_report_for_a_tiny_checkpoint(described, checkpoint, tmp_path):
    assert main(["eval-set", "--source", str(described), "--out", str(tmp_path / "set"),
                 "--categories", "gender,transcription,instruction_following,duration,open", "--max-clips", "2"]) == 0
    report = evaluate(EvalConfig(checkpoints=[str(checkpoint), str(checkpoint)], eval_set=str(tmp_path / "set"),
                                 out=str(tmp_path / "report"), max_new_tokens=4, probe_max_new_tokens=6,
                                 progress=False))
    assert report["systems"] == ["ckpt", "ckpt-2"]
    assert set(report["items_per_second"]) == {"ckpt", "ckpt-2", "text", "text_asr"}  # one Whisper: one ASR reference
    gender = report["categories"]["gender"]
    assert {"ckpt", "text", "text_asr", "forgetting:ckpt", "forgetting_asr:ckpt-2", "agreement:ckpt", "rouge_l:ckpt",
            "asr_cost:text_asr"} <= set(gender["values"])
    assert all(ci[0] <= gender["values"][name] <= ci[1] for name, ci in gender["ci"].items() if ci)
    assert report["categories"]["open"]["values"]["text"] is None  # no judge: unscored, not guessed
    assert report["instruction_following_kinds"] and set(report["instruction_following_kinds"]) <= set(
        INSTRUCTION_KINDS)
    assert {"ckpt_answer", "text_answer", "text_asr_answer", "ckpt_score", "text_reason"} <= set(
        report["per_item"][0])
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| category | n | speech ckpt | speech ckpt-2 | text-ASR | text-gold |" in markdown
    assert "## Examples" in markdown and "## Instruction following by IFEval instruction" in markdown
    llm = report["text_reference_llm"]  # a local folder: named, not its path (reports get shared)
    assert f"same LLM ({Path(llm).name})" in markdown and llm not in markdown
    assert re.search(r"\| gender \| 2 \| \d\.\d\d \[\d\.\d\d, \d\.\d\d\]", markdown)
    assert (tmp_path / "report" / "scores.png").stat().st_size > 5000
    assert set(report["retention_probes"]["ckpt"]) >= {"format_following", "refusal_rate", "heldout_loglik"}


def test_benchmark_columns_load_through_the_same_path(described, tmp_path):
    audio = load_from_disk(str(described))[0]["audio"]
    Dataset.from_dict({"audio": [audio], "question": ["Who speaks?"], "choices": [["man", "woman"]],
                       "answer": ["woman"]}).cast_column("audio", Audio(decode=False)).save_to_disk(str(tmp_path / "b"))
    dataset = load_eval_set(tmp_path / "b", COLUMN_MAPS["mmau"])
    item = dict(dataset[0])
    assert item["instruction"] == "Who speaks?" and item["category"] == "benchmark"
    assert score_item(item, "A woman.")["score"] == 1.0 and score_item(item, "A man.")["score"] == 0.0


def test_eval_errors(described, tmp_path):
    with pytest.raises(FileNotFoundError, match="eval set .* not found"):
        evaluate(EvalConfig(checkpoints=["x"], eval_set=str(tmp_path / "none"), out=str(tmp_path / "r")))
    Dataset.from_dict({"id": ["a"], "text": ["b"]}).save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(ValueError, match="is not an eval set"):
        evaluate(EvalConfig(checkpoints=["x"], eval_set=str(tmp_path / "wrong"), out=str(tmp_path / "r")))
    assert main(["eval-set", "--source", str(described), "--out", str(tmp_path / "set"), "--max-clips", "1"]) == 0
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing not found"):
        evaluate(EvalConfig(checkpoints=[str(tmp_path / "missing")], eval_set=str(tmp_path / "set"),
                            out=str(tmp_path / "r")))




def test_a_repeated_eval_reuses_its_cached_answers(described, checkpoint, tmp_path, monkeypatch):
    import desta.evaluation.systems as evaluation

    assert main(["eval-set", "--source", str(described), "--out", str(tmp_path / "set"), "--max-clips", "1",
                 "--categories", "gender,duration"]) == 0
    config = EvalConfig(checkpoints=[str(checkpoint)], eval_set=str(tmp_path / "set"), out=str(tmp_path / "r1"),
                        max_new_tokens=4, probes=False, progress=False, cache=str(tmp_path / "cache"))
    first = evaluate(config)

    def never(*args):
        raise AssertionError("computed again")

    for name in ("speech_answers", "text_answers", "clip_transcripts"):
        monkeypatch.setattr(evaluation, name, never)
    config.out = str(tmp_path / "r2")
    again = evaluate(config)
    assert again["per_item"] == first["per_item"] and again["overall"] == first["overall"]
    config.max_new_tokens = 5  # another setting: not the same answers
    with pytest.raises(AssertionError, match="computed again"):
        evaluate(config)


def test_connector_only_checkpoints_share_the_base_llms_probes(described, checkpoint, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    import desta.core.probes as probes

    assert main(["eval-set", "--source", str(described), "--out", str(tmp_path / "set"), "--max-clips", "1",
                 "--categories", "gender"]) == 0
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, other / "model.safetensors")
    config = EvalConfig(checkpoints=[str(checkpoint)], eval_set=str(tmp_path / "set"), out=str(tmp_path / "r1"),
                        max_new_tokens=4, probe_max_new_tokens=4, progress=False, cache=str(tmp_path / "cache"))
    first = evaluate(config)

    def never(*args):
        raise AssertionError("probes computed again")

    monkeypatch.setattr(probes, "retention_probes", never)
    config.checkpoints, config.out = [str(other)], str(tmp_path / "r2")
    second = evaluate(config)  # another connector, the same frozen LLM: its probes come from the cache
    assert second["retention_probes"]["speech"] == first["retention_probes"]["speech"]


def test_the_report_stands_each_score_beside_chance_and_says_what_is_unseen(described, checkpoint, tmp_path):
    dataset = load_from_disk(str(described))
    voices = sorted(set(dataset["voice"]))
    dataset.filter(lambda row: row["voice"] == voices[0]).save_to_disk(str(tmp_path / "trained-on"))
    assert main(["eval-set", "--source", str(described), "--out", str(tmp_path / "set"),
                 "--categories", "gender,pitch,duration,instruction_following"]) == 0
    report = evaluate(EvalConfig(checkpoints=[str(checkpoint)], eval_set=str(tmp_path / "set"),
                                 out=str(tmp_path / "report"), max_new_tokens=4, probes=False, progress=False,
                                 trained_tasks=["gender"], train_voices=str(tmp_path / "trained-on")))
    gender = report["categories"]["gender"]["values"]
    assert gender["chance"] == 0.5 and 0.5 <= gender["constant"] <= 1.0
    assert report["categories"]["instruction_following"]["values"]["chance"] is None
    assert {"above_chance:speech", "above_chance:text"} <= set(gender)
    groups = report["groups"]["speech"]
    assert set(groups) == {"trained tasks", "unseen tasks", "seen voices", "unseen voices"}
    assert groups["trained tasks"]["n"] == len(dataset)  # one gender item per clip
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Against chance" in markdown and "## What is unseen for speech" in markdown
    assert "Overall, relative to each reference: speech vs text-ASR:" in markdown
