"""The built-in synthetic corpus: sentences spoken by espeak-ng with known voice labels.

Writes DIR/audio/<id>.wav (16 kHz, 16-bit) and DIR/manifest.jsonl with one row per clip:
path, id, transcript, gender, accent, emotion and the voice settings (rate, pitch, volume).
Row i depends only on (seed, i), so any shard or resumed run gives the same rows.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from desta.audio import SAMPLE_RATE
from desta.audio.tts import ACCENTS, VOICES, Voice, synthesize
from desta.core.args import raise_problems
from desta.core.artifacts import MANIFEST

_SUBJECTS = ["The old fisherman", "My younger sister", "A tired student", "The new manager", "Our neighbour",
             "The little boy", "A famous singer", "The taxi driver", "Her best friend", "The science teacher",
             "A quiet librarian", "The hungry cat", "My grandfather", "The young doctor", "A group of tourists"]
_VERBS = ["painted", "forgot", "carried", "found", "cleaned", "repaired", "ordered", "borrowed", "described",
          "photographed", "delivered", "recommended", "discovered", "sold", "wrapped"]
_OBJECTS = ["a red bicycle", "the wooden table", "three fresh loaves", "an old map", "the broken window",
            "a letter from Paris", "the yellow umbrella", "some warm soup", "a tiny silver key", "the garden fence",
            "two concert tickets", "a heavy suitcase", "the evening newspaper", "a box of apples", "the blue kettle"]
_PLACES = ["before breakfast", "near the station", "on a rainy Tuesday", "after the meeting", "in the city centre",
           "behind the library", "during the holiday", "at the market", "by the river", "late last night",
           "in the kitchen", "outside the museum", "on the way home", "at the weekend", "in the morning"]
_QUESTIONS = ["Did you see {o} {p}?", "Where is {o} now?", "Could you bring {o} {p}, please?",
              "Why did {s} take {o}?", "Have you ever seen {o}?"]
# Voice settings per label: rate in words per minute, pitch on espeak-ng's 0-100 scale, volume 0-200.
RATES = {"Slow": (105, 125), "Normal": (160, 185), "Fast": (245, 275)}
PITCHES = {"Low": (10, 25), "Normal": (45, 55), "High": (80, 95)}
VOLUMES = {"Low": (30, 45), "Normal": (90, 110), "High": (180, 200)}


@dataclass
class SynthRow:
    """One synthesized clip's manifest row: its text, the voice settings used and the labels they stand for."""

    id: str
    path: str  # relative to the manifest
    transcript: str
    gender: str
    accent: str
    emotion: str
    voice: str  # espeak-ng variant
    rate_wpm: int
    pitch_setting: int
    volume_setting: int
    speed_label: str  # the band the rate was drawn from
    pitch_label: str
    volume_label: str


def sentence(rng: np.random.Generator) -> str:
    """A varied English sentence (15 x 15 x 15 x 15 statements plus questions)."""
    s, v, o, p = (rng.choice(words) for words in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES))
    if rng.random() < 0.2:
        return str(rng.choice(_QUESTIONS)).format(s=s.lower(), o=o, p=p)
    return f"{s} {v} {o} {p}."


def row_for(index: int, seed: int) -> SynthRow:
    """The labels of clip `index`: a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    gender = str(rng.choice(sorted(VOICES)))
    speed, pitch, volume = (str(rng.choice(list(bands))) for bands in (RATES, PITCHES, VOLUMES))
    return SynthRow(
        id=f"synth-{seed}-{index:06d}", path=f"audio/synth-{seed}-{index:06d}.wav", transcript=sentence(rng),
        gender=gender, accent=str(rng.choice(sorted(ACCENTS))), emotion="Neutral",
        voice=str(rng.choice(VOICES[gender])), rate_wpm=int(rng.integers(*RATES[speed], endpoint=True)),
        pitch_setting=int(rng.integers(*PITCHES[pitch], endpoint=True)),
        volume_setting=int(rng.integers(*VOLUMES[volume], endpoint=True)),
        speed_label=speed, pitch_label=pitch, volume_label=volume,
    )


def _render(job: tuple[SynthRow, str]) -> str:
    import soundfile as sf

    row, out = job
    target = Path(out) / row.path
    if not target.exists():
        voice = Voice(accent=row.accent, variant=row.voice, rate=row.rate_wpm, pitch=row.pitch_setting,
                      volume=row.volume_setting)
        samples = synthesize(row.transcript, voice)
        tmp = target.with_suffix(".tmp.wav")
        sf.write(tmp, samples, SAMPLE_RATE, subtype="PCM_16")
        os.replace(tmp, target)  # atomic: a killed run never leaves a half-written clip behind
    return row.id


def synth_corpus(out: str | os.PathLike, num_clips: int = 1000, seed: int = 0, num_proc: int = 1,
                 progress: bool = True) -> Path:
    """Write `num_clips` clips and their manifest; clips already on disk are kept. Returns the manifest path."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be at least 1, got {num_clips}")
    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rows = [row_for(i, seed) for i in range(num_clips)]
    jobs = [(row, str(out)) for row in rows]
    bar = tqdm(total=num_clips, desc="synth", unit="clip", disable=not progress)
    if num_proc > 1:
        with ProcessPoolExecutor(num_proc) as pool:
            for _ in pool.map(_render, jobs, chunksize=16):
                bar.update()
    else:
        for job in jobs:
            _render(job)
            bar.update()
    bar.close()
    manifest = out / MANIFEST
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(row)) + "\n" for row in rows))
    os.replace(tmp, manifest)
    return manifest


@dataclass
class SynthConfig:
    """Write the synthetic espeak-ng corpus: WAV clips and a manifest with their labels."""

    out: str
    """output folder (audio/ and manifest.jsonl)"""
    num_clips: int = 1000
    """how many clips"""
    seed: int = 0
    """labels and sentences depend only on (seed, clip index)"""
    num_proc: int = 1
    """worker processes"""

    def __post_init__(self) -> None:
        if self.num_clips < 1 or self.num_proc < 1:
            raise_problems([("num_clips", f"num_clips and num_proc must be at least 1, got {self.num_clips} and "
                                          f"{self.num_proc}")])


def write_corpus(config: SynthConfig) -> Path:
    """`desta synth`: write the corpus into config.out and return the manifest path."""
    return synth_corpus(config.out, num_clips=config.num_clips, seed=config.seed, num_proc=config.num_proc)
