"""Public benchmarks, each read from its published file layout and scored by its authors' rule.

One module per benchmark, each defining one `Benchmark` record (base.py) that holds everything desta needs
of it: Speech-IFEval (JSONL + audios/), VoiceBench (parquet per config and split, audio embedded),
AIR-Bench Foundation (Foundation_meta.json + per-task audio folders) and MMAU test-mini
(mmau-test-mini.json + test-mini-audios/). Sources are local folders or Hub ids (fetched with
huggingface_hub). Rule-based scorers are re-implemented from the authors' evaluation code (none of the
benchmarks ships a package); the rest need an LLM judge. Items a loader cannot use (missing audio, a gold
answer that is none of the choices) come back as rejects with the reason.
"""

from __future__ import annotations

from desta.evaluation.benchmarks.air_bench import AIR_BENCH
from desta.evaluation.benchmarks.base import Benchmark
from desta.evaluation.benchmarks.mmau import MMAU
from desta.evaluation.benchmarks.speech_ifeval import SPEECH_IFEVAL
from desta.evaluation.benchmarks.voicebench import VOICEBENCH

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (SPEECH_IFEVAL, VOICEBENCH, AIR_BENCH, MMAU)}


def benchmark(name: str) -> Benchmark:
    """A benchmark by name; an unknown name is refused with the known ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_benchmark(name: str, source: str, subsets: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """A benchmark's items and rejects, read from `source` (a folder or a Hub id) in its published layout."""
    return benchmark(name).load(source, subsets)
