"""What `pip install desta` gets: the wheel built from the repository holds the package data commands read."""

import subprocess
import sys
import zipfile
from pathlib import Path

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
