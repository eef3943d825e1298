"""A resume goes on with the settings the run was trained with, or is refused: never a silent mix."""

import shutil

import pytest
import yaml

from desta.core.args import load_config
from desta.train.config import TrainConfig
from desta.train.run import train
from tests.conftest import StopAfter, described_dataset, label_targets

BASE = ["optim.warmup_steps=2", "optim.batch_size=4", "optim.lr=3e-3", "log.logging_steps=1", "log.report_to=none",
        "data.eval_fraction=0", "optim.max_steps=4", "log.save_steps=2"]


@pytest.fixture(scope="module")
def targets_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume-data")
    return label_targets(described_dataset(folder, num_clips=8, seed=5), folder / "targets")


def _config(targets_dir, out, *overrides):
    return load_config(TrainConfig, None, [f"output_dir={out}", f"data.train={targets_dir}", *BASE, *overrides])


@pytest.fixture(scope="module")
def interrupted(targets_dir, tmp_path_factory):
    """A run stopped after step 2 of 4, with its checkpoint."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    train(_config(targets_dir, out), callbacks=[StopAfter(2)])
    return out


def test_a_resume_with_another_learning_rate_is_refused_and_nothing_is_recorded(interrupted, targets_dir, tmp_path):
    """Rerunning a killed run with optim.lr=0.01 trained on at the recorded 3e-3 while run_config.yaml said 0.01."""
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)  # a moved run folder resumes: output_dir may differ
    recorded = (out / "run_config.yaml").read_text()
    for flag in ([], ["resume_with_changes=true"]):
        with pytest.raises(ValueError, match=r"was trained with other settings than these \(optim.lr: 0.003 -> 0.01; "
                                             r"optim.warmup_steps: 2 -> 3\); .*use a new output_dir"):
            train(_config(targets_dir, out, "optim.lr=0.01", "optim.warmup_steps=3", *flag))
    assert (out / "run_config.yaml").read_text() == recorded
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_longer_run_resumes_only_when_told_and_says_from_where(interrupted, targets_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    with pytest.raises(ValueError, match=r"optim.max_steps: 4 -> 5\); .*give --resume-with-changes"):
        train(_config(targets_dir, out, "optim.max_steps=5"))
    summary = train(_config(targets_dir, out, "optim.max_steps=5", "resume_with_changes=true", "log.progress=false"))
    assert "desta train: resuming from checkpoint-2; optim.max_steps: 4 -> 5" in capsys.readouterr().out
    assert summary["steps"] == 5 and summary["resumed_from"].endswith("checkpoint-2")
    assert yaml.safe_load((out / "run_config.yaml").read_text())["optim"]["max_steps"] == 5  # what it now runs to
