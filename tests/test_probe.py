"""desta probe: which description fields the audio carries, on synthetic features and end to end."""

import json

import numpy as np
import pytest

from desta.cli import main
from desta.describe.probe import ProbeConfig, probe_field
from desta.model.tiny import save_tiny_bases
from tests.conftest import described_dataset


def test_a_learnable_field_is_carried_and_a_noise_field_is_flagged():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(120, 16))
    gender = ["Female" if f > 0 else "Male" for f in features[:, 3] + 0.3 * rng.normal(size=120)]
    noise = [str(v) for v in rng.integers(0, 3, 120)]  # a corpus label unrelated to the features
    learnable, unrelated = probe_field(features, gender, folds=4), probe_field(features, noise, folds=4)
    assert learnable["carried"] and learnable["probe"]["value"] > 0.8 > learnable["majority"]["value"]
    assert learnable["gain"]["ci"][0] > 0
    assert not unrelated["carried"] and unrelated["gain"]["ci"][0] <= 0 <= unrelated["gain"]["ci"][1] + 0.1
    assert learnable["values"] == ["Female", "Male"] and learnable["clips"] == 120


def test_desta_probe_writes_a_report_per_field(tmp_path):
    described = described_dataset(tmp_path / "d", num_clips=12, seed=2)
    whisper, _ = save_tiny_bases(tmp_path / "bases")
    out = tmp_path / "probe"
    assert main(["probe", str(described), "--encoder", str(whisper), "--out", str(out), "--folds", "2",
                 "--no-progress"]) == 0
    result = json.loads((out / "probe.json").read_text())
    probed = [f for f, row in result["fields"].items() if "probe" in row]
    assert "gender" in probed and result["clips"] == 12 and result["tapped_layers"] == [0, 1, 2, 3]
    assert set(result["flagged"]) <= set(result["fields"])
    assert not set(result["flagged"]) & set(result["describe_attributes"])
    markdown = (out / "probe.md").read_text()
    assert "| gender |" in markdown
    # the command that leaves fields out is offered only when a field is flagged
    assert ("attributes=" in markdown) == bool(result["flagged"])
    assert ("Flagged: none" in markdown) == (not result["flagged"])
    assert (out / "probe.png").stat().st_size > 5000


def test_probe_settings_are_checked():
    with pytest.raises(Exception, match="fields: unknown \\['colour'\\]"):
        ProbeConfig(source="x", encoder="y", out="z", fields=["colour"])
    with pytest.raises(Exception, match="folds: must be at least 2"):
        ProbeConfig(source="x", encoder="y", out="z", folds=1)


def test_a_held_out_corpus_is_scored_apart_for_seen_and_unseen_voices(tmp_path):
    from datasets import load_from_disk

    described = described_dataset(tmp_path / "d", num_clips=12, seed=2)
    held = described_dataset(tmp_path / "h", num_clips=6, seed=5)
    trained = set(load_from_disk(str(described))["voice"])
    whisper, _ = save_tiny_bases(tmp_path / "bases")
    out = tmp_path / "probe"
    assert main(["probe", str(described), "--encoder", str(whisper), "--out", str(out), "--folds", "2",
                 "--heldout", str(held), "--no-progress"]) == 0
    result = json.loads((out / "probe.json").read_text())
    voices = load_from_disk(str(held))["voice"]
    assert result["heldout"]["seen voices"] == sum(v in trained for v in voices)
    assert result["heldout"]["unseen voices"] == sum(v not in trained for v in voices)
    gender = result["fields"]["gender"]["heldout"]
    assert sum(group["clips"] for group in gender.values()) == len(voices)
    assert "## Voices never trained on" in (out / "probe.md").read_text()
