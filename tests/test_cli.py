import subprocess
import sys

from desta.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "desta.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "synth", "describe", "targets", "train", "cache-features", "eval-set", "eval", "export",
                    "chat", "serve", "tts"):
        assert command in out.stdout


def test_demo_runs_the_whole_pipeline_at_minimal_size(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--minimal"]) == 0
    printed = capsys.readouterr().out
    for stage in ("[1/7] synth", "[2/7] describe", "[3/7] targets", "[4/7] train", "[5/7] eval", "[6/7] export",
                  "[7/7] report"):
        assert stage in printed
    report = (tmp_path / "report.md").read_text()
    assert "| train clips | 16 | 16 | 0 |" in report and "![loss curve](train/loss_curve.png)" in report
    assert "| category | speech model | text reference | forgetting |" in report
    html = (tmp_path / "report.html").read_text()
    for image in ("train/loss_curve.png", "eval/scores.png"):
        assert f'src="{image}"' in html and (tmp_path / image).stat().st_size > 5000
    assert (tmp_path / "export" / "model.safetensors").exists() and (tmp_path / "export" / "README.md").exists()


def test_tts_writes_a_wav(tmp_path):
    import soundfile as sf

    assert main(["tts", "Testing one two three.", "--out", str(tmp_path / "t.wav"), "--accent", "Scottish"]) == 0
    data, rate = sf.read(tmp_path / "t.wav")
    assert rate == 16000 and len(data) > 8000
