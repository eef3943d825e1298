import subprocess
import sys

from desta.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "desta.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "tts" in out.stdout


def test_demo_answers_a_spoken_question(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "Whisper heard:" in printed and "answer:" in printed
    assert (tmp_path / "question.wav").stat().st_size > 1000


def test_tts_writes_a_wav(tmp_path):
    import soundfile as sf

    assert main(["tts", "Testing one two three.", "--out", str(tmp_path / "t.wav"), "--accent", "Scottish"]) == 0
    data, rate = sf.read(tmp_path / "t.wav")
    assert rate == 16000 and len(data) > 8000
