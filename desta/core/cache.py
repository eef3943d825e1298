"""Answers stored under a key of everything they depend on (weights, items, settings), so an interrupted or
repeated run, or another run on the same items, computes each only once. Writes CACHE/<fingerprint>.json."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from desta.core.chunks import write_atomic
from desta.core.digests import fingerprint


class AnswerCache:
    """A folder of computed values by key; no folder: nothing is kept.

    >>> import tempfile
    >>> cache = AnswerCache(tempfile.mkdtemp())
    >>> cache.get({"kind": "square", "x": 3}, lambda x: x * x, 3), cache.get({"kind": "square", "x": 3}, print, 0)
    (9, 9)
    """

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: dict[str, Any], compute: Callable[..., Any], *args: Any) -> Any:
        """The stored value for `key`, else `compute(*args)`, stored."""
        if self.folder is None:
            return compute(*args)
        path = self.folder / f"{fingerprint(key)}.json"
        if path.is_file():
            return json.loads(path.read_text())["value"]
        value = compute(*args)
        write_atomic(path, json.dumps({"key": key, "value": value}))
        return value
