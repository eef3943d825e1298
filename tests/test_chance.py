"""What guessing scores on an eval set, each system's margin over it, what "unseen" means for a checkpoint, and
when a report may say "within X %"."""

import json

import pytest
import yaml
from datasets import Dataset

from desta.evaluation.chance import CHANCE, CONSTANT, baselines, margin_series, stronger_baseline
from desta.evaluation.compare import CompareConfig, compare
from desta.evaluation.groups import TRAINED, UNSEEN_TASK, UNSEEN_VOICE, item_groups, training_data
from desta.evaluation.report import equivalence


def label_item(gold, category="gender", choices=("Female", "Male")):
    return {"category": category, "choices": list(choices), "check": {"style": "label"}, "answer": gold}


def test_chance_and_the_best_constant_are_exact():
    items = [label_item("Male"), label_item("Male"), label_item("Male"), label_item("Female"),
             {"category": "gender", "choices": None, "check": {"style": "yesno"}, "answer": "no"},
             {"category": "gender", "choices": None, "check": {"style": "yesno"}, "answer": "yes"},
             {"category": "gender", "choices": None, "check": {"style": "yesno"}, "answer": "no"},
             label_item("High", "pitch", ("High", "Low", "Normal")),
             {"category": "transcription", "choices": None, "check": {"style": "transcript"}, "answer": "hi"}]
    base = baselines(items)
    assert base[CHANCE] == [0.5] * 7 + [1 / 3, None]
    assert base[CONSTANT] == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, None]  # always "Male", always "no"


def test_duration_chance_uses_the_other_clips_lengths():
    golds = ["1.00", "2.00", "4.00", "4.10"]
    items = [{"category": "duration", "choices": None, "check": {"style": "number"}, "answer": g} for g in golds]
    base = baselines(items)
    # another clip's length is right for 4.00 and 4.10 only (within 20 %): 1/3 for each of them
    assert base[CHANCE] == pytest.approx([0.0, 0.0, 1 / 3, 1 / 3])
    assert base[CONSTANT] == [0.0, 0.0, 1.0, 1.0]  # 4 seconds is right twice: no constant does better


def test_the_margin_is_over_the_stronger_baseline_item_by_item():
    items = [label_item("Male")] * 3 + [label_item("Female")]
    base = baselines(items)
    stronger = stronger_baseline(items, base)
    assert stronger == base[CONSTANT]  # 0.75 beats chance's 0.5
    assert margin_series([1.0, 0.0, None, 1.0], stronger) == [0.0, -1.0, None, 1.0]


@pytest.mark.parametrize("value, ci, said", [
    (0.01, [-0.09, 0.08], "within 10 %"), (0.01, [-0.2, 0.29], "not shown: [-20 %, +29 %] is wider than +-10 %"),
    (-0.4, [-0.5, -0.3], "below: -40 % [-50 %, -30 %]"), (None, None, "not measured"),
])
def test_equivalence_is_said_only_when_the_whole_interval_shows_it(value, ci, said):
    assert equivalence(value, ci) == said


def test_training_data_is_read_from_the_checkpoints_targets(tmp_path):
    targets = tmp_path / "targets"
    Dataset.from_dict({"prompt_pool": ["voice", "voice"], "voice": ["espeak:en-us+f1", "espeak:en-us+m1"],
                       "prompt": ["Tell me the speaker's gender.", "Describe the audio in detail."]}
                      ).save_to_disk(str(targets))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "run_config.yaml").write_text(yaml.safe_dump({"data": {"train": str(targets)}}))
    data = training_data(checkpoint)
    assert data.tasks == {"gender"} and data.voices == {"espeak:en-us+f1", "espeak:en-us+m1"}
    items = [{"category": "gender", "voice": "espeak:en-us+f1"}, {"category": "accent", "voice": "espeak:en-us+f2"}]
    groups = item_groups(items, data)
    assert groups[TRAINED] == [0] and groups[UNSEEN_TASK] == [1] and groups[UNSEEN_VOICE] == [1]
    assert training_data(tmp_path / "elsewhere").tasks is None  # no run_config: unknown, not "none trained"
    assert training_data(checkpoint, tasks=["pitch"]).tasks == {"pitch"}


def test_compare_draws_what_guessing_scores(tmp_path):
    report = {"systems": ["speech"], "per_item": [], "retention_probes": {},
              "overall": {"values": {"speech": 0.6}, "ci": {"speech": [0.5, 0.7]}},
              "categories": {"gender": {"values": {"speech": 0.6, "chance": 0.5, "constant": 0.55},
                                        "ci": {"speech": [0.5, 0.7]}}}}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text(json.dumps(report))
    compare(CompareConfig(reports=[f"run:1={tmp_path / 'r'}"], out=str(tmp_path / "out"),
                          metrics=["gender:speech", "overall:speech"]))
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["chance"] == {"gender:speech": 0.55}  # the overall row mixes open categories: no line there
    assert "| *guessing (chance or the best constant answer)* | 0.55 |" in (tmp_path / "out" / "compare.md").read_text()
