"""bench/gpu.py end to end on tiny shapes: every code path of the GPU run (checks, the five training modes, the
batch search, each generation setting) and its JSON line, on a CPU; on a GPU too where there is one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"batch 16", "batch 64", "batch 256", "token budget (default)", "static cache, token budget",
            "continuous batching"}


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
    # the useful work (desta plan's FLOPs per sample at real length) is the same whatever the mode executes
    assert len({r["model_tflop_per_step"] for r in train.values()}) == 1
    assert all(r["model_tflop_per_step"] < r["tflop_per_step"] for r in train.values())  # padding, recompute
    assert train["padded"]["tflop_per_step"] > train["real"]["tflop_per_step"]  # 30 s windows: more executed
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
    assert line["train"]["logits"]["mfu"] is None  # no peak to divide by on a CPU


def test_mfu_divides_by_the_peak_of_the_card_the_device_name_says(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    peaks = {"NVIDIA H100 PCIe": 756e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A10": 125e12, "NVIDIA B200": None}
    assert {name: bench.peak_of(name) for name in peaks} == peaks
    result = {"model_tflops": 400.0, "achieved_tflops": 500.0}
    assert bench.mfu(result, matmul=800.0, peak=756e12) == pytest.approx(
        {"mfu": 400 / 756, "executed_utilization": 500 / 756, "mfu_vs_matmul": 0.5, "executed_vs_matmul": 0.625})


@pytest.mark.gpu
def test_gpu_bench_runs_every_part_on_tiny_shapes_on_a_gpu():
    line = _run("cuda")
    _check(line, tolerance=2e-2)
    assert line["train"]["logits"]["peak_gib"] > 0
