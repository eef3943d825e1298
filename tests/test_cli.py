import importlib
import re
import subprocess
import sys

import pytest

from desta.cli import COMMANDS, main
from desta.core.args import ConfigError, parse_command, setting_docs
from desta.train.config import TrainConfig


def _config_class(command):
    module, name = command.config.split(":")
    return getattr(importlib.import_module(module), name)


def test_help_lists_every_command_once_under_its_group():
    from desta.cli import GROUPS

    out = subprocess.run([sys.executable, "-m", "desta.cli", "--help"], capture_output=True, text=True, check=True)
    headers, group_of, group = [], {}, None
    for line in out.stdout.splitlines():
        if line.endswith(":") and line[:-1] in GROUPS:
            group = line[:-1]
            headers.append(group)
        elif line.startswith("  ") and group:
            assert line.split()[0] not in group_of, f"{line.split()[0]} listed twice"
            group_of[line.split()[0]] = group
    assert headers == ["the pipeline", "use a model", "text post-training", "tools"]
    assert sorted(group_of) == sorted(c.name for c in COMMANDS)
    pipeline = [c for c in group_of if group_of[c] == "the pipeline"]
    assert pipeline[:5] == ["demo", "describe", "probe", "targets", "train"] and pipeline[-1] == "export"
    assert {c for c in group_of if group_of[c] == "use a model"} == {"chat", "serve", "app"}
    assert {group_of["posttrain"], group_of["magpie"], group_of["tts"]} == {"text post-training", "tools"}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_setting_of_every_command_is_documented(command):
    docs = setting_docs(_config_class(command))
    assert docs and [name for name, doc in docs.items() if not doc] == []


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        parse_command(_config_class(command), ["--help"], prog=f"desta {command.name}")
    assert done.value.code == 0 and f"usage: desta {command.name}" in capsys.readouterr().out


def test_one_mechanism_yaml_overrides_and_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: runs/x\ndata: {train: data/t}\noptim: {lr: 1.0e-3, batch_size: 4}\n")
    config = parse_command(TrainConfig, [str(path), "optim.lr=3e-4", "--optim.batch-size", "8", "--no-resume",
                                         "--model.tapped_layers", "0,2"])
    assert (config.optim.lr, config.optim.batch_size, config.resume, config.model.tapped_layers) == (3e-4, 8, False,
                                                                                                     [0, 2])
    assert config.data.train == "data/t" and config.output_dir == "runs/x" and config.optim.warmup_steps == 2000


def test_every_problem_is_reported_at_once_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError) as caught:
        parse_command(TrainConfig, ["optim.learning_rate=1", "optim.max_steps=0", "data.eval_fraction=1.5",
                                    "model.dtype=float8", "optim.precision=fp8"])
    problems = caught.value.problems
    assert "unknown key 'optim.learning_rate'; did you mean 'optim.lr'?" in problems
    assert any(p.startswith("model.dtype: expected one of ['") and "got 'float8'" in p for p in problems)
    assert any(p.startswith("optim.precision: expected one of") for p in problems)
    assert "data.train: required: the targets dataset folder (OUT/dataset of desta targets)" in problems
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim: {lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: not valid YAML"):
        parse_command(TrainConfig, [str(bad_yaml)])


def test_command_line_errors_name_the_setting(capsys):
    assert main(["train", "optim.lr=-1", "data.train=x"]) == 2
    assert "optim.lr: must be positive, got -1.0" in capsys.readouterr().err
    assert main(["evaluate"]) == 2
    assert "unknown command 'evaluate'; did you mean 'eval'?" in capsys.readouterr().err


def test_demo_runs_the_whole_pipeline_at_minimal_size(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--minimal"]) == 0
    captured = capsys.readouterr()
    printed, bars = captured.out, captured.err
    for stage in ("[1/7] synth", "[2/7] describe", "[3/7] targets", "[4/7] train", "[5/7] eval", "[6/7] export",
                  "[7/7] report"):
        assert stage in printed
    # every long stage shows its progress: rows or steps done of all, and the time left
    for bar in ("synth: 100%|", "describe shard 0/1: 100%|", "Whisper ASR check", "targets shard 0/1: 100%|",
                "train (steps): 100%|", "speech model: 100%|", "text reference: 100%|"):
        assert bar in bars, bar
    assert re.search(r"^step 2/4 \(50%\): loss \d+\.\d{3}, .* elapsed, ETA \d+ s$", printed, re.M)
    listed = printed[printed.index("the outputs:"):]
    for output in ("corpus/train/manifest.jsonl", "described/dataset", "targets/dataset", "train/loss_curve.png",
                   "eval/report.md", "export", "report.html"):
        assert str(tmp_path / output) in listed, output
    report = (tmp_path / "report.md").read_text()
    assert "| train clips | 16 | 16 | 0 |" in report and "![loss curve](train/loss_curve.png)" in report
    assert ("| category | n | speech model | text-ASR (Whisper transcript) | text-gold (gold transcript) | "
            "forgetting vs text-ASR (connector) | forgetting vs text-gold |") in report
    html = (tmp_path / "report.html").read_text()
    for image in ("train/loss_curve.png", "eval/scores.png"):
        assert f'src="{image}"' in html and (tmp_path / image).stat().st_size > 5000
    assert (tmp_path / "export" / "model.safetensors").exists() and (tmp_path / "export" / "README.md").exists()


def test_tts_writes_a_wav(tmp_path):
    import soundfile as sf

    assert main(["tts", "Testing one two three.", "--out", str(tmp_path / "t.wav"), "--accent", "Scottish"]) == 0
    data, rate = sf.read(tmp_path / "t.wav")
    assert rate == 16000 and len(data) > 8000


def test_type_and_range_errors_are_reported_in_one_pass():
    """Range errors (a dataclass's own checks) used to appear only once the type errors were fixed."""
    with pytest.raises(ConfigError) as caught:
        parse_command(TrainConfig, ["data.train=x", "optim.lr=abc", "optim.max_steps=0", "data.eval_fraction=2",
                                    "data.max_length=zero"])
    problems = caught.value.problems
    assert "optim.lr: expected float, got 'abc'" in problems
    assert "optim.max_steps: must be -1 (run `epochs`) or at least 1, got 0" in problems
    assert "data.eval_fraction: is the share of clips held out, in [0, 1); got 2.0" in problems
    assert "data.max_length: expected int, got 'zero'" in problems and len(problems) == 4


def test_missing_local_paths_are_found_before_anything_loads(tmp_path, monkeypatch, capsys):
    """`model.llm=/nonexistent` said "Repo id must be in the form", `model.encoder=models/nope` retried the Hub for
    30 s, `--source nope.jsonl` "couldn't reach on the Hub": each is now a setting problem, with the others."""
    from desta.describe import DescribeConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ConfigError) as caught:
        parse_command(TrainConfig, ["data.train=x", "model.llm=/nonexistent", "model.encoder=models/nope",
                                    "optim.max_steps=0", "model.init_from=./run/ckpt", "output_dir=./new/run"])
    problems = caught.value.problems
    assert "model.llm: '/nonexistent' not found; give an existing file or folder" in problems
    assert any(p.startswith(f"model.encoder: 'models/nope' not found (from {tmp_path})") for p in problems)
    assert any(p.startswith("model.init_from: './run/ckpt' not found") for p in problems)
    assert "optim.max_steps: must be -1 (run `epochs`) or at least 1, got 0" in problems and len(problems) == 4
    with pytest.raises(ConfigError, match=r"source: 'nope.jsonl' not found"):
        parse_command(DescribeConfig, ["--source", "nope.jsonl", "--out", "described"])
    assert main(["chat", "ckpt", "--audio", "missing.wav", "Who speaks?"]) == 2
    assert "audio[0]: 'missing.wav' not found" in capsys.readouterr().err
    assert parse_command(TrainConfig, ["data.train=x", "model.llm=HuggingFaceTB/SmolLM2-135M-Instruct"])  # a Hub id


def test_a_missing_manifest_is_not_looked_for_on_the_hub(tmp_path, monkeypatch):
    """From Python (no command line to check it first) too: the Hub's "couldn't reach" was all one learnt."""
    from desta.describe.sources import open_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="source nope.jsonl not found; give a .jsonl/.csv manifest"):
        open_source("nope.jsonl", {})


def test_cache_features_help_says_what_it_does(capsys):
    from desta.cli import usage

    listed = next(line for line in usage().splitlines() if line.strip().startswith("cache-features"))
    assert "features" in listed and "Train the connector" not in listed  # it showed train's description
    with pytest.raises(SystemExit):
        main(["cache-features", "--help"])
    assert "Compute the frozen Whisper encoder's features" in capsys.readouterr().out


QUIET = """
import sys
import desta
from desta.audio import load_audio
from desta.cli import main
model, processor = desta.load(sys.argv[1])
model.chat(processor, processor.conversation("Who?"), [load_audio(sys.argv[2])], max_new_tokens=2)
sys.stderr.write("=== command line\\n")
sys.exit(main(["chat", sys.argv[1], "--audio", sys.argv[2], "Who?", "--max-new-tokens", "2"]))
"""


def test_only_desta_speaks_unless_asked(checkpoint, tmp_path):
    """A Python chat call printed three transformers warnings (two limits on Whisper's length, a generation config
    "together with" arguments, "a model of type desta"); a command showed "Loading weights" bars."""
    import soundfile as sf

    from desta.audio.tts import synthesize

    sf.write(tmp_path / "a.wav", synthesize("Where is the station?"), 16000)
    result = subprocess.run([sys.executable, "-c", QUIET, str(checkpoint), str(tmp_path / "a.wav")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    python, command = result.stderr.split("=== command line\n")
    assert "[transformers]" not in python and "model of type" not in python, python
    assert command == "", command  # no library warnings, no "Loading weights" bars
    assert result.stdout.strip()  # the answer
