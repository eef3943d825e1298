"""The built-in synthetic corpus: sentences spoken by catalogue voices (desta.audio.voices) with known labels.

Writes DIR/audio/<id>.wav (16 kHz, 16-bit), DIR/manifest.jsonl with one row per clip (path, id, transcript,
engine, voice, gender, accent, emotion, licence, the voice settings rate, pitch and volume, and the bands
they were drawn from) and DIR/voices.json (the voice pool, the held-out voices and each engine's licence).

Voice-disjoint splits: `split=train` speaks only with the pool's voices that are not held out (`hold_out`
names them, `hold_out_share` draws a share of each engine's voices); `split=eval` speaks half its clips with
held-out voices and half with training voices. Sentences are split too: a sentence belongs to the eval
part of the grammar when its hash says so (EVAL_SENTENCE_SHARE), so no eval sentence is ever a training
sentence, whatever the seeds. Row i depends only on (seed, i, the voice pool, the held-out voices, split),
so any shard or resumed run gives the same rows.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from desta.audio import SAMPLE_RATE
from desta.audio.tts import Voice, synthesize
from desta.audio.voices import CATALOGUE, ENGINES, MBROLA_LICENCE, VoiceInfo, hold_out, require, select
from desta.core.args import raise_problems
from desta.core.artifacts import MANIFEST
from desta.core.chunks import read_jsonl, to_jsonl, write_atomic
from desta.core.summary import Summary

VOICES_FILE = "voices.json"  # beside the manifest: the pool, the held-out voices and the licences
PLANNED = "planned.jsonl"  # the rows a run is making, written before its first clip; gone once the manifest is

# The sentence grammar: 30 subjects x 30 verbs x 30 objects x 30 places, plus questions and requests
# (868,560 sentences: `grammar_size()`).
_SUBJECTS = ["The old fisherman", "My younger sister", "A tired student", "The new manager", "Our neighbour",
             "The little boy", "A famous singer", "The taxi driver", "Her best friend", "The science teacher",
             "A quiet librarian", "The hungry cat", "My grandfather", "The young doctor", "A group of tourists",
             "The night nurse", "His older brother", "A busy waiter", "The village baker", "My aunt",
             "The football coach", "A curious child", "The retired pilot", "Our landlord", "The shy painter",
             "A local farmer", "The museum guide", "My cousin", "The head chef", "A friendly stranger"]
_VERBS = ["painted", "forgot", "carried", "found", "cleaned", "repaired", "ordered", "borrowed", "described",
          "photographed", "delivered", "recommended", "discovered", "sold", "wrapped", "measured", "returned",
          "noticed", "packed", "opened", "lost", "bought", "moved", "checked", "hid", "polished", "dropped",
          "painted over", "picked up", "brought back"]
_OBJECTS = ["a red bicycle", "the wooden table", "three fresh loaves", "an old map", "the broken window",
            "a letter from Paris", "the yellow umbrella", "some warm soup", "a tiny silver key", "the garden fence",
            "two concert tickets", "a heavy suitcase", "the evening newspaper", "a box of apples", "the blue kettle",
            "a green notebook", "the kitchen clock", "four paper cups", "a pair of boots", "the spare tyre",
            "a jar of honey", "the front door", "an empty bottle", "a woollen scarf", "the piano stool",
            "six glass marbles", "a birthday cake", "the office printer", "a bag of rice", "the orange lamp"]
_PLACES = ["before breakfast", "near the station", "on a rainy Tuesday", "after the meeting", "in the city centre",
           "behind the library", "during the holiday", "at the market", "by the river", "late last night",
           "in the kitchen", "outside the museum", "on the way home", "at the weekend", "in the morning",
           "at the airport", "next to the bank", "under the bridge", "on Friday evening", "in the garden",
           "at noon", "before the storm", "after lunch", "in the school hall", "on the top floor",
           "near the harbour", "at the corner shop", "in the early spring", "after the concert", "by the lake"]
_QUESTIONS = ["Did you see {o} {p}?", "Where is {o} now?", "Could you bring {o} {p}, please?",
              "Why did {s} take {o}?", "Have you ever seen {o}?", "Who {v} {o} {p}?",
              "Is it true that {s} {v} {o}?", "Please leave {o} {p}.", "Do not forget {o} {p}!"]
QUESTION_SHARE = 0.2  # share of sentences drawn from _QUESTIONS
EVAL_SENTENCE_SHARE = 1 / 8  # share of the grammar's sentences that only eval clips say
# Voice settings per label: rate in words per minute, pitch on espeak-ng's 0-100 scale, volume 0-200.
RATES = {"Slow": (105, 125), "Normal": (160, 185), "Fast": (245, 275)}
PITCHES = {"Low": (10, 25), "Normal": (45, 55), "High": (80, 95)}
VOLUMES = {"Low": (30, 45), "Normal": (90, 110), "High": (180, 200)}
EVAL_UNSEEN_SHARE = 0.5  # share of an eval split's clips spoken by held-out voices (when there are any)


@dataclass
class SynthRow:
    """One synthesized clip's manifest row: its text, the voice and settings used and the labels they stand for."""

    id: str
    path: str  # relative to the manifest
    transcript: str
    engine: str  # espeak, mbrola, flite or piper
    voice: str  # the catalogue voice id, e.g. espeak:en-us+f3 or mbrola:mb-us1
    gender: str
    accent: str
    emotion: str
    licence: str  # the voice's licence (MBROLA voices: non-commercial use only)
    rate_wpm: int
    pitch_setting: int
    volume_setting: int
    speed_label: str  # the band the rate was drawn from
    pitch_label: str
    volume_label: str


@dataclass(frozen=True)
class VoicePlan:
    """Which voices a split speaks with: the pool's voices minus the held-out ones for train, both for eval."""

    pool: tuple[str, ...] = tuple(v.id for v in select(["espeak"]))
    held_out: tuple[str, ...] = ()
    split: Literal["train", "eval"] = "train"

    def seen(self) -> list[VoiceInfo]:
        """The voices training clips speak with."""
        return [CATALOGUE[i] for i in self.pool if i not in set(self.held_out)]

    def unseen(self) -> list[VoiceInfo]:
        """The held-out voices, never in a training clip."""
        return [CATALOGUE[i] for i in self.held_out]

    def used(self) -> list[VoiceInfo]:
        """The voices this split's clips can speak with."""
        return self.seen() + (self.unseen() if self.split == "eval" else [])


def grammar_size() -> int:
    """How many different sentences `sentence` can return (an upper bound: a few templates share words).

    >>> grammar_size() > 800_000
    True
    """
    s, v, o, p = (len(words) for words in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES))
    questions = sum(o * (p if "{p}" in t else 1) * (s if "{s}" in t else 1) * (v if "{v}" in t else 1)
                    for t in _QUESTIONS)
    return s * v * o * p + questions


def is_eval_sentence(text: str) -> bool:
    """Whether a sentence belongs to the eval part of the grammar (a pure function of the text).

    >>> is_eval_sentence("Did you see the office printer before the storm?")
    True
    >>> is_eval_sentence("Did you see a green notebook by the river?")
    False
    """
    return hashlib.sha256(text.encode()).digest()[0] < 256 * EVAL_SENTENCE_SHARE


def sentence(rng: np.random.Generator, split: Literal["train", "eval"] | None = None) -> str:
    """A varied English sentence (`grammar_size()` of them); with `split`, one from that part of the grammar."""
    while True:
        s, v, o, p = (str(rng.choice(words)) for words in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES))
        if rng.random() < QUESTION_SHARE:
            text = str(rng.choice(_QUESTIONS)).format(s=s.lower(), v=v, o=o, p=p)
        else:
            text = f"{s} {v} {o} {p}."
        if split is None or is_eval_sentence(text) == (split == "eval"):
            return text


def row_for(index: int, seed: int, plan: VoicePlan = VoicePlan()) -> SynthRow:
    """The labels of clip `index`: a pure function of (seed, index, plan)."""
    rng = np.random.default_rng([seed, index])
    seen, unseen = plan.seen(), plan.unseen()
    from_unseen = plan.split == "eval" and bool(unseen) and (not seen or rng.random() < EVAL_UNSEEN_SHARE)
    candidates = unseen if from_unseen else seen
    gender = str(rng.choice(sorted({v.gender for v in candidates})))
    of_gender = [v for v in candidates if v.gender == gender]
    voice = of_gender[int(rng.integers(len(of_gender)))]
    speed, pitch, volume = (str(rng.choice(list(bands))) for bands in (RATES, PITCHES, VOLUMES))
    return SynthRow(
        id=f"synth-{seed}-{index:06d}", path=f"audio/synth-{seed}-{index:06d}.wav",
        transcript=sentence(rng, plan.split), engine=voice.engine, voice=voice.id, gender=voice.gender,
        accent=voice.accent, emotion="Neutral", licence=voice.licence,
        rate_wpm=int(rng.integers(*RATES[speed], endpoint=True)),
        pitch_setting=int(rng.integers(*PITCHES[pitch], endpoint=True)),
        volume_setting=int(rng.integers(*VOLUMES[volume], endpoint=True)),
        speed_label=speed, pitch_label=pitch, volume_label=volume,
    )


def _render(job: tuple[SynthRow, str]) -> str:
    import soundfile as sf

    row, out = job
    target = Path(out) / row.path
    if not target.exists():
        voice = Voice(voice_id=row.voice, rate=row.rate_wpm, pitch=row.pitch_setting, volume=row.volume_setting)
        samples = synthesize(row.transcript, voice)
        tmp = target.with_suffix(".tmp.wav")
        sf.write(tmp, samples, SAMPLE_RATE, subtype="PCM_16")
        os.replace(tmp, target)  # atomic: a killed run never leaves a half-written clip behind
    return row.id


def _keep_only_same_rows(out: Path, rows: list[SynthRow], overwrite: bool) -> None:
    """Refuse to reuse clips on disk that an earlier run made for other rows (another voice pool, split, seed or
    desta version); with `overwrite`, delete them so they are made again."""
    earlier: dict[str, dict] = {}
    for name in (MANIFEST, PLANNED):
        if (out / name).is_file():
            earlier.update((r["id"], r) for r in read_jsonl(out / name))
    changed = [row for row in rows if row.id in earlier and earlier[row.id] != asdict(row)]
    if changed and not overwrite:
        raise ValueError(f"{out} holds {len(changed)} clips made for other rows (e.g. {changed[0].id}: "
                         f"{earlier[changed[0].id].get('voice')!r} saying {earlier[changed[0].id]['transcript']!r}, "
                         f"now {changed[0].voice!r} saying {changed[0].transcript!r}); give another --out, or "
                         "--overwrite to make them again")
    for row in changed:
        (out / row.path).unlink(missing_ok=True)


def synth_corpus(out: str | os.PathLike, num_clips: int = 1000, seed: int = 0, num_proc: int = 1,
                 progress: bool = True, plan: VoicePlan = VoicePlan(), overwrite: bool = False) -> Path:
    """Write `num_clips` clips, their manifest and voices.json; clips already on disk for the same rows are kept
    (an interrupted run resumes), clips made for other rows are refused (or remade with `overwrite`). Every
    voice the split needs must be installed (one error names each missing one and its install command).
    Returns the manifest path."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be at least 1, got {num_clips}")
    if not plan.seen():
        raise ValueError(f"every voice of the pool is held out ({len(plan.pool)}); leave at least one for training")
    require(plan.used())
    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rows = [row_for(i, seed, plan) for i in range(num_clips)]
    _keep_only_same_rows(out, rows, overwrite)
    (out / PLANNED).write_text(to_jsonl([asdict(row) for row in rows]))
    jobs = [(row, str(out)) for row in rows]
    bar = tqdm(total=num_clips, desc="synth", unit="clip", disable=not progress)
    if num_proc > 1:  # spawned: an engine a parent already runs (MBROLA's child process, onnxruntime) is not forked
        with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in pool.map(_render, jobs, chunksize=16):
                bar.update()
    else:
        for job in jobs:
            _render(job)
            bar.update()
    bar.close()
    used = sorted({row.voice for row in rows})
    record = {"split": plan.split, "seed": seed, "pool": list(plan.pool), "held_out": list(plan.held_out),
              "voices_used": used, "licences": {e: ENGINES[e].licence for e in sorted({r.engine for r in rows})}}
    (out / VOICES_FILE).write_text(json.dumps(record, indent=1) + "\n")
    manifest = out / MANIFEST
    write_atomic(manifest, to_jsonl([asdict(row) for row in rows]))
    (out / PLANNED).unlink()
    return manifest


def compare_splits(train_manifest: str | os.PathLike, eval_manifest: str | os.PathLike) -> dict:
    """What an eval corpus shares with a training corpus, from their manifests: the voices and engines of each,
    the eval voices no training clip speaks with (unseen), and any eval sentence a training clip says (should
    be none: `split=eval` draws from the eval part of the grammar)."""
    train, evaluation = read_jsonl(train_manifest), read_jsonl(eval_manifest)
    train_voices = {r["voice"] for r in train}
    eval_voices = {r["voice"] for r in evaluation}
    return {"train_voices": len(train_voices), "train_engines": sorted({r["engine"] for r in train}),
            "eval_voices": len(eval_voices), "eval_engines": sorted({r["engine"] for r in evaluation}),
            "unseen_voices": sorted(eval_voices - train_voices),
            "unseen_clips": sum(r["voice"] not in train_voices for r in evaluation), "eval_clips": len(evaluation),
            "shared_sentences": sorted({r["transcript"] for r in train} & {r["transcript"] for r in evaluation})}


@dataclass
class SynthConfig:
    """Write a synthetic corpus: WAV clips spoken by catalogue voices and a manifest with their labels."""

    out: str
    """output folder (audio/, manifest.jsonl, voices.json)"""
    num_clips: int = 1000
    """how many clips"""
    seed: int = 0
    """labels and sentences depend only on (seed, clip index) and the voices"""
    num_proc: int = 1
    """worker processes"""
    voices: list[str] = field(default_factory=lambda: ["espeak"])
    """voice ids or engine names (all of that engine's voices), e.g. espeak,mbrola,flite:slt; `desta voices`
    lists them"""
    hold_out: list[str] = field(default_factory=list)
    """voice ids of the pool that no training clip speaks with"""
    hold_out_share: float = 0.0
    """also hold out this share of each engine's voices (drawn by hold_out_seed)"""
    hold_out_seed: int = 0
    """which voices hold_out_share draws; keep it the same for the train and eval splits"""
    split: Literal["train", "eval"] = "train"
    """train: the voices not held out, training sentences; eval: half held-out voices, eval-only sentences"""
    overwrite: bool = False
    """remake clips an earlier run in `out` made for other rows (otherwise such a run is refused)"""

    def __post_init__(self) -> None:
        problems = []
        if self.num_clips < 1 or self.num_proc < 1:
            problems.append(("num_clips", f"num_clips and num_proc must be at least 1, got {self.num_clips} and "
                                          f"{self.num_proc}"))
        if not 0 <= self.hold_out_share < 1:
            problems.append(("hold_out_share", f"must be in [0, 1), got {self.hold_out_share}"))
        try:
            pool = select(self.voices)
            held = hold_out(pool, self.hold_out, self.hold_out_share, self.hold_out_seed)
            if len(held) == len(pool):
                problems.append(("hold_out", f"holds out every voice of the pool ({len(pool)}); leave some for "
                                             "training"))
        except ValueError as err:
            problems.append(("voices" if "unknown voices" in str(err) else "hold_out", str(err)))
        raise_problems(problems)

    def plan(self) -> VoicePlan:
        """The voices each split speaks with."""
        pool = select(self.voices)
        held = hold_out(pool, self.hold_out, self.hold_out_share, self.hold_out_seed)
        return VoicePlan(pool=tuple(v.id for v in pool), held_out=tuple(held), split=self.split)


def write_corpus(config: SynthConfig) -> Summary:
    """`desta synth`: write the corpus into config.out; returns the manifest path and voices.json's record, with the
    line it ends with (clips, voices, held-out voices, and the MBROLA licence where it applies)."""
    manifest = synth_corpus(config.out, num_clips=config.num_clips, seed=config.seed, num_proc=config.num_proc,
                            plan=config.plan(), overwrite=config.overwrite)
    record = json.loads((manifest.parent / VOICES_FILE).read_text())
    line = (f"wrote {config.num_clips} clips ({config.split}: {len(record['voices_used'])} voices; "
            f"{len(record['held_out'])} of the pool's {len(record['pool'])} held out of training); "
            f"manifest: {manifest}")
    if "mbrola" in record["licences"]:
        line += f"\nMBROLA voices used: {MBROLA_LICENCE}"
    return Summary({"manifest": str(manifest), **record}, line)
