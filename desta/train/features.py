"""Frozen-encoder feature cache: Whisper's tapped-layer outputs, computed once per clip.

With the encoder frozen, its hidden states at the tapped layers are the same at every epoch, so
they can be stored and read back instead of running Whisper. Writes CACHE/shard-<digest>.safetensors
(tensor "<clip id>/<window>" of shape (layers, steps, d_model), trimmed to the window's real
steps; the digest names the shard's clips) and CACHE/meta.json (encoder, tapped layers, padding mode,
dtype, the shard of each clip). Built on the GPU when there is one; under `accelerate launch` or
torchrun each process encodes its share of the clips into shards of its own and records them in
CACHE/meta-<rank>.json, and the main process merges those into meta.json once all are done.
Shards are written atomically; an interrupted run keeps finished shards and does the rest.
Disk: layers x 50 steps/s x d_model x 2 bytes in float16, e.g. 0.9 MB per 3 s clip for
Whisper-small with 4 taps, 15 MB per clip for Whisper-large-v3 padded to 30 s (model.pad_to_30s).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from desta.audio import load_audio_ref, split_windows
from desta.core.chunks import write_atomic

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset

    from desta.model.modeling import DestaModel
    from desta.model.processing import DestaProcessor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
META = "meta.json"
PART = "meta-{rank}.json"  # one process's shards not yet merged into META


def cache_signature(model: DestaModel) -> dict[str, Any]:
    """What the cached features depend on; a cache made with other settings is refused."""
    config = model.config
    return {"encoder": config.encoder_name_or_path, "tapped_layers": list(config.tapped_layers),
            "pad_to_30s": config.pad_to_30s, "d_model": config.encoder_config.d_model}


def merge_parts(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with every process's recorded shards (CACHE/meta-<rank>.json) merged in, written to META, the
    parts removed (the main process's job)."""
    parts = sorted(folder.glob(PART.format(rank="*")))
    for part in parts:
        meta["clips"].update(json.loads(part.read_text()))
    write_atomic(folder / META, json.dumps(meta))
    for part in parts:
        part.unlink()
    return meta


@torch.no_grad()
def _encode_clips(model: DestaModel, processor: DestaProcessor, audios: dict[str, np.ndarray], device: torch.device,
                  dtype: torch.dtype, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Encode one batch of clips, by id, into `tensors` ("ID/WINDOW": (layers, steps, d_model) in `dtype`, on the
    CPU); returns each clip's window count."""
    owners, windows = [], []
    for clip_id, audio in audios.items():
        pieces = split_windows(audio)
        owners += [(clip_id, w) for w in range(len(pieces))]
        windows += pieces
    features = {k: v.to(device) for k, v in processor.extract_features(windows).items()}
    hidden, mask = model.encode_audio(**features)  # (layers, windows, steps, d_model), (windows, steps)
    for w, (clip_id, piece) in enumerate(owners):
        tensors[f"{clip_id}/{piece}"] = hidden[:, w, : int(mask[w].sum())].to(dtype).cpu().contiguous()
    return {clip_id: sum(1 for c, _ in owners if c == clip_id) for clip_id in audios}


@torch.no_grad()
def cache_features(model: DestaModel, processor: DestaProcessor, dataset: Dataset, folder: str | os.PathLike,
                   dtype: str = "float16", clips_per_shard: int = 256, batch_size: int = 8,
                   progress: bool = True) -> Path:
    """Compute and store the tapped-layer features of every distinct clip id in `dataset`, on the GPU when there is
    one. Every process of a distributed launch must call it: each encodes its share of the clips (every
    world_size-th), the main process merges their records, and all return once the cache is complete."""
    from desta.core.optim import process_state

    state = process_state()
    folder = Path(folder)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    signature = {**cache_signature(model), "dtype": dtype}
    with state.main_process_first():  # the main process creates or recovers the folder; the others read it after
        folder.mkdir(parents=True, exist_ok=True)
        meta_file = folder / META
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {**signature, "clips": {}}
        found = {k: meta.get(k) for k in signature}
        if found != signature:
            raise ValueError(f"{folder} caches features of another encoder set-up ({found}); this model needs "
                             f"{signature}; use another folder")
        if state.is_main_process:
            meta = merge_parts(folder, meta)  # what an interrupted run's processes recorded
    first_row = {}
    for index, clip_id in enumerate(dataset["id"]):
        first_row.setdefault(clip_id, index)
    todo = [c for c in first_row if c not in meta["clips"]][state.process_index :: state.num_processes]
    encoder = model.whisper.get_encoder()
    home = next(encoder.parameters()).device
    device = state.device if torch.cuda.is_available() else torch.device("cpu")
    encoder.to(device)  # on the GPU when there is one: the cache is built before training moves the model there
    part_file, mine = folder / PART.format(rank=state.process_index), {}
    bar = tqdm(total=len(todo), desc="cache features", unit="clip", disable=not (progress and state.is_main_process))
    try:
        for start in range(0, len(todo), clips_per_shard):
            ids = todo[start : start + clips_per_shard]
            tensors: dict[str, torch.Tensor] = {}
            counts: dict[str, int] = {}
            for batch_start in range(0, len(ids), batch_size):
                batch_ids = ids[batch_start : batch_start + batch_size]
                audios = {c: load_audio_ref(dataset[first_row[c]]["audio"], name=c) for c in batch_ids}
                counts.update(_encode_clips(model, processor, audios, device, DTYPES[dtype], tensors))
                bar.update(len(batch_ids))
            digest = hashlib.blake2b("\n".join(ids).encode(), digest_size=10).hexdigest()
            name = f"shard-{digest}.safetensors"  # named by its clips: unique across processes and runs
            tmp = folder / (name + ".tmp")
            save_file(tensors, tmp)
            os.replace(tmp, folder / name)
            mine.update({clip_id: (name, counts[clip_id]) for clip_id in ids})
            write_atomic(part_file, json.dumps(mine))
    finally:
        encoder.to(home)
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        merge_parts(folder, meta)
    state.wait_for_everyone()
    return folder


class FeatureCache:
    """Read cached features: `cache[clip_id]` -> list of (layers, steps, d_model) tensors, one per window."""

    def __init__(self, folder: str | os.PathLike, model: DestaModel | None = None):
        self.folder = Path(folder)
        meta_file = self.folder / META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found; build the cache with `desta cache-features`")
        self.meta = json.loads(meta_file.read_text())
        if model is not None:
            expected = cache_signature(model)
            found = {k: self.meta.get(k) for k in expected}
            if found != expected:
                raise ValueError(f"{self.folder} holds features for {found}, but the model needs {expected}")
        self._handles: dict[int, Any] = {}

    def __getitem__(self, clip_id: str) -> list[torch.Tensor]:
        if clip_id not in self.meta["clips"]:
            raise KeyError(f"clip {clip_id!r} is not in the feature cache {self.folder}; rerun cache-features")
        shard, count = self.meta["clips"][clip_id]
        if shard not in self._handles:  # a file name; a number in caches built before shards were named by content
            name = shard if isinstance(shard, str) else f"shard-{shard:05d}.safetensors"
            self._handles[shard] = safe_open(str(self.folder / name), framework="pt")
        handle = self._handles[shard]
        return [handle.get_tensor(f"{clip_id}/{w}").float() for w in range(count)]

    def __getstate__(self):  # dataloader workers open their own file handles
        return {**self.__dict__, "_handles": {}}


def pad_cached(windows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached windows (layers, steps_i, d_model) -> (layers, windows, max_steps, d_model) and a step mask."""
    layers, _, width = windows[0].shape
    longest = max(w.shape[1] for w in windows)
    hidden = windows[0].new_zeros(layers, len(windows), longest, width)
    mask = torch.zeros(len(windows), longest, dtype=torch.bool)
    for i, window in enumerate(windows):
        hidden[:, i, : window.shape[1]] = window
        mask[i, : window.shape[1]] = True
    return hidden, mask
