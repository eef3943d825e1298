"""The training data path: targets rows -> examples -> lazily decoded items -> padded batches.

Reads a targets dataset (OUT/dataset of `desta targets`) and optional text-only replay rows.
`speech_examples` / `text_examples` build chat examples with the processor's speech turn;
`DestaDataset` decodes audio (or reads the feature cache) only when a batch needs it;
`DestaCollator` pads a batch (or packs it: several samples per row, each isolated); `EpochSeededSampler`
groups clips of similar duration into batches whose order depends only on (seed, epoch), so a resumed run
sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from desta.audio import SAMPLE_RATE, load_audio_ref, num_windows
from desta.core.chunks import saved_empty
from desta.core.replay import draw
from desta.core.sequences import Conversation, chat_tokens, pad_batch
from desta.model.packing import balance_rows, pack_rows
from desta.model.processing import DestaProcessor
from desta.prompts import DEFAULT_SYSTEM_PROMPT, text_turn, with_system

if TYPE_CHECKING:
    from datasets import Dataset

    from desta.train.features import FeatureCache

TARGET_COLUMNS = ["id", "audio", "prompt", "response"]


def load_targets(path: str, what: str) -> Dataset:
    """A targets dataset, checked for the columns training needs."""
    from datasets import load_from_disk

    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"{what} dataset {path!r} not found; give the folder written by desta targets "
                                "(OUT/dataset)")
    if saved_empty(path):
        raise ValueError(f"{path} holds no rows; nothing to train on")
    dataset = load_from_disk(path)
    missing = [c for c in TARGET_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path} lacks columns {missing} (has {dataset.column_names}); train on the output "
                         "of desta targets")
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no rows; nothing to train on")
    return dataset


def targets_system_prompt(dataset: Dataset, override: str | None) -> str | None:
    """The system prompt to train with: `override` when given ("" for none), else the one the targets
    stage used (its `system_prompt` column), else the default of datasets made before that column."""
    if override is not None:
        return override or None
    if "system_prompt" not in dataset.column_names:
        return DEFAULT_SYSTEM_PROMPT
    found = set(dataset["system_prompt"])
    if len(found) > 1:
        raise ValueError(f"the targets rows were written with {len(found)} different system prompts "
                         f"({sorted(found)[:3]}); train on one targets run, or set data.system_prompt")
    return found.pop() or None


def load_text_rows(path: str) -> list[dict[str, str]]:
    """Text-only replay rows (instruction, response) from a JSONL file or a dataset folder."""
    from datasets import load_from_disk

    if Path(path).is_file():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    elif Path(path).is_dir():
        rows = list(load_from_disk(path))
    else:
        raise FileNotFoundError(f"text replay data {path} not found; give a JSONL file or a dataset folder with "
                                "instruction and response columns")
    bad = [i for i, r in enumerate(rows) if not r.get("instruction") or not r.get("response")]
    if not rows or bad:
        raise ValueError(f"{path}: text replay rows need non-empty instruction and response columns "
                         f"({len(bad)} of {len(rows)} rows do not)")
    return [{"instruction": r["instruction"], "response": r["response"]} for r in rows]


@dataclass
class Example:
    """One training chat: its conversation, and where its audio is (not yet decoded)."""

    id: str
    conversation: Conversation
    audio: dict | None  # {"bytes" | "path"}; None for text-only rows
    transcript: str | None
    duration: float  # seconds; 0 for text-only rows
    teacher: Conversation | None = None  # distillation: the text turn the LLM reads, with the same response


def speech_examples(dataset: Dataset, processor: DestaProcessor, teacher: bool = False) -> list[Example]:
    """One example per targets row: the processor's speech turn with the row's prompt and response; with
    `teacher`, also the text LLM's turn (description + prompt) with the same response, for distillation."""
    columns = dataset.column_names
    if teacher and "description" not in columns:
        raise ValueError("distillation (optim.loss kl or on_policy) needs the targets' description column; train on "
                         "the output of desta targets")
    durations = dataset["duration"] if "duration" in columns else [10.0] * len(dataset)
    transcripts = dataset["transcript"] if "transcript" in columns else [None] * len(dataset)
    descriptions = dataset["description"] if teacher else [None] * len(dataset)
    return [Example(id=clip_id, audio=audio, transcript=transcript, duration=float(duration),
                    conversation=processor.conversation(prompt, response),
                    teacher=text_turn(description, prompt, processor.system_prompt)
                    + [{"role": "assistant", "content": response}] if teacher else None)
            for clip_id, audio, transcript, duration, prompt, response, description in zip(
                dataset["id"], dataset["audio"], transcripts, durations, dataset["prompt"], dataset["response"],
                descriptions, strict=True)]


def text_examples(rows: list[dict[str, str]], count: int, seed: int, system_prompt: str | None) -> list[Example]:
    """`count` replay rows drawn with replacement (seeded), as text-only chat examples."""
    return [Example(id=f"text-{i}", audio=None, transcript=None, duration=0.0,
                    conversation=with_system([{"role": "user", "content": row["instruction"]},
                                              {"role": "assistant", "content": row["response"]}], system_prompt))
            for i, row in enumerate(draw(rows, count, seed))]


def token_count(processor: DestaProcessor, example: Example) -> int:
    """Sequence length the processor will produce (audio positions and transcript included)."""
    count = len(processor.tokenizer(processor.render(example.conversation), add_special_tokens=False).input_ids)
    if example.audio is not None:
        windows = num_windows(int(example.duration * SAMPLE_RATE))
        count += windows * processor.num_queries - 1 + len(processor.transcript_ids(example.transcript,
                                                                                    example.duration))
    return count


def apply_length_rule(processor: DestaProcessor, examples: list[Example], max_length: int,
                      rule: str) -> tuple[list[Example], int]:
    """Drop sequences over the budget (rule "drop"), or keep them for the collator to cut ("truncate").
    Returns the examples kept and how many were over."""
    over = [token_count(processor, e) > max_length for e in examples]
    if rule == "drop":
        return [e for e, long in zip(examples, over, strict=True) if not long], sum(over)
    return examples, sum(over)


class DestaDataset(torch.utils.data.Dataset):
    """Examples decoded lazily: audio is read from disk (or the feature cache) when a batch needs it."""

    def __init__(self, examples: list[Example], cache: FeatureCache | None = None):
        self.examples, self.cache = examples, cache

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        item: dict[str, Any] = {"id": example.id, "conversation": example.conversation,
                                "transcript": example.transcript, "duration": example.duration, "audio": None,
                                "cached": None, "teacher": example.teacher}
        if example.audio is None:
            return item
        if self.cache is not None:
            item["cached"] = self.cache[example.id]
        else:
            item["audio"] = load_audio_ref(example.audio, name=example.id)
        return item


class DestaCollator:
    """Items -> one padded batch: ids, masks, labels (-100 outside responses), audio features or cached
    encoder states, and the sample ids (for error messages). With `pack_length`, the batch's samples are
    packed into rows of up to that many tokens (desta.model.packing) and position_ids mark the samples."""

    def __init__(self, processor: DestaProcessor, max_length: int, pack_length: int | None = None):
        self.processor, self.max_length, self.pack_length = processor, max_length, pack_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Items from DestaDataset -> the processor's batch plus sample_ids: input_ids, attention_mask, labels
        (batch, seq); input_features (windows, mel_bins, frames) and feature_attention_mask (windows, frames), or from
        the cache audio_hidden_states (layers, windows, steps, d_model) and audio_step_mask (windows, steps).
        Packed: input_ids, attention_mask, labels and position_ids are (rows, seq), the samples in sample_ids'
        order, and the audio windows follow that order."""
        from desta.train.features import pad_cached

        conversations = [item["conversation"] for item in items]
        transcripts = [[item["transcript"]] if item["audio"] is not None or item["cached"] is not None else []
                       for item in items]
        if any(item["cached"] is not None for item in items):
            counts = [[len(item["cached"])] if item["cached"] is not None else [] for item in items]
            durations = [[item["duration"]] if item["cached"] is not None else [] for item in items]
            batch = dict(self.processor(conversations, transcripts=transcripts, window_counts=counts,
                                        durations=durations))
            windows = [w for item in items if item["cached"] is not None for w in item["cached"]]
            batch["audio_hidden_states"], batch["audio_step_mask"] = pad_cached(windows)
        else:
            audios = [[item["audio"]] if item["audio"] is not None else [] for item in items]
            batch = dict(self.processor(conversations, audios=audios, transcripts=transcripts))
        if batch["input_ids"].shape[1] > self.max_length:  # only with overlength "truncate"
            for key in ("input_ids", "attention_mask", "labels"):
                batch[key] = batch[key][:, : self.max_length]
            self._check_audio_kept(batch)
        if self.pack_length is not None:
            batch, order = self._pack(batch)
            items = [items[i] for i in order]  # the teacher's rows and the sample ids follow the packed order
        if any(item.get("teacher") for item in items):
            # the text LLM's turns with the same responses: its next-token distributions are the targets
            tokens = [chat_tokens(self.processor.tokenizer, item["teacher"] or item["conversation"]) for item in items]
            teacher = pad_batch([ids for ids, _ in tokens], self.processor.tokenizer.pad_token_id, "right",
                                labels=[labels for _, labels in tokens])
            batch.update({f"teacher_{k}": v for k, v in teacher.items()})
        batch["sample_ids"] = [item["id"] for item in items]
        return batch

    def _pack(self, batch: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """The padded batch's samples packed into balanced rows; returns the packed batch and the
        samples' order in it. The audio windows are put in that order, as the model fills placeholders row by row."""
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        rows = balance_rows(lengths, self.pack_length)
        order = [index for row in rows for index in row]
        samples = [(batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist()) for i, n in enumerate(lengths)]
        packed: dict[str, Any] = pack_rows(samples, rows, self.processor.tokenizer.pad_token_id)
        windows = ((batch["input_ids"] == self.processor.audio_token_id).sum(dim=1)
                   // self.processor.num_queries).tolist()  # audio windows per sample
        first = [sum(windows[:i]) for i in range(len(windows))]
        window_order = torch.tensor([first[i] + k for i in order for k in range(windows[i])], dtype=torch.long)
        for key in ("input_features", "feature_attention_mask", "audio_step_mask"):
            if key in batch:
                packed[key] = batch[key][window_order]  # (windows, ...)
        if "audio_hidden_states" in batch:
            packed["audio_hidden_states"] = batch["audio_hidden_states"][:, window_order]  # (layers, windows, ...)
        return packed, order

    def _check_audio_kept(self, batch: dict[str, Any]) -> None:
        audio_id = self.processor.audio_token_id
        kept = int((batch["input_ids"] == audio_id).sum())
        expected = (batch["input_features"].shape[0] if "input_features" in batch
                    else batch.get("audio_step_mask", torch.zeros(0, 0)).shape[0]) * self.processor.num_queries
        if kept != expected:
            raise ValueError(f"max_length {self.max_length} cuts into the audio positions; raise data.max_length "
                             "or use data.overlength: drop")


class EpochSeededSampler(LengthGroupedSampler):
    """Duration-grouped batches whose order depends only on (seed, epoch), so a resumed run sees the
    same batches as an uninterrupted one."""

    def __init__(self, batch_size: int, lengths: list[float], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next iteration's order is drawn for (the Trainer calls it at each epoch)."""
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()
