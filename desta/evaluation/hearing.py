"""Does the speech model hear a field? Label accuracy from the audio alone, cheap enough to run while training.

The quick instrument of stage 4 and of the sanity ladder (recipes/experiments/sanity): for clips with a gold
value of one description field (gender, pitch, accent, ...), the model is asked one question and every value's
label-style answer (`desta.prompts.field_answer`: "The speaker is male.", "The speaker is female.") is scored
by its log-likelihood given the audio and the clip's transcript, teacher-forced; a clip counts as right when
its gold value's answer is the most likely. Chance is one over the number of values, and the commonest gold
value's share is what always giving one answer scores. Nothing is generated, so a check of a hundred clips
takes seconds on a CPU; it tells whether the connector carries the field to the LLM, not how the model words
an answer (the eval does that).

`HearingCheck` runs it on named clip sets every N optimizer steps of `desta train` (a Trainer callback) and
appends one line per check to OUT/hearing.jsonl: accuracy with its 95 % interval per set, and how much the
connector's output varies from clip to clip (a connector that emits one prefix for every clip cannot pass).
`representations` returns what a linear probe reads at each stage (encoder, connector, the LLM at the answer
position), to find where a field is lost.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import LlamaForCausalLM, TrainerCallback

from desta.core.stats import mean_interval
from desta.prompts import field_answer

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from desta.model.modeling import DestaModel
    from desta.model.processing import DestaProcessor

HEARING_LOG = "hearing.jsonl"
# transformers 5.x names a model's key/value cache argument `cache` (`past_key_values` is deprecated there)
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
DEFAULT_QUESTIONS = {  # the question each field is checked with (an eval phrasing: never a training prompt)
    "gender": "Is the speaker male or female? Answer with one word.",
    "accent": "Name the speaker's accent in one word ({labels}).",
    "emotion": "Name the speaker's emotion in one word ({labels}).",
    "speaking_speed": "How fast does the speaker talk: slow, normal or fast?",
    "pitch": "Is the speaker's voice low, normal or high in pitch?",
    "volume": "Is the recording quiet, normal or loud in volume?",
}


@dataclass
class Clips:
    """Clips to check, encoded once: the frozen encoder's tapped layers per 30 s window, their gold values."""

    name: str
    ids: list[str]
    gold: list[str]
    transcripts: list[str | None]
    durations: list[float]
    windows: list[list[torch.Tensor]] = field(repr=False)  # per clip: (layers, steps, d_model) per window

    def __len__(self) -> int:
        return len(self.ids)


@torch.no_grad()
def encode_clips(model: DestaModel, processor: DestaProcessor, rows: Dataset, field_name: str, name: str,
                 batch_size: int = 8) -> Clips:
    """The rows (audio, `field_name`, transcript, duration, id) with a gold value, encoded by the frozen
    encoder once; rows without a value are left out."""
    from desta.audio import load_audio_ref, split_windows

    keep = [k for k, value in enumerate(rows[field_name]) if value not in (None, "")]
    rows = rows.select(keep)
    windows: list[list[torch.Tensor]] = []
    device = next(model.connector.parameters()).device
    for start in range(0, len(rows), batch_size):
        pieces, owners = [], []
        for k in range(start, min(start + batch_size, len(rows))):
            clip = split_windows(load_audio_ref(rows[k]["audio"], name=rows[k]["id"]))
            owners.append(len(clip))
            pieces += clip
        features = {key: value.to(device) for key, value in processor.extract_features(pieces).items()}
        hidden, mask = model.encode_audio(**features)  # (layers, windows, steps, d_model), (windows, steps)
        w = 0
        for count in owners:
            windows.append([hidden[:, w + i, : int(mask[w + i].sum())].float().cpu() for i in range(count)])
            w += count
    columns = rows.column_names
    return Clips(name=name, ids=list(rows["id"]), gold=[str(v) for v in rows[field_name]],
                 transcripts=list(rows["transcript"]) if "transcript" in columns else [None] * len(rows),
                 durations=[float(d) for d in rows["duration"]] if "duration" in columns else [0.0] * len(rows),
                 windows=windows)


def _audio_batch(clips: Clips, indices: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from desta.train.features import pad_cached

    hidden, mask = pad_cached([w for k in indices for w in clips.windows[k]])
    return hidden.to(device), mask.to(device)


def _answer_tokens(processor: DestaProcessor, question: str, answer: str) -> list[int]:
    """The tokens training labels for an answer (the answer and its end-of-turn token), as rendered in context."""
    inputs = processor([processor.conversation(question, answer)], transcripts=[[None]], window_counts=[[1]])
    labels = inputs["labels"][0]
    return labels[labels != -100].tolist()


@torch.no_grad()
def answer_loglik(model: DestaModel, processor: DestaProcessor, clips: Clips, question: str,
                  answers: list[str], batch_size: int = 16, autocast: bool = False) -> np.ndarray:
    """(clips, answers): the summed log-probability of each answer (and its end-of-turn token) given each clip,
    its transcript and the question, teacher-forced as training reads them. The prompt runs once per clip; each
    answer continues from its key/value cache (`autocast`: in bf16, as training under bf16 does)."""
    device = next(model.connector.parameters()).device
    suffixes = [_answer_tokens(processor, question, a) for a in answers]
    scores = np.zeros((len(clips), len(answers)))
    precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
    for start in range(0, len(clips), batch_size):
        rows = list(range(start, min(start + batch_size, len(clips))))
        inputs = processor([processor.conversation(question) for _ in rows], add_generation_prompt=True,
                           transcripts=[[clips.transcripts[k]] for k in rows],
                           window_counts=[[len(clips.windows[k])] for k in rows],
                           durations=[[clips.durations[k]] for k in rows])  # left-padded prompts
        hidden, mask = _audio_batch(clips, rows, device)
        attention = inputs["attention_mask"].to(device)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)  # (batch, prompt): left padding keeps positions
        with precision:
            embeds = model.embed_inputs(inputs["input_ids"].to(device), audio_hidden_states=hidden,
                                        audio_step_mask=mask)
            out = model.llm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True,
                            logits_to_keep=1)  # the LM head on the last position only: the answer's first token
        cache = out.past_key_values
        first = out.logits[:, -1].float().log_softmax(-1)  # (batch, vocab): the answer's first token
        for a, tokens in enumerate(suffixes):
            total = first[:, tokens[0]].clone()
            if len(tokens) > 1:
                follow = torch.tensor(tokens[:-1], device=device).expand(len(rows), -1)  # (batch, length - 1)
                steps = positions[:, -1:] + 1 + torch.arange(len(tokens) - 1, device=device)
                with precision:
                    more = model.llm(input_ids=follow, attention_mask=torch.cat(
                        [attention, torch.ones_like(follow)], dim=1), position_ids=steps, use_cache=True,
                        **{_CACHE_ARGUMENT: cache}).logits.float().log_softmax(-1)  # (batch, length - 1, vocab)
                cache.crop(-(len(tokens) - 1))  # back to the prompt alone for the next answer
                total += more.gather(2, torch.tensor(tokens[1:], device=device).expand(len(rows), -1)[..., None]
                                     ).squeeze(-1).sum(1)
            scores[rows, a] = total.cpu().numpy()
    return scores


def label_accuracy(model: DestaModel, processor: DestaProcessor, clips: Clips, field_name: str,
                   values: list[str], question: str | None = None, batch_size: int = 16,
                   autocast: bool = False) -> dict[str, Any]:
    """Per clip, whether the gold value's label answer is the likeliest of `values`' answers; the accuracy with
    its 95 % interval, chance (1 / values) and the commonest gold value's share."""
    question = (question or DEFAULT_QUESTIONS[field_name]).format(labels=", ".join(values))
    answers = [field_answer(field_name, v) for v in values]
    unknown = sorted(set(clips.gold) - set(values))
    if unknown:
        raise ValueError(f"{clips.name}: gold {field_name} values {unknown} are not among the values checked "
                         f"{values}; give every value the clips hold")
    scores = answer_loglik(model, processor, clips, question, answers, batch_size, autocast)
    gold = np.array([values.index(g) for g in clips.gold])
    right = (scores.argmax(1) == gold).astype(float)
    accuracy, low, high = mean_interval(list(right))
    counts = np.bincount(gold, minlength=len(values))
    return {"n": len(clips), "accuracy": accuracy, "ci": [low, high], "chance": 1 / len(values),
            "constant": float(counts.max() / counts.sum()), "right": right.tolist(),
            "predicted": [values[i] for i in scores.argmax(1)]}


@torch.no_grad()
def connector_spread(model: DestaModel, clips: Clips, limit: int = 64) -> float:
    """How much the connector's output varies across clips: the standard deviation over clips of each output
    element (first window, every vector), averaged, over the outputs' root mean square. Near 0: one prefix for
    every clip."""
    device = next(model.connector.parameters()).device
    indices = list(range(min(limit, len(clips))))
    firsts = [clips.windows[k][0] for k in indices]
    from desta.train.features import pad_cached

    hidden, mask = pad_cached(firsts)
    out = model.embed_audio(audio_hidden_states=hidden.to(device), audio_step_mask=mask.to(device)).float()
    # (clips, vectors, llm_hidden): the spread across clips of each element, against the elements' size
    return float(out.std(0).mean() / out.pow(2).mean().sqrt().clamp_min(1e-12))


class HearingCheck(TrainerCallback):
    """Every `every` optimizer steps (and at the start and the end), the label accuracy of `field_name` on each
    clip set, appended to OUT/hearing.jsonl; with `stop_at` ({set name: accuracy}), training stops at the
    first check that reaches every threshold (its step is recorded as `passed_at`)."""

    def __init__(self, processor: DestaProcessor, sets: list[Clips], field_name: str, values: list[str],
                 every: int, out: str | Path, question: str | None = None,
                 stop_at: dict[str, float] | None = None):
        self.processor, self.sets, self.field, self.values = processor, sets, field_name, values
        self.every, self.path, self.question, self.stop_at = every, Path(out) / HEARING_LOG, question, stop_at or {}
        self.checked: set[int] = set()
        self.passed_at: int | None = None
        self.started: float | None = None  # when training (re)started, for the training seconds of each check
        self.check_seconds = 0.0  # time spent checking since then, left out of the training seconds
        unknown = sorted(set(self.stop_at) - {s.name for s in sets})
        if unknown:
            raise ValueError(f"stop_at names sets {unknown}, but the sets are {[s.name for s in sets]}")

    def check(self, model: DestaModel, step: int, autocast: bool = False) -> dict[str, Any]:
        """Run the check now (model in eval mode, restored after); returns and logs the line: the step, the
        training seconds since this process started training (checks left out), each set's accuracy."""
        began = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            line: dict[str, Any] = {"step": step, "field": self.field}
            for clips in self.sets:
                result = label_accuracy(model, self.processor, clips, self.field, self.values, self.question,
                                        autocast=autocast)
                line[clips.name] = {k: result[k] for k in ("n", "accuracy", "ci", "chance", "constant")}
            line["connector_spread"] = connector_spread(model, self.sets[0])
        finally:
            model.train(was_training)
        passed = bool(self.stop_at) and all(line[name]["accuracy"] >= level for name, level in self.stop_at.items())
        if passed and self.passed_at is None:
            self.passed_at = step
        line["passed"] = passed
        line["check_seconds"] = round(time.perf_counter() - began, 2)
        if self.started is not None:
            line["train_seconds"] = round(began - self.started - self.check_seconds, 1)
            self.check_seconds += time.perf_counter() - began
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        self.checked.add(step)
        return line

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: DestaModel | None = None, **kwargs: Any) -> None:
        """The check before the first step (or at the step a resumed run starts from)."""
        if model is not None and state.global_step not in self.checked:
            self.check(model, state.global_step, args.bf16)
        self.started, self.check_seconds = time.perf_counter(), 0.0

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: DestaModel | None = None, **kwargs: Any) -> TrainerControl:
        """Every `every` steps: check, and stop once every `stop_at` threshold is reached."""
        if model is not None and state.global_step % self.every == 0 and state.global_step not in self.checked:
            line = self.check(model, state.global_step, args.bf16)
            if line["passed"]:
                control.should_training_stop = True
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: DestaModel | None = None, **kwargs: Any) -> None:
        """The last check, at the step training ended."""
        if model is not None and state.global_step not in self.checked:
            self.check(model, state.global_step, args.bf16)


def read_hearing_log(path: str | Path) -> list[dict[str, Any]]:
    """The checks OUT/hearing.jsonl holds, in step order (a resumed run's repeated steps: the last one)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


@torch.no_grad()
def representations(model: DestaModel, processor: DestaProcessor, clips: Clips, question: str,
                    batch_size: int = 8) -> dict[str, np.ndarray]:
    """What a linear probe can read at each stage, per clip: "encoder" (the tapped layers averaged over frames,
    concatenated: (clips, layers x d_model)), "connector" (its vectors for the first window averaged: (clips,
    llm_hidden)), "connector_all" (all of them, concatenated: (clips, vectors x llm_hidden)), and "llm_answer"
    (the LLM's last hidden state where the answer starts, after the audio, transcript and question:
    (clips, llm_hidden))."""
    device = next(model.connector.parameters()).device
    encoder = np.stack([torch.cat([w.mean(1) for w in clips.windows[k][:1]], dim=-1).flatten().numpy()
                        for k in range(len(clips))])  # (clips, layers x d_model)
    connector, connector_all, answer = [], [], []
    for start in range(0, len(clips), batch_size):
        rows = list(range(start, min(start + batch_size, len(clips))))
        hidden, mask = _audio_batch(clips, rows, device)
        firsts = np.cumsum([0] + [len(clips.windows[k]) for k in rows])[:-1]
        vectors = model.embed_audio(audio_hidden_states=hidden, audio_step_mask=mask).float()[firsts]
        connector.append(vectors.mean(1).cpu().numpy())  # (batch, llm_hidden)
        connector_all.append(vectors.flatten(1).cpu().numpy())  # (batch, vectors x llm_hidden)
        inputs = processor([processor.conversation(question) for _ in rows],
                           transcripts=[[clips.transcripts[k]] for k in rows],
                           window_counts=[[len(clips.windows[k])] for k in rows],
                           durations=[[clips.durations[k]] for k in rows], add_generation_prompt=True)
        embeds = model.embed_inputs(inputs["input_ids"].to(device), audio_hidden_states=hidden, audio_step_mask=mask)
        out = model.llm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"].to(device),
                        output_hidden_states=True, use_cache=False)
        answer.append(out.hidden_states[-1][:, -1].float().cpu().numpy())  # left-padded: the last position
    return {"encoder": encoder, "connector": np.concatenate(connector), "connector_all": np.concatenate(connector_all),
            "llm_answer": np.concatenate(answer)}
