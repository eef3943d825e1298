"""Verifiers: does an answer solve the task? Used by self-output, paraphrase and task metrics.

Each verifier is built from a spec ({"kind": ..., options}) and called as verify(answer, gold)
-> (ok, reason). Kinds: last_number, exact_match, json_schema, regex, python_tests (the answer's
code runs with the gold tests in a sandbox: see `python_tests`).

This file is also the sandbox's two helper programs (`python -I verifiers.py supervise|harness`),
which need nothing but the standard library.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import resource
import secrets
import signal
import string
import subprocess
import sys
import tempfile
import time
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


# ----- the python_tests sandbox -----

SOLUTION, TESTS, STDOUT, STDERR = "solution.py", "tests.py", "stdout.txt", "stderr.txt"
# Linux namespace flags (sched.h), mount flags (mount.h) and calls the standard library does not wrap.
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV = 0x1000, 0x4000, 1 << 18, 0x2, 0x4
MOUNT_ATTR_RDONLY, AT_FDCWD, AT_RECURSIVE = 0x1, -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on x86-64 and arm64
PR_SET_CHILD_SUBREAPER = 36


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _libc_call(name: str, *args: Any) -> bool:
    """Call a libc function; whether it returned 0 (False too where there is no such function)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return getattr(libc, name)(*args) == 0
    except (OSError, AttributeError):
        return False


def _set_readonly(path: bytes, readonly: bool, recursive: bool) -> bool:
    attr = _MountAttr(MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    return _libc_call("syscall", SYS_MOUNT_SETATTR, AT_FDCWD, path, AT_RECURSIVE if recursive else 0,
                      ctypes.byref(attr), ctypes.sizeof(attr))


def _isolate(folder: str) -> dict[str, bool]:
    """Move this (single-threaded) process into new user, mount, network and PID namespaces where the kernel
    allows it: no network, its next child is PID 1 of a namespace (everything in it dies with that child),
    and the filesystem is read-only but `folder`. Returns which of these took effect."""
    uid, gid = os.getuid(), os.getgid()
    user = _libc_call("unshare", CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)
    if user:  # the same ids inside, so files keep their owners
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            Path(f"/proc/self/{name}").write_text(text)
    namespaces = user or _libc_call("unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)  # root without userns
    filesystem = namespaces and _libc_call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None) \
        and _libc_call("mount", folder.encode(), folder.encode(), None, MS_BIND, None) \
        and _set_readonly(b"/", True, recursive=True) and _set_readonly(folder.encode(), False, recursive=False)
    return {"network": namespaces, "processes": namespaces, "filesystem": bool(filesystem)}


def _child_setup(isolation: dict[str, bool], limits: dict[str, int]) -> Callable[[], None]:
    """What runs in the sandboxed child before exec: its own /proc (only the sandbox's processes, so no other
    process's environment can be read) and the resource limits."""
    def setup() -> None:
        if isolation["processes"] and _libc_call("unshare", CLONE_NEWNS):
            _libc_call("mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV, None)
        for name, value in limits.items():
            resource.setrlimit(getattr(resource, name), (value, value))

    return setup


def _descendants(ancestor: int) -> list[int]:
    """Every process under `ancestor` (children, their children, ...), from /proc."""
    parents = {int(p): _parent(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found, frontier = [], [ancestor]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _kill_all(child: subprocess.Popen) -> None:
    """Kill the child, its process group and every process left under this one (orphans come to this process,
    a child subreaper), until none is left."""
    for target in (lambda: os.killpg(child.pid, signal.SIGKILL), lambda: os.kill(child.pid, signal.SIGKILL)):
        try:
            target()
        except OSError:
            pass
    child.wait()
    for _ in range(1000):
        left = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == os.getpid()]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _supervise(folder: str, timeout: float, limits: dict[str, int], max_processes: int,
               isolate: bool) -> dict[str, Any]:
    """The sandbox's first process: isolate, start the harness with the limits, an empty environment and the
    pass token on its stdin, wait at most `timeout` seconds while it runs no more than `max_processes`
    processes (RLIMIT_NPROC does not hold for root, so this watch is the process limit), then kill
    whatever is left. Returns the report."""
    token = sys.stdin.readline()
    _libc_call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    isolation = _isolate(folder) if isolate else dict.fromkeys(("network", "processes", "filesystem"), False)
    with open(Path(folder) / STDOUT, "wb") as out, open(Path(folder) / STDERR, "wb") as err:
        child = subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve()), "harness", folder],
                                 cwd=folder, env=_empty_environment(folder), stdin=subprocess.PIPE, stdout=out,
                                 stderr=err, start_new_session=True,
                                 preexec_fn=_child_setup(isolation, limits))  # noqa: PLW1509 - single-threaded here
        try:
            child.stdin.write(token.encode())
            child.stdin.close()
        except OSError:
            pass  # the child is gone already; its status says why
        started = time.monotonic()
        returncode, timed_out, too_many = None, False, False
        while returncode is None and not timed_out and not too_many:
            try:
                returncode = child.wait(0.02)
            except subprocess.TimeoutExpired:
                timed_out = time.monotonic() - started > timeout
                too_many = len(_descendants(os.getpid())) > max_processes
        _kill_all(child)
    return {"returncode": returncode, "timed_out": timed_out, "too_many_processes": too_many,
            "seconds": round(time.monotonic() - started, 3), "isolation": isolation}


def _harness(folder: str) -> None:
    """The sandboxed program: read the pass token (so the code cannot), run the code, then the tests in the same
    namespace, and print the token only when both ran to the end."""
    token = sys.stdin.readline().strip()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    solution, tests = (Path(folder, name).read_text() for name in (SOLUTION, TESTS))
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(solution, SOLUTION, "exec"), namespace)  # noqa: S102 - the sandbox's purpose
    exec(compile(tests, TESTS, "exec"), namespace)  # noqa: S102
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, f"\n{token}\n".encode())
    os._exit(0)


def _empty_environment(folder: str) -> dict[str, str]:
    """No variable of the caller (no tokens, no keys): a home and a temp folder inside the sandbox."""
    return {"HOME": folder, "TMPDIR": folder, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def _tail(path: Path, size: int = 65536) -> str:
    """The last `size` bytes of a file as text ("" when it is missing)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - size))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_sandboxed(code: str, tests: str, timeout: float = 5.0, memory_mb: int = 512, max_file_mb: int = 16,
                  max_processes: int = 16, isolate: bool = True) -> dict[str, Any]:
    """Run `code`, then `tests` (asserts), in the sandbox; the report: passed, returncode, timed_out, the tails
    of stdout and stderr, and which isolation took effect."""
    token = secrets.token_hex(16)
    limits = {"RLIMIT_CPU": int(timeout) + 1, "RLIMIT_AS": memory_mb * 2**20, "RLIMIT_FSIZE": max_file_mb * 2**20,
              "RLIMIT_NOFILE": 256, "RLIMIT_CORE": 0}
    with tempfile.TemporaryDirectory(prefix="desta-verify-", ignore_cleanup_errors=True) as folder:
        Path(folder, SOLUTION).write_text(code)
        Path(folder, TESTS).write_text(tests)
        command = [sys.executable, "-I", str(Path(__file__).resolve()), "supervise", folder, str(timeout),
                   json.dumps(limits), str(max_processes), "1" if isolate else "0"]
        supervisor = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=_empty_environment(folder), start_new_session=True)
        try:
            reply, problem = supervisor.communicate(f"{token}\n".encode(), timeout=timeout + 30)
        finally:
            try:
                os.killpg(supervisor.pid, signal.SIGKILL)  # anything the supervisor left
            except OSError:
                pass
            supervisor.wait()
        lines = reply.decode(errors="replace").strip().splitlines()
        if supervisor.returncode != 0 or not lines:
            raise RuntimeError(f"the verifier sandbox failed ({problem.decode(errors='replace')[-300:]}); if this "
                               "machine's namespaces are the cause, set isolate: false in the verifier spec")
        report = json.loads(lines[-1])
        stdout, stderr = _tail(Path(folder, STDOUT)), _tail(Path(folder, STDERR))
    printed = stdout.rstrip().splitlines()
    passed = report["returncode"] == 0 and bool(printed) and printed[-1] == token
    return {**report, "passed": passed, "stdout": stdout.replace(token, "").rstrip(), "stderr": stderr}


@functools.cache
def sandbox_isolation() -> dict[str, bool]:
    """Which layers of the python_tests sandbox this machine allows (network, processes, filesystem), found by
    running an empty program in it once."""
    return run_sandboxed("", "")["isolation"]


def python_tests(timeout: float = 5.0, memory_mb: int = 512, max_file_mb: int = 16, max_processes: int = 16,
                 isolate: bool = True) -> Verifier:
    """Run the answer's code followed by the gold tests (asserts) in a sandbox; pass only when the tests ran.

    The code runs in a fresh Python (`-I`) with an empty environment (no tokens or keys; HOME and TMPDIR are
    its own temporary folder, also its working directory), in its own session, with limits on CPU time,
    memory, file size (`max_file_mb`) and open files; it is killed, with everything it started, after
    `timeout` seconds of wall time, or as soon as it runs more than `max_processes` processes. A pass needs
    a random token the harness prints only after the tests ran, so exiting early (`os._exit(0)`,
    `sys.exit(0)`) fails. Where Linux allows user namespaces (or as root), `isolate` adds: no network (an
    empty network namespace), a PID namespace (nothing it starts outlives it; its /proc shows only its
    own processes, not other environments), and a read-only filesystem except its folder
    (`sandbox_isolation()` says which took effect).

    Residual risks: without namespaces, the code can reach the network, read the environment of other
    processes of the same user through /proc, write wherever the user can, and a program that calls
    setsid and kills its supervisor can outlive the timeout. With them, it can still read what the user
    can read, and code written to attack the harness (searching the process memory for the token) could
    forge a pass: the sandbox stops accidents and shortcuts, not a determined adversary.
    """

    def verify(answer: str, gold: Any) -> tuple[bool, str]:
        report = run_sandboxed(extract_code(answer), str(gold), timeout, memory_mb, max_file_mb, max_processes,
                               isolate)
        if report["timed_out"]:
            return False, f"timed out after {timeout:g} s"
        if report["too_many_processes"]:
            return False, f"started more than {max_processes} processes"
        if report["passed"]:
            return True, "tests pass"
        if report["returncode"] == 0:
            return False, "exited before the tests finished"
        last = (report["stderr"].strip().splitlines() or [f"killed (status {report['returncode']})"])[-1]
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


if __name__ == "__main__":  # the sandbox's own processes (see run_sandboxed)
    if sys.argv[1] == "supervise":
        print(json.dumps(_supervise(sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5]),
                                    sys.argv[6] == "1")))
    elif sys.argv[1] == "harness":
        _harness(sys.argv[2])
