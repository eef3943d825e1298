
import pytest
from datasets import Audio, Dataset, load_from_disk

from desta.cli import main
from desta.core.instructions import (
    check_bullets,
    check_json_keys,
    check_lowercase,
    check_max_words,
    check_prefix,
    is_refusal,
)
from desta.evaluate import BENCHMARK_COLUMNS, EvalConfig, build_eval_set, evaluate, load_eval_set, score_item
from desta.prompts import EVAL_INSTRUCTIONS
from desta.scoring import score_label, score_number, score_transcript
from tests.conftest import described_dataset

GENDERS = ["Female", "Male"]


@pytest.mark.parametrize("answer, expected", [
    ("Female", 1.0), ("The speaker is a woman.", 1.0), ("She sounds calm.", 1.0), ("female voice", 1.0),
    ("Male", 0.0), ("It is a man speaking.", 0.0), ("I can't tell.", 0.0), ("Either male or female.", 0.0),
])
def test_gender_answers(answer, expected):
    assert score_label(answer, "Female", GENDERS, "gender").value == expected


@pytest.mark.parametrize("answer, gold, expected", [
    ("They talk quite slowly.", "Slow", 1.0), ("At a moderate pace.", "Normal", 1.0),
    ("Very fast!", "Slow", 0.0), ("Rapidly.", "Fast", 1.0),
])
def test_speed_answers(answer, gold, expected):
    assert score_label(answer, gold, ["Fast", "Normal", "Slow"], "speaking_speed").value == expected


def test_accent_and_number_and_transcript():
    assert score_label("A Scottish accent.", "Scottish", ["American", "British", "Scottish"], "accent").value == 1
    assert score_label("British, I think", "Scottish", ["American", "British", "Scottish"], "accent").value == 0
    assert score_number("Roughly 4 seconds", 3.6).value == 1 and score_number("20 s", 3.6).value == 0
    assert score_number("no idea", 3.6).reason == "no number"
    assert score_transcript("Excuse me, where's the station?", "excuse me where is the station").value == 1.0
    assert score_transcript("", "excuse me").value == 0.0


def test_format_checkers():
    assert check_json_keys('```json\n{"gender": "f", "transcript": "x"}\n```', ["gender", "transcript"]).value == 1
    assert check_json_keys('{"gender": "f"}', ["gender", "transcript"]).value == 0
    assert check_json_keys("gender: f", ["gender"]).reason == "not valid JSON"
    assert check_json_keys("[1, 2]", ["gender"]).reason == "JSON but not an object"
    assert check_max_words("a woman asks a question", 5).value == 1
    assert check_max_words("a woman asks a short question", 5).value == 0
    assert check_lowercase("a quiet voice.").value == 1 and check_lowercase("A quiet voice.").value == 0
    assert check_prefix("The clip holds speech.", "The clip").value == 1
    assert check_prefix("This clip holds speech.", "The clip").value == 0
    assert check_bullets("- one\n- two\n- three", 3).value == 1
    assert check_bullets("Here:\n- one\n- two\n- three", 3).value == 0
    assert check_bullets("- one\n- two", 3).value == 0


def test_refusal_detection():
    assert is_refusal("I'm sorry, but I can't help with that request.")
    assert is_refusal("I cannot assist with making weapons.")
    assert not is_refusal("To stop a stuck process, run kill -9 PID.")


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    return described_dataset(tmp_path_factory.mktemp("eval"), num_clips=4, seed=8)


def test_eval_set_covers_categories(described, tmp_path):
    items = build_eval_set(load_from_disk(str(described)))
    categories = {i["category"] for i in items}
    assert {"transcription", "duration", "format_json", "format_bullets", "open", "accent"} <= categories
    templates = {t for ts in EVAL_INSTRUCTIONS.values() for t in ts}
    filled = [i for i in items if i["instruction"] not in templates]  # templates with {labels}, {n} or {prefix}
    assert filled and all("{" not in i["instruction"] for i in items)
    accent = next(i for i in items if i["category"] == "accent")
    assert all(label in accent["instruction"] for label in accent["choices"])
    assert main(["eval-set", "--source", str(described), "--out", str(tmp_path / "set")]) == 0
    assert len(load_eval_set(tmp_path / "set")) == len(items)


def test_eval_writes_report_for_a_tiny_checkpoint(described, tmp_path):
    from desta.loading import build, save
    from desta.tiny import save_tiny_bases

    whisper_dir, llm_dir = save_tiny_bases(tmp_path / "bases")
    model, processor = build(str(whisper_dir), str(llm_dir))
    save(model, processor, tmp_path / "ckpt")
    assert main(["eval-set", "--source", str(described), "--out", str(tmp_path / "set"),
                 "--categories", "gender,transcription,format_json,duration,open", "--max-clips", "2"]) == 0
    report = evaluate(EvalConfig(checkpoints=[str(tmp_path / "ckpt"), str(tmp_path / "ckpt")],
                                 eval_set=str(tmp_path / "set"), out=str(tmp_path / "report"), max_new_tokens=4,
                                 probe_max_new_tokens=6, progress=False))
    assert set(report) >= {"categories", "overall", "per_item", "items_per_second", "retention_probes"}
    assert report["systems"] == ["ckpt", "ckpt-2"]
    assert set(report["items_per_second"]) == {"ckpt", "ckpt-2", "text"}
    gender = report["categories"]["gender"]
    assert {"ckpt", "text", "forgetting:ckpt", "forgetting:ckpt-2"} <= set(gender)
    assert report["categories"]["open"]["text"] is None  # no judge: unscored, not guessed
    item = report["per_item"][0]
    assert {"ckpt_answer", "text_answer", "ckpt_score", "text_reason"} <= set(item)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| category | speech ckpt | speech ckpt-2 | text reference |" in markdown
    assert (tmp_path / "report" / "scores.png").stat().st_size > 5000
    assert set(report["retention_probes"]["ckpt"]) >= {"format_following", "refusal_rate", "heldout_loglik"}


def test_forgetting_rate_definition():
    from desta.evaluate import category_table

    items = [{"category": "gender"}] * 4
    scores = {"m": [{"score": s} for s in (1, 0, 0, 1)], "text": [{"score": s} for s in (1, 1, 1, 1)]}
    row = category_table(items, scores)["gender"]
    assert row["m"] == 0.5 and row["text"] == 1.0 and row["forgetting:m"] == -0.5


def test_benchmark_columns_load_through_the_same_path(described, tmp_path):
    audio = load_from_disk(str(described))[0]["audio"]
    Dataset.from_dict({"audio": [audio], "question": ["Who speaks?"], "choices": [["man", "woman"]],
                       "answer": ["woman"]}).cast_column("audio", Audio(decode=False)).save_to_disk(str(tmp_path / "b"))
    dataset = load_eval_set(tmp_path / "b", BENCHMARK_COLUMNS["mmau"])
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


