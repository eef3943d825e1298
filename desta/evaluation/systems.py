"""Stage 4's systems: the speech model(s) and the text references that answer the items, and the LLM judge.

A speech system is a checkpoint asked with the system prompt it was trained with (unless told otherwise);
it hears each clip and the transcript its own Whisper makes of it. A text reference is the same LLM reading
a text version of the item instead: the clip's description with the gold transcript (TEXT) or with the
speech model's Whisper transcript (TEXT_ASR), or a benchmark's own text of the item.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from desta.core.artifacts import CONFIG, PROCESSOR_CONFIG, WEIGHTS
from desta.core.digests import file_digest
from desta.core.generation import Backend, SamplingSettings, TransformersBackend
from desta.prompts import system_prompt_setting, text_turn

if TYPE_CHECKING:
    from desta.model.modeling import DestaModel
    from desta.model.processing import DestaProcessor

TEXT, TEXT_ASR = "text", "text_asr"  # the references: gold transcript, and the speech model's own Whisper transcript
TEXT_OWN, TEXT_OWN_ASR = "text_own", "text_own_asr"  # the checkpoint's LLM as trained (LoRA on), ":NAME" per checkpoint
TEACHER, TEACHER_ASR = "teacher", "teacher_asr"  # the LLM that wrote the targets


def system_names(checkpoints: list[str]) -> list[str]:
    """Report names of the speech systems: "speech" for one checkpoint, else their folder names made unique.

    >>> system_names(["runs/a/train"]), system_names(["x/train", "y/train", "z/lora"])
    (['speech'], ['train', 'train-2', 'lora'])
    """
    if len(checkpoints) == 1:
        return ["speech"]
    names: list[str] = []
    for path in checkpoints:
        name, k = Path(path).name or "checkpoint", 1
        while name in names or name in (TEXT, TEXT_ASR):
            k += 1
            name = f"{Path(path).name}-{k}"
        names.append(name)
    return names


@dataclass
class SystemsRun:
    """What running every system on the items gave: answers and seconds per system (speech systems and
    references), the speech systems' names, each one's text-ASR reference, Whisper's word error rate, the
    retention probes of each one's LLM, and the references' LLM."""

    speech: list[str]
    answers: dict[str, list[str]] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    asr_of: dict[str, str] = field(default_factory=dict)
    whisper_wer: dict[str, float] = field(default_factory=dict)
    probes: dict[str, Any] = field(default_factory=dict)
    text_llm: str | None = None
    training: dict[str, Any] = field(default_factory=dict)  # per speech system: its TrainingData (groups.py)
    references: dict[str, str] = field(default_factory=dict)  # per reference system: what it reads


@dataclass
class SpeechSystem:
    """A checkpoint loaded for evaluation: the model, its processor, the digest of its weights."""

    model: DestaModel
    processor: DestaProcessor
    weights: str

    @property
    def llm_name(self) -> str:
        """The LLM checkpoint the model is built on (its references' LLM)."""
        return self.model.config.llm_name_or_path

    @property
    def encoder_key(self) -> str:
        """What identifies its Whisper (the same Whisper gives the same transcripts)."""
        return self.model.config.encoder_name_or_path or self.weights

    def backend(self, batch_size: int) -> TransformersBackend:
        """The model's own LLM as a text backend (its references)."""
        return TransformersBackend(llm=self.model.llm, tokenizer=self.processor.tokenizer, batch_size=batch_size)


def load_system(path: str, system_prompt: str | None, text_llm: str | None,
                dtype: str = "float32") -> SpeechSystem:
    """A checkpoint for evaluation (weights in `dtype`), its processor built with `system_prompt` (None: the one
    it was trained with; "": none); one built on another LLM than `text_llm` is refused."""
    from desta.model.loading import load

    if not Path(path).is_dir():
        raise FileNotFoundError(f"checkpoint {path} not found; give a folder written by desta train or export")
    model, processor = load(path, dtype=getattr(torch, dtype), system_prompt=system_prompt_setting(system_prompt))
    model.eval()
    if text_llm is not None and model.config.llm_name_or_path != text_llm:
        raise ValueError(f"{path} is built on {model.config.llm_name_or_path}, not {text_llm}; compare "
                         "checkpoints of the same LLM in one report")
    return SpeechSystem(model, processor, file_digest(Path(path), (WEIGHTS, CONFIG, PROCESSOR_CONFIG)))


@torch.no_grad()
def clip_transcripts(model: DestaModel, processor: DestaProcessor, items: list[dict], batch_size: int,
                     progress: bool) -> dict[str, str]:
    """Whisper's transcript of every distinct clip, as the speech model receives it."""
    from desta.audio import load_audio_ref

    first = {}
    for item in items:
        first.setdefault(item["id"], item)
    ids = list(first)
    out: dict[str, str] = {}
    for start in tqdm(range(0, len(ids), batch_size), desc="whisper transcripts", disable=not progress):
        batch = ids[start : start + batch_size]
        texts = model.transcribe(processor, [load_audio_ref(first[i]["audio"], name=i) for i in batch])
        out.update(zip(batch, texts, strict=True))
    return out


@torch.no_grad()
def speech_answers(model: DestaModel, processor: DestaProcessor, items: list[dict], transcripts: dict[str, str],
                   batch_size: int, max_new_tokens: int, progress: bool = True) -> tuple[list[str], float]:
    """The speech model's answers from the audio and the given transcript of each clip; and the seconds taken."""
    from desta.audio import load_audio_ref

    answers: list[str] = []
    started = time.perf_counter()
    for start in tqdm(range(0, len(items), batch_size), desc="speech model", disable=not progress):
        batch = items[start : start + batch_size]
        clips = [[load_audio_ref(i["audio"], name=i["item_id"])] for i in batch]
        answers += model.chat(processor, [processor.conversation(i["instruction"]) for i in batch], clips,
                              transcripts=[[transcripts[i["id"]]] for i in batch], max_new_tokens=max_new_tokens,
                              do_sample=False)
    return answers, time.perf_counter() - started


def text_answers(backend: TransformersBackend, items: list[dict], descriptions: list[str], max_new_tokens: int,
                 system_prompt: str | None, progress: bool = False) -> tuple[list[str], float]:
    """A text reference: the same LLM reading a description instead of hearing the audio."""
    conversations = [text_turn(d, i["instruction"], system_prompt) for i, d in zip(items, descriptions, strict=True)]
    return generate_with_progress(backend, conversations, max_new_tokens, "text reference", progress)


def generate_with_progress(backend: TransformersBackend, conversations: list[list[dict]], max_new_tokens: int,
                           what: str, progress: bool) -> tuple[list[str], float]:
    """Greedy answers to the conversations, a few batches at a time under a progress bar; and the seconds taken."""
    started = time.perf_counter()
    step = backend.batch_size * 4  # enough rows per call for length-sorted batches, few enough for the bar to move
    answers: list[str] = []
    for start in tqdm(range(0, len(conversations), step), desc=what, unit="batch", disable=not progress):
        answers += [g.text for g in backend.generate(conversations[start : start + step],
                                                     SamplingSettings(max_new_tokens=max_new_tokens))]
    return answers, time.perf_counter() - started


# ----- the judge -----

@dataclass(frozen=True)
class Judging:
    """How a judge scores the items no rule scores: its conversation for an item and answer (None: not judged),
    how many replies it samples per item (several: at temperature 0.5), and how the replies become a score."""

    prompt: Callable[[dict, str], list[dict] | None]
    verdict: Callable[[dict, list[str]], dict[str, Any]]
    samples: Callable[[dict], int] = lambda item: 1
    max_new_tokens: int = 256


def judge_scores(backend: Backend, judging: Judging, items: list[dict], answers: dict[str, list[str]],
                 scores: dict[str, list[dict]]) -> None:
    """Score, in place, every system's answers to the items the judge's prompt covers."""
    for system, system_answers in answers.items():
        judged = [k for k, item in enumerate(items) if judging.prompt(item, system_answers[k]) is not None]
        if not judged:
            continue
        conversations = [judging.prompt(items[k], system_answers[k]) for k in judged]
        samples = max(judging.samples(items[k]) for k in judged)
        replies = [[g.text for g in backend.generate(conversations, SamplingSettings(
            max_new_tokens=judging.max_new_tokens, temperature=0.5 if samples > 1 else 0.0,
            top_p=0.95 if samples > 1 else 1.0, seed=draw))] for draw in range(samples)]
        for row, k in enumerate(judged):
            scores[system][k] = judging.verdict(items[k], [r[row] for r in replies][: judging.samples(items[k])])
