"""What `pip install desta` gets: the wheel built from the repository holds the package data commands read."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_corpus_mappings(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("desta-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {Path(n).name for n in names if n.startswith("desta/describe/mappings/")}
    assert {p.name for p in (ROOT / "desta" / "describe" / "mappings").iterdir()} <= shipped
    assert {"vctk.yaml", "synthetic.yaml", "README.md"} <= shipped
    assert not [n for n in names if n.startswith(("tests/", "bench/", "recipes/", "tools/"))]


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_core_install_leaves_each_extra_out_and_dev_brings_them_all():
    from desta.core.extras import EXTRAS

    project = _pyproject()
    extras = project["optional-dependencies"]
    core = " ".join(project["dependencies"]).lower()
    assert set(EXTRAS) <= set(extras)
    assert [p for name in EXTRAS for p in extras[name] if p.split(">")[0].split("=")[0].lower() in core] == []
    assert extras["all"] == [f"desta[{','.join(EXTRAS)}]"] and "desta[all]" in extras["dev"]
    assert "version" in project["dynamic"] and "version" not in project  # desta.__version__ is the one place


# What a core install (no extras) cannot import: every module of every extra.
BLOCK_EXTRAS = """
import sys
from desta.core.extras import EXTRAS
sys.modules.update({m: None for modules in EXTRAS.values() for m in modules})
from desta.cli import main
for argv in ARGVS:
    try:
        rc = main(argv)
    except SystemExit as exit:  # --help, as argparse ends it
        rc = exit.code
    print("rc", rc, flush=True)
"""


@pytest.mark.slow  # a subprocess that imports torch and transformers: about 9 s on a 2-core CPU
def test_a_core_install_runs_the_demo_and_describe_and_names_each_missing_extra():
    argvs = [["demo", "--help"], ["describe", "--help"], ["app"], ["serve", "ckpt"]]
    done = subprocess.run([sys.executable, "-c", BLOCK_EXTRAS.replace("ARGVS", repr(argvs))], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert [line for line in done.stdout.splitlines() if line.startswith("rc ")] == ["rc 0"] * 2 + ["rc 2"] * 2
    assert "usage: desta demo" in done.stdout and "usage: desta describe" in done.stdout
    assert ("desta app: error: this command needs the 'app' extra (gradio not installed): pip install 'desta[app]'"
            in done.stderr)
    assert "desta serve: error: this command needs the 'serve' extra" in done.stderr
    assert "Traceback" not in done.stderr


def test_desta_help_names_the_install_of_a_command_whose_extra_is_missing(monkeypatch):
    from desta.cli import COMMANDS, _help_line

    monkeypatch.setitem(sys.modules, "gradio", None)
    lines = {c.name: _help_line(c) for c in COMMANDS if c.name in ("app", "chat")}
    assert lines["app"] == "(not installed: pip install 'desta[app]')" and lines["chat"].startswith("Talk to")


def test_a_strategy_that_trains_with_trl_names_the_posttrain_extra_when_trl_is_missing(monkeypatch):
    from desta.core.args import ConfigError, build
    from desta.posttrain import PostTrainConfig

    monkeypatch.setitem(sys.modules, "trl", None)
    build(PostTrainConfig, {"model": "m", "strategies": ["sft", "lora+replay"]})  # the core is enough for these
    with pytest.raises(ConfigError) as err:
        build(PostTrainConfig, {"model": "m", "strategies": ["sft", "rl"]})
    assert ("strategies: rl trains with trl's GRPOConfig, and trl is not installed: pip install 'desta[posttrain]'"
            in err.value.problems)


def test_a_lhotse_corpus_names_the_lhotse_extra_when_lhotse_is_missing(monkeypatch, tmp_path):
    from desta.core.extras import MissingExtra
    from desta.describe.sources import _lhotse_cuts

    monkeypatch.setitem(sys.modules, "lhotse", None)
    with pytest.raises(MissingExtra, match=r"lhotse corpus .* \(lhotse not installed\): pip install 'desta\[lhotse\]'"):
        _lhotse_cuts(tmp_path / "cuts.jsonl.gz", "dev-clean")
