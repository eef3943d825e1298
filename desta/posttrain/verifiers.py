"""Verifiers: does an answer solve the task? Used by self-output, paraphrase and task metrics.

Each verifier is built from a spec ({"kind": ..., options}) and called as verify(answer, gold)
-> (ok, reason). Kinds: last_number, exact_match, json_schema, regex, python_tests (the answer's
code runs with the gold tests in a subprocess with a time and memory limit).
"""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

Verifier = Callable[[str, Any], tuple[bool, str]]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(answer: str, gold: Any) -> tuple[bool, str]:
    """The last number in the answer equals the gold number.

    >>> last_number("37 + 48 = 85, so the answer is 85.", "85")
    (True, 'last number 85')
    """
    found = NUMBER.findall(answer)
    if not found:
        return False, "no number"
    value = float(found[-1].replace(",", ""))
    ok = abs(value - float(str(gold).replace(",", ""))) < 1e-6
    return ok, f"last number {found[-1]}"


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation and articles, squeeze spaces.

    >>> normalize_text("The  Eiffel Tower!")
    'eiffel tower'
    """
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(answer: str, gold: Any) -> tuple[bool, str]:
    """The answer equals the gold text after `normalize_text`.

    >>> exact_match("The Eiffel Tower.", "eiffel tower")
    (True, 'exact match')
    """
    ok = normalize_text(answer) == normalize_text(str(gold))
    return ok, "exact match" if ok else "differs after normalisation"


def json_schema(schema: dict) -> Verifier:
    """A verifier that accepts an answer parsing as JSON (a ``` fence around it allowed) valid against `schema`;
    the gold is not used."""
    import jsonschema

    def verify(answer: str, gold: Any = None) -> tuple[bool, str]:
        text = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", answer.strip())
        try:
            jsonschema.validate(json.loads(text), schema)
        except json.JSONDecodeError:
            return False, "not valid JSON"
        except jsonschema.ValidationError as err:
            return False, f"schema: {err.message[:80]}"
        return True, "valid against the schema"

    return verify


def regex(pattern: str) -> Verifier:
    """A verifier that accepts an answer in which `pattern` matches somewhere (`.` matches newlines too);
    the gold is not used.

    >>> regex("Paris")("It is Paris.", None)
    (True, 'matches')
    """
    compiled = re.compile(pattern, re.S)

    def verify(answer: str, gold: Any = None) -> tuple[bool, str]:
        ok = compiled.search(answer) is not None
        return ok, "matches" if ok else f"does not match {pattern!r}"

    return verify


def extract_code(answer: str) -> str:
    """The first ```python block, or the whole answer."""
    match = re.search(r"```(?:python|py)?\s*\n(.*?)```", answer, re.S)
    return match.group(1) if match else answer


def python_tests(timeout: float = 5.0, memory_mb: int = 512) -> Verifier:
    """Run the answer's code followed by the gold tests (asserts) in a fresh Python process.

    The child gets `timeout` seconds of wall time, the same of CPU time and `memory_mb` of address
    space; nothing from the parent is shared but the interpreter.
    """

    def limits() -> None:  # runs in the child before exec
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout) + 1, int(timeout) + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))

    def verify(answer: str, gold: Any) -> tuple[bool, str]:
        with tempfile.TemporaryDirectory() as folder:
            script = Path(folder) / "check.py"
            script.write_text(extract_code(answer) + "\n\n" + str(gold) + "\n")
            try:
                result = subprocess.run([sys.executable, "-I", str(script)], cwd=folder, capture_output=True,
                                        text=True, timeout=timeout, preexec_fn=limits)
            except subprocess.TimeoutExpired:
                return False, f"timed out after {timeout:g} s"
        if result.returncode == 0:
            return True, "tests pass"
        last = (result.stderr.strip().splitlines() or ["killed"])[-1]
        return False, f"tests fail: {last[:120]}"

    return verify


def make_verifier(spec: dict[str, Any]) -> Verifier:
    """A verifier from its spec, e.g. {"kind": "python_tests", "timeout": 2}."""
    kind = spec.get("kind")
    options = {k: v for k, v in spec.items() if k != "kind"}
    if kind == "last_number":
        return last_number
    if kind == "exact_match":
        return exact_match
    if kind == "json_schema":
        return json_schema(options["schema"])
    if kind == "regex":
        return regex(options["pattern"])
    if kind == "python_tests":
        return python_tests(**options)
    raise ValueError(f"unknown verifier {kind!r}; choose last_number, exact_match, json_schema, regex or "
                     "python_tests")
