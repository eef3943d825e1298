"""The training data path: targets rows -> examples -> lazily decoded items -> padded batches.

Reads a targets dataset (OUT/dataset of `desta targets`) and optional text-only replay rows.
`speech_examples` / `text_examples` build chat examples with the processor's speech turn;
`DestaDataset` decodes audio (or reads the feature cache) only when a batch needs it;
`DestaCollator` pads a batch (or packs it: several samples per row, each isolated); `EpochSeededSampler`
groups clips of similar duration into batches whose order depends only on (seed, epoch), so a resumed run
sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from desta.audio import SAMPLE_RATE, load_audio_ref, num_windows
from desta.core.chunks import read_jsonl, saved_empty
from desta.core.digests import fingerprint
from desta.core.optim import process_state
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
    # The column read in batches: Dataset.unique on an index-mapped table (a held-out split) first rewrites the
    # whole table, audio included (minutes and gigabytes at 100k rows)
    found = {v for batch in dataset.select_columns(["system_prompt"]).iter(batch_size=10_000)
             for v in batch["system_prompt"]}
    if len(found) > 1:
        raise ValueError(f"the targets rows were written with {len(found)} different system prompts "
                         f"({sorted(found)[:3]}); train on one targets run, or set data.system_prompt")
    return found.pop() or None


def load_text_rows(path: str) -> list[dict[str, str]]:
    """Text-only replay rows (instruction, response) from a JSONL file or a dataset folder."""
    from datasets import load_from_disk

    if Path(path).is_file():
        rows = read_jsonl(path)
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


# The columns of a targets row a training example reads (those the table has; description only to distil).
EXAMPLE_COLUMNS = ("id", "audio", "prompt", "response", "duration", "transcript", "description")
DEFAULT_DURATION = 10.0  # seconds assumed for rows of targets datasets made before the duration column


def _seconds(duration: float | None) -> float:
    return DEFAULT_DURATION if duration is None else float(duration)


def example_of(row: dict[str, Any], processor: DestaProcessor, teacher: bool = False) -> Example:
    """One targets row as a training example: the processor's speech turn with the row's prompt and response; with
    `teacher`, also the text LLM's turn (description + prompt) with the same response, for distillation."""
    prompt, response = row["prompt"], row["response"]
    return Example(id=row["id"], audio=row["audio"], transcript=row.get("transcript"),
                   duration=_seconds(row.get("duration")),
                   conversation=processor.conversation(prompt, response),
                   teacher=text_turn(row["description"], prompt, processor.system_prompt)
                   + [{"role": "assistant", "content": response}] if teacher else None)


class ExampleTable(Sequence):
    """Training examples read lazily from a targets table: the Arrow table stays memory-mapped and each example is
    built when a batch asks for it (no Python object per row is held, whatever the table's size), followed by
    `extra` examples held in a list (text-only replay rows). `table + [examples]` appends to the extra ones."""

    def __init__(self, dataset: Dataset, processor: DestaProcessor, teacher: bool = False,
                 extra: list[Example] | None = None):
        columns = [c for c in EXAMPLE_COLUMNS if c in dataset.column_names and (teacher or c != "description")]
        self.dataset = dataset.select_columns(columns)
        self.processor, self.teacher, self.extra = processor, teacher, list(extra or [])

    def __len__(self) -> int:
        return len(self.dataset) + len(self.extra)

    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        index %= len(self)
        if index >= len(self.dataset):
            return self.extra[index - len(self.dataset)]
        return example_of(self.dataset[index], self.processor, self.teacher)

    def __add__(self, extra: list[Example]) -> ExampleTable:
        return ExampleTable(self.dataset, self.processor, self.teacher, [*self.extra, *extra])

    def select(self, rows: Iterable[int], extra: list[Example]) -> ExampleTable:
        """These rows of the table (indices into it) and these extra examples."""
        rows = list(rows)
        dataset = self.dataset if rows == list(range(len(self.dataset))) else self.dataset.select(
            rows, keep_in_memory=True)  # an index mapping in memory: nothing written beside the dataset
        return ExampleTable(dataset, self.processor, self.teacher, extra)

    def durations(self) -> list[float]:
        """Each example's clip length in seconds (0 for text-only rows), read from the table's column."""
        speech = (self.dataset["duration"] if "duration" in self.dataset.column_names
                  else [DEFAULT_DURATION] * len(self.dataset))
        return [_seconds(d) for d in speech] + [e.duration for e in self.extra]

    def token_counts(self, cache: Path | None = None) -> list[int]:
        """The sequence length of every example (`token_count`). The table's are computed once, in batches, and kept
        in `cache` (a folder; the file is named by the table's fingerprint and the processor's settings): the
        main process writes it while the others wait, then they, and a later run, read it."""
        speech = self.dataset.select_columns([c for c in ("prompt", "response", "duration", "transcript")
                                              if c in self.dataset.column_names])

        def count() -> np.ndarray:  # (rows,) read in batches: an index-mapped table is not copied
            return np.array([n for batch in speech.iter(batch_size=1000)
                             for n in _row_token_counts(batch, self.processor)["tokens"]], dtype=np.int64)

        if cache is None or len(speech) == 0:
            counts = count()
        else:
            cache.mkdir(parents=True, exist_ok=True)
            name = cache / f"token-counts-{_counts_key(self.dataset, self.processor)}.npy"
            with process_state().main_process_first():
                if not name.is_file():
                    tmp = name.with_suffix(".tmp.npy")
                    np.save(tmp, count())
                    os.replace(tmp, name)
                counts = np.load(name)  # plain integers: no pickle allowed or needed
        return counts.tolist() + [token_count(self.processor, e) for e in self.extra]


def _counts_key(dataset: Dataset, processor: DestaProcessor) -> str:
    """What a table's token counts depend on, digested: its content fingerprint and the processor's settings."""
    tokenizer = processor.tokenizer
    settings = {"fingerprint": dataset._fingerprint, "tokenizer": tokenizer.name_or_path, "vocab": len(tokenizer),
                "template": tokenizer.chat_template, "system_prompt": processor.system_prompt,
                "audio_token": processor.audio_token, "num_queries": processor.num_queries,
                "transcript_max_tokens": processor.transcript_max_tokens,
                "transcript_format": processor.transcript_format}
    return fingerprint(settings)


def _row_token_counts(batch: dict[str, list], processor: DestaProcessor) -> dict[str, list[int]]:
    """`token_count` of a batch of targets rows (columns prompt, response and maybe duration, transcript)."""
    size = len(batch["prompt"])
    texts = [processor.render(processor.conversation(prompt, response))
             for prompt, response in zip(batch["prompt"], batch["response"], strict=True)]
    lengths = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False).input_ids]
    durations = [_seconds(d) for d in batch.get("duration", [None] * size)]
    transcripts = batch.get("transcript", [None] * size)
    return {"tokens": [n + audio_positions(processor, d, t)
                       for n, d, t in zip(lengths, durations, transcripts, strict=True)]}


def speech_examples(dataset: Dataset, processor: DestaProcessor, teacher: bool = False) -> ExampleTable:
    """One example per targets row (`example_of`), read lazily (`ExampleTable`); with `teacher`, each also holds the
    text LLM's turn for distillation."""
    if teacher and "description" not in dataset.column_names:
        raise ValueError("distillation (optim.loss kl or on_policy) needs the targets' description column; train on "
                         "the output of desta targets")
    return ExampleTable(dataset, processor, teacher)


def text_examples(rows: list[dict[str, str]], count: int, seed: int, system_prompt: str | None) -> list[Example]:
    """`count` replay rows drawn with replacement (seeded), as text-only chat examples."""
    return [Example(id=f"text-{i}", audio=None, transcript=None, duration=0.0,
                    conversation=with_system([{"role": "user", "content": row["instruction"]},
                                              {"role": "assistant", "content": row["response"]}], system_prompt))
            for i, row in enumerate(draw(rows, count, seed))]


def audio_positions(processor: DestaProcessor, duration: float, transcript: str | None) -> int:
    """Positions a clip adds to its sequence besides its one placeholder token: its windows' connector vectors
    and its transcript's tokens."""
    windows = num_windows(int(duration * SAMPLE_RATE))
    return windows * processor.num_queries - 1 + len(processor.transcript_ids(transcript, duration))


def token_count(processor: DestaProcessor, example: Example) -> int:
    """Sequence length the processor will produce (audio positions and transcript included)."""
    count = len(processor.tokenizer(processor.render(example.conversation), add_special_tokens=False).input_ids)
    if example.audio is not None:
        count += audio_positions(processor, example.duration, example.transcript)
    return count


def apply_length_rule(processor: DestaProcessor, examples: ExampleTable | list[Example], max_length: int,
                      rule: str, cache: Path | None = None) -> tuple[ExampleTable | list[Example], int]:
    """Drop sequences over the budget (rule "drop"), or keep them for the collator to cut ("truncate").
    Returns the examples kept and how many were over; a table's token counts are kept in `cache`
    (`ExampleTable.token_counts`)."""
    if isinstance(examples, ExampleTable):
        over = [n > max_length for n in examples.token_counts(cache)]
    else:
        over = [token_count(processor, e) > max_length for e in examples]
    if rule != "drop":
        return examples, sum(over)
    if isinstance(examples, ExampleTable):
        rows = len(examples.dataset)
        return examples.select([i for i in range(rows) if not over[i]],
                               [e for e, long in zip(examples.extra, over[rows:], strict=True) if not long]), sum(over)
    return [e for e, long in zip(examples, over, strict=True) if not long], sum(over)


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
