"""The python_tests sandbox against what model-written code was seen doing: each escape, closed."""

import os
import socket
import uuid

import pytest

from desta.posttrain.verifiers import python_tests, run_sandboxed, sandbox_isolation

ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"


def _needs(layer):
    if not sandbox_isolation()[layer]:
        pytest.skip(f"this kernel does not allow the sandbox's {layer} isolation (see python_tests' residual risks)")


@pytest.mark.parametrize("exit_call", ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit",
                                       "print('tests pass')\nimport os\nos._exit(0)"])
def test_exiting_before_the_asserts_does_not_pass(exit_call):
    ok, reason = python_tests(timeout=5)(WRONG + exit_call, ADD_TESTS)
    assert (ok, reason) == (False, "exited before the tests finished")
    assert python_tests(timeout=5)(RIGHT, ADD_TESTS) == (True, "tests pass")


def test_environment_is_empty_and_secrets_never_come_back(monkeypatch):
    secret, key = "hf_" + uuid.uuid4().hex, "desta-" + uuid.uuid4().hex
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("DESTA_API_KEY", key)
    snoop = ("import os\nfound = [os.environ.get(n) for n in ('HF_TOKEN', 'DESTA_API_KEY')]\n"
             "assert False, repr(found) + ' ' + repr(sorted(os.environ))\n")
    ok, reason = python_tests(timeout=5)(snoop, ADD_TESTS)
    assert not ok and "[None, None] ['HOME', 'LANG', 'PATH', 'TMPDIR']" in reason
    report = run_sandboxed("import os\nprint(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'], "
                           "sorted(os.listdir('.')))", "")
    assert report["passed"] and report["stdout"] == "True ['solution.py', 'stderr.txt', 'stdout.txt', 'tests.py']"


def test_other_processes_environments_cannot_be_read(monkeypatch):
    _needs("processes")
    secret = "hf_" + uuid.uuid4().hex
    monkeypatch.setenv("HF_TOKEN", secret)
    scan = ("import os\nfound = []\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n        found.append(open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace'))\n"
            "    except OSError:\n        pass\nprint(len(found), 'hf_' in ' '.join(found))\n")
    report = run_sandboxed(scan, "")
    assert report["passed"] and report["stdout"] == "1 False" and secret not in report["stdout"] + report["stderr"]


def test_no_network(tmp_path):
    _needs("network")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = (f"import socket\nfor host in ('127.0.0.1', '1.1.1.1'):\n    try:\n"
            f"        socket.create_connection((host, {port}), timeout=2)\n        print('connected', host)\n"
            f"    except OSError as err:\n        print('refused', host, err.errno)\n")
    report = run_sandboxed(code, "")
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()
    assert "connected" not in report["stdout"] and report["stdout"].count("refused") == 2


def test_files_outside_its_folder_cannot_be_written(tmp_path):
    _needs("filesystem")
    targets = [tmp_path / "escaped.txt", f"/tmp/desta-escape-{uuid.uuid4().hex}"]
    code = "".join(f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError as err:\n    print(err.strerror)\n"
                   for t in targets) + "open('inside.txt', 'w').write('fine')\n"
    report = run_sandboxed(code, "assert open('inside.txt').read() == 'fine'")
    assert report["passed"] and report["stdout"].splitlines() == ["Read-only file system"] * 2
    assert not any(os.path.exists(t) for t in targets)


def test_a_100_mb_file_is_refused():
    ok, reason = python_tests(timeout=10)("open('big.bin', 'wb').write(b'x' * 100 * 2**20)\n" + RIGHT, ADD_TESTS)
    assert not ok and "File too large" in reason


@pytest.mark.parametrize("isolate", [True, False])
def test_process_limit(isolate):
    marker = f"desta-bomb-{uuid.uuid4().hex}"
    sleeper = f"[sys.executable, '-c', 'import time; time.sleep(30)', '{marker}']"
    code = f"import subprocess, sys, time\nkids = [subprocess.Popen({sleeper}) for _ in range(40)]\ntime.sleep(30)\n"
    ok, reason = python_tests(timeout=20, max_processes=8, isolate=isolate)(code + RIGHT, ADD_TESTS)
    assert (ok, reason) == (False, "started more than 8 processes") and not _running(marker)


def _running(marker):
    """Processes on this machine whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                found.append(pid)
        except OSError:
            pass
    return found


DAEMON = """import os, subprocess, sys
if os.fork() == 0:  # a double fork and a new session: the grandchild belongs to no one and no group
    os.setsid()
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "{marker}"], start_new_session=True)
    os._exit(0)
os.wait()
"""


@pytest.mark.parametrize("isolate", [True, False])
@pytest.mark.parametrize("then", ["", "while True:\n    pass\n"])  # exits at once, or is killed at the timeout
def test_nothing_it_started_outlives_it(isolate, then):
    marker = f"desta-grandchild-{uuid.uuid4().hex}"
    report = run_sandboxed(DAEMON.format(marker=marker) + "import time\ntime.sleep(0.5)\n" + then, "", timeout=3,
                           isolate=isolate)
    assert report["timed_out"] == bool(then)
    assert not _running(marker)

