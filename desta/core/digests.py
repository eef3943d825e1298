"""Content digests: what identifies a setting, a file, a folder's files or a clip, so cached and resumed work is
reused only for the same inputs.

`fingerprint` hashes a JSON-able value, `file_digest` the named files of a folder, `audio_key` one clip,
`file_checksums` every file under a folder (the checkpoints' checksums.json), and `content_digest` a file or a whole
folder in one hash (the model and data files a post-training run reads), `content_fingerprint` a dataset's rows
(what a chunked stage's parts were made from).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset


def fingerprint(value: Any) -> str:
    """A short content hash of a JSON-able value (keys sorted; anything else by its str()).

    >>> fingerprint({"b": 1, "a": [2]}) == fingerprint({"a": [2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_digest(folder: Path, names: tuple[str, ...]) -> str:
    """A content hash of the named files of a folder (those that exist)."""
    digest = hashlib.sha256()
    for name in names:
        if (folder / name).is_file():
            digest.update(name.encode())
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:24]


def audio_key(audio: dict) -> str:
    """What identifies a clip's audio ({"bytes", "path"}): a hash of its bytes, or its path and size."""
    if audio.get("bytes"):
        return hashlib.sha256(audio["bytes"]).hexdigest()[:24]
    path = Path(audio.get("path") or "")
    return f"{path}:{path.stat().st_size if path.is_file() else 'missing'}"


def _add_file(digest: Any, path: Path) -> Any:
    """`digest` updated with a file's bytes, read a MiB at a time (a model's weights need not fit in memory)."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest


def file_checksums(folder: Path, skip: str = "") -> dict[str, str]:
    """SHA-256 of every file under `folder` (but the one named `skip`), by path relative to it."""
    return {str(path.relative_to(folder)): _add_file(hashlib.sha256(), path).hexdigest()
            for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != skip)}


def content_digest(path: Path) -> str:
    """SHA-256 of a file's name and content, or of every file (path relative to the folder, and content) under a
    folder, in path order: a model folder or data file holding other weights or rows gives another digest."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        _add_file(digest, file)
    return digest.hexdigest()


def _digest_default(value: Any) -> str:
    """How `content_fingerprint` writes what JSON cannot: bytes by their SHA-256, anything else by str()."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    return str(value)


def content_fingerprint(dataset: Dataset, columns: list[str] | None = None, extra: Iterable[Any] = ()) -> str:
    """SHA-256 of the rows' values in order (`columns` only, when given; audio bytes by their own hash),
    then of each `extra` item: the same content in the same order gives the same fingerprint, whatever
    path it was read from, and a reordered, edited or replaced source gives another."""
    digest = hashlib.sha256()
    selected = dataset.select_columns(columns) if columns is not None else dataset
    for batch in selected.iter(batch_size=1000):
        names = sorted(batch)
        for values in zip(*(batch[name] for name in names), strict=True):
            digest.update(json.dumps(values, default=_digest_default, ensure_ascii=False).encode())
            digest.update(b"\n")
    for item in extra:
        digest.update(json.dumps(item, default=_digest_default, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()
