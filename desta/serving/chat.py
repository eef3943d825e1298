"""`desta chat`: talk to a checkpoint from the shell, one question streamed or a JSONL file of them.

Reads a checkpoint (or exported folder), audio files and an instruction; or `batch`, a JSONL file
whose rows hold `audio` (a path or a list, relative to the file) and `instruction`. Writes the
streamed answer to stdout, or BATCH.answers.jsonl (each row with its `answer`, or its `error`; the
command exits 1 when any row has one). A clip over max_audio_seconds is refused, naming its length.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from desta.audio import SAMPLE_RATE, AudioError, load_audio
from desta.core.args import raise_problems
from desta.core.generation import SamplingSettings
from desta.core.summary import Summary
from desta.prompts import system_prompt_setting
from desta.serving.engine import MAX_AUDIO_SECONDS

if TYPE_CHECKING:
    from desta.model.modeling import DestaModel
    from desta.model.processing import DestaProcessor


@dataclass
class ChatConfig:
    """Talk to a checkpoint: audio files and an instruction in, the answer streamed out (or a batch file)."""

    POSITIONAL = ("checkpoint", "instruction")
    checkpoint: str
    """checkpoint or exported folder"""
    instruction: str | None = None
    """what to ask"""
    audio: list[str] = field(default_factory=list)
    """audio file(s), in the order the model hears them"""
    system: str | None = None
    """system prompt; null: the one the model was trained with"""
    batch: str | None = None
    """JSONL with audio (path or list) and instruction per row"""
    out: str | None = None
    """with batch: where to write the answers (default BATCH.answers.jsonl)"""
    batch_size: int = 8
    """rows per generate call (batch mode)"""
    max_new_tokens: int = 256
    """answer length limit"""
    temperature: float = 0.0
    """0: greedy"""
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    """longest clip, seconds: a longer one is refused before the model loads (a batch row gets an error)"""

    def __post_init__(self) -> None:
        problems = []
        if not self.instruction and not self.batch:
            problems.append(("instruction", "give an instruction (or batch=FILE.jsonl)"))
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.temperature < 0:
            problems.append(("batch_size", "batch_size and max_new_tokens must be at least 1, temperature 0 or more"))
        if not self.max_audio_seconds > 0:
            problems.append(("max_audio_seconds", f"must be positive, got {self.max_audio_seconds}"))
        raise_problems(problems)


def load_clip(path: str | Path, max_seconds: float) -> np.ndarray:
    """A clip at 16 kHz, refused (AudioError naming its length and the limit) when longer than `max_seconds`."""
    samples = load_audio(path)
    seconds = len(samples) / SAMPLE_RATE
    if seconds > max_seconds:
        raise AudioError(f"{path}: the clip is {seconds:.1f} s long; desta chat takes at most {max_seconds:g} s "
                         "(max_audio_seconds): cut it, or raise the limit")
    return samples


def answer_batch(model: DestaModel, processor: DestaProcessor, path: Path, out: Path, batch_size: int,
                 max_new_tokens: int, max_audio_seconds: float = MAX_AUDIO_SECONDS) -> dict[str, int]:
    """Answer every row of a JSONL file; a row with an unreadable or too long clip or no instruction keeps its
    error."""
    lines = path.read_text().splitlines()
    results: list[dict[str, Any]] = []
    ready = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            results.append({"line": number, "error": f"malformed JSON: {err.msg}"})
            continue
        if not isinstance(row, dict):
            results.append({"line": number, "error": "not a JSON object"})
            continue
        paths = row.get("audio") or []
        paths = [paths] if isinstance(paths, str) else paths
        try:
            clips = [load_clip(p if Path(p).is_absolute() else path.parent / p, max_audio_seconds) for p in paths]
        except AudioError as err:
            results.append({**row, "error": str(err)})
            continue
        if not row.get("instruction"):
            results.append({**row, "error": "no instruction"})
            continue
        results.append(row)
        ready.append((len(results) - 1, processor.conversation(row["instruction"], clips=len(clips)), clips))
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        answers = model.chat(processor, [c for _, c, _ in chunk], [a for _, _, a in chunk],
                             max_new_tokens=max_new_tokens, do_sample=False)
        for (index, _, _), answer in zip(chunk, answers, strict=True):
            results[index] = {**results[index], "answer": answer}
    out.write_text("".join(json.dumps(r) + "\n" for r in results))
    failed = sum("error" in r for r in results)
    return {"rows": len(results), "answered": len(results) - failed, "failed": failed}


def chat(config: ChatConfig, stream: TextIO | None = None) -> Summary:
    """Answer the instruction (streamed to `stream`, stdout by default) or the batch file."""
    from desta.model.loading import load
    from desta.serving.engine import DestaEngine

    clips = [load_clip(p, config.max_audio_seconds) for p in config.audio]  # before the model loads
    model, processor = load(config.checkpoint, system_prompt=system_prompt_setting(config.system))
    if config.batch:
        out = Path(config.out or Path(config.batch).with_suffix(".answers.jsonl"))
        counts = answer_batch(model, processor, Path(config.batch), out, config.batch_size, config.max_new_tokens,
                              config.max_audio_seconds)
        return Summary({**counts, "out": str(out)}, f"answered {counts['answered']} of {counts['rows']} rows "
                                                    f"({counts['failed']} with errors) -> {out}",
                       failed=bool(counts["failed"]))
    engine = DestaEngine(model, processor, config.checkpoint)
    settings = SamplingSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    stream = stream or sys.stdout
    pieces = []
    for piece in engine.stream(processor.conversation(config.instruction, clips=len(clips)), clips, settings):
        pieces.append(piece)
        stream.write(piece)
        stream.flush()
    stream.write("\n")
    return Summary({"answer": "".join(pieces)})  # already streamed: nothing more to print
