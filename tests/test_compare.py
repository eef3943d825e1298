"""desta compare: metrics of several eval reports against training progress, and paired differences."""

import json

import pytest

from desta.cli import main
from desta.core.args import ConfigError
from desta.evaluation.compare import CompareConfig, compare


def _report(folder, scores, categories=("gender", "pitch"), ids=None):
    """A report.json as desta eval writes it, for one speech system with these per-item scores."""
    ids = ids or [f"item-{k}" for k in range(len(scores))]
    cats = [categories[k % len(categories)] for k in range(len(scores))]
    per_item = [{"item_id": i, "category": c, "speech_score": s} for i, c, s in zip(ids, cats, scores, strict=True)]
    by_category = {c: [s for s, cc in zip(scores, cats, strict=True) if cc == c] for c in categories}
    mean = sum(sum(v) / len(v) for v in by_category.values()) / len(by_category)
    report = {"systems": ["speech"], "per_item": per_item, "retention_probes": {},
              "overall": {"values": {"speech": mean}, "ci": {"speech": [mean - 0.1, mean + 0.1]}},
              "categories": {c: {"values": {"speech": sum(v) / len(v)}, "ci": {"speech": None}}
                             for c, v in by_category.items()}}
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_metrics_by_run_and_x_with_a_paired_difference(tmp_path):
    ones, zeros = [1.0] * 40, [0.0] * 40
    half = [float(k % 4 < 2) for k in range(40)]  # 0.5 in each category
    entries = [f"base:1={_report(tmp_path / 'b1', ones)}", f"base:2={_report(tmp_path / 'b2', half)}",
               f"other:1={_report(tmp_path / 'o1', ones)}", f"other:2={_report(tmp_path / 'o2', zeros)}"]
    table = compare(CompareConfig(reports=entries, out=str(tmp_path / "out"), metrics=["overall:speech"],
                                  paired_with="base"))
    assert table["overall:speech"]["other"] == [[1.0, 1.0, 0.9, 1.1], [2.0, 0.0, -0.1, 0.1]]
    paired = json.loads((tmp_path / "out" / "compare.json").read_text())["paired"]["other"]
    assert paired[0][1:] == [0.0, 0.0, 0.0]  # identical items: no difference, no spread
    x, difference, low, high = paired[1]
    assert (x, difference) == (2.0, -0.5) and -0.75 < low < -0.5 < high < -0.25
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "## overall: score minus base's (paired by item)" in text
    assert "| other | +0.00 [+0.00, +0.00] ~ | -0.50 [" in text


def test_pairing_needs_the_same_items(tmp_path):
    a = _report(tmp_path / "a", [1.0, 0.0])
    b = _report(tmp_path / "b", [1.0, 0.0], ids=["x", "y"])
    with pytest.raises(ValueError, match="evaluated on different items"):
        compare(CompareConfig(reports=[f"a:1={a}", f"b:1={b}"], out=str(tmp_path / "out"), paired_with="a",
                              metrics=["overall:speech"]))
    with pytest.raises(ValueError, match="paired_with='c' is none of the runs"):
        compare(CompareConfig(reports=[f"a:1={a}"], out=str(tmp_path / "out"), paired_with="c",
                              metrics=["overall:speech"]))


def test_bad_entries_are_named_before_anything_is_read(tmp_path, capsys):
    assert main(["compare", "run:last=somewhere", "--out", str(tmp_path / "out")]) == 2
    assert "reports: 'run:last=somewhere': X must be a number (an epoch or a step), got 'last'" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="each metric is CATEGORY:NAME"):
        CompareConfig(reports=["run:1=x"], metrics=["speech"])
    with pytest.raises(FileNotFoundError, match="report.json not found"):
        compare(CompareConfig(reports=[f"run:1={tmp_path / 'missing'}"], out=str(tmp_path / "out")))
