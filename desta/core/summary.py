"""What a stage returns: its figures and the summary its command prints.

Every `desta` command runs a stage function; the function returns a `Summary`, a dict of its figures (what
Python callers and summary.json read) whose `str` is the text the command prints when it ends, so the command
line never re-reads what a stage wrote nor guesses which stage ran.
"""

from __future__ import annotations

from typing import Any


class Summary(dict):
    """A stage's figures (the dict) and the lines its command ends with (`str(summary)`); `failed` when the run
    finished but some of its work did not (the command then exits 1).

    >>> done = Summary({"rows": 3, "failed": 1}, "answered 2 of 3 rows", failed=True)
    >>> done["rows"], str(done), done.failed
    (3, 'answered 2 of 3 rows', True)
    """

    def __init__(self, figures: dict[str, Any], text: str = "", failed: bool = False):
        super().__init__(figures)
        self.text = text
        self.failed = failed

    def __str__(self) -> str:
        return self.text
