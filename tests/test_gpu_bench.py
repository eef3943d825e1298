"""bench/gpu.py end to end on tiny shapes: every code path of the GPU run (checks, the five training modes, the
batch search, each generation setting) and its JSON line, on a CPU; on a GPU too where there is one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"batch 16", "batch 64", "batch 256", "token budget (default)", "static cache, token budget"}


def _run(device: str) -> dict:
    result = subprocess.run([sys.executable, "bench/gpu.py", "--device", device, "--small", "--time-budget", "900"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped" not in result.stdout  # every part ran
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check(line: dict, tolerance: float) -> None:
    assert line["bench"] == "gpu" and line["shapes"] == "small" and line["batch"] == 4
    assert max(line["checks"].values()) <= tolerance  # response-only logits and packing change no loss
    train = line["train"]
    assert set(train) == {"padded", "real", "logits", "checkpointing", "packing"}
    assert all(r["samples_per_s"] > 0 and r["tflop_per_step"] > 0 and r["mfu_vs_matmul"] > 0 for r in train.values())
    assert train["logits"]["tflop_per_step"] < train["real"]["tflop_per_step"]  # the head projects responses only
    assert train["checkpointing"]["tflop_per_step"] > train["logits"]["tflop_per_step"]  # the layers run twice
    assert train["packing"]["padding_share"] < train["logits"]["padding_share"]
    assert train["packing"]["rows"] < train["logits"]["rows"] == 4
    assert line["largest_batch"]["batch"] == 6
    assert set(line["generation"]) == SETTINGS
    assert all(r["tokens_per_s"] > 0 for r in line["generation"].values())


def test_gpu_bench_runs_every_part_on_tiny_shapes_on_a_cpu():
    line = _run("cpu")
    _check(line, tolerance=1e-4)
    assert line["nominal_peak_tflops"] is None and line["train"]["logits"]["peak_gib"] is None


@pytest.mark.gpu
def test_gpu_bench_runs_every_part_on_tiny_shapes_on_a_gpu():
    line = _run("cuda")
    _check(line, tolerance=2e-2)
    assert line["train"]["logits"]["peak_gib"] > 0
