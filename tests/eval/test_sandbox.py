"""The bubblewrap sandbox against a corpus of hostile programs.

Each hostile program is a HumanEval-shaped problem whose test passes only if the attack worked
(the planted secret was read, a file outside the temp dir was written, the host's listener got a
byte, ...). Every one must be contained and scored failed or timed out, the evaluator must
survive, and the scores must not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import threading
import time

import pytest

from evolm.eval import sandbox
from evolm.eval.humaneval import Problem, execute_completions
from evolm.eval.sandbox import RunResult, SandboxConfig, SandboxUnavailableError, run_program, run_programs

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason=f"bubblewrap is not installed ({sandbox.INSTALL_HINT})"
)

FAST = SandboxConfig(timeout_s=1.5)
REPO_FILE = os.path.join(os.path.dirname(__file__), "evolm_sandbox_escape.txt")
PREFIX_FILE = os.path.join(sys.base_prefix, "evolm_sandbox_escape.txt")  # the Python the sandbox runs


def _problem(name: str, check: str) -> Problem:
    """A problem ``def f():`` whose test is ``check`` (a body indented by 4, ``c`` is the candidate)."""
    test = "def check(c):\n" + "".join(f"    {line}\n" for line in check.splitlines())
    return Problem(f"hostile/{name}", "def f():\n", "f", "", test)


def _body(code: str) -> str:
    return "".join(f"    {line}\n" for line in code.splitlines())


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture()
def listener():
    """A TCP listener on the host's loopback; records whatever connects."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                got.append(conn.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], got
    stop.set()
    thread.join()
    server.close()


def _corpus(tmp_path, port: int, secret: str) -> dict[str, tuple[Problem, str, set[str]]]:
    """name -> (problem, completion, allowed statuses); ``secret`` is planted in a file and the environment."""
    secret_file = tmp_path / "planted" / "secret.txt"
    secret_file.parent.mkdir()
    secret_file.write_text(secret)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "marker").write_text("host dir")
    targets = [REPO_FILE, PREFIX_FILE, "/usr/escaped.txt", "/escaped.txt", "/root/escaped.txt", "/dev/escaped.txt"]
    failed, timed_out = {"failed"}, {"timed out"}
    either = failed | timed_out
    one = "assert c() == 1"
    knows_secret = f"assert __import__('hashlib').sha256(c().encode()).hexdigest() == {_sha(secret)!r}"
    connect = "import socket\ns = socket.create_connection("
    # passes only if the process really died (inside a user namespace the kernel ignores the kill)
    gone = "import time\ntime.sleep(0.3)\nassert not os.path.exists(f'/proc/{{{}}}')\nreturn 1"
    table = [  # name, test body, completion body, allowed statuses
        ("fork_bomb", "c()", "import os\nwhile True:\n    os.fork()", either),
        (
            "fork_bomb_ignoring_errors",
            "c()",
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
            timed_out,
        ),
        ("memory_bomb", "assert c() > 0", "return len(bytearray(1 << 40))", failed),
        ("memory_growth", "assert c() > 0", "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 26))", either),
        ("infinite_loop", one, "while True:\n    pass", timed_out),
        ("sleep_forever", one, "import time\ntime.sleep(10**6)\nreturn 1", timed_out),
        (
            "write_outside_tmp",
            f"assert c() == {len(targets) + 1}",
            "import os\nwritten = 0\n"
            f"for p in {targets!r}:\n"
            "    try:\n        open(p, 'w').write('escaped')\n        written += 1\n    except OSError:\n        pass\n"
            f"if os.path.exists({str(outside / 'marker')!r}):  # the host's dir, not one made in the sandbox\n"
            f"    open({str(outside / 'escaped.txt')!r}, 'w').write('escaped')\n    written += 1\n"
            "return written",
            failed,
        ),
        ("read_planted_secret", knows_secret, f"return open({str(secret_file)!r}).read()", failed),
        ("read_secret_env", knows_secret, "import os\nreturn os.environ.get('EVOLM_TEST_SECRET', '')", failed),
        ("socket_to_host", one, f"{connect}('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')\nreturn 1", failed),
        ("socket_to_internet", one, f"{connect}('1.1.1.1', 53), timeout=1)\ns.sendall(b'x')\nreturn 1", either),
        ("kill_parent", one, f"import os\nppid = os.getppid()\nos.kill(ppid, 9)\n{gone.format('ppid')}", failed),
        ("kill_pid_1", one, f"import os\nos.kill(1, 9)\n{gone.format(1)}", failed),
        ("kill_evaluator", one, f"import os\nos.kill({os.getpid()}, 9)\nreturn 1", failed),
        ("kill_everything", one, "import os, signal\nos.kill(-1, signal.SIGKILL)\nreturn 1", failed),
        ("exit_zero_early", one, "import sys\nsys.exit(0)", failed),
        ("os_exit_zero", one, "import os\nos._exit(0)", failed),
        ("forge_passed_line", one, "import os\nos.write(1, b'\\npassed\\n')\nos._exit(0)", failed),
        (
            "pass_from_forked_child",
            one,
            "import os, time\nif os.fork():\n    time.sleep(0.3)\n    raise RuntimeError('parent')\nreturn 1",
            failed,
        ),
        ("output_flood", one, "while True:\n    print('x' * 65536)", either),
    ]
    return {name: (_problem(name, check), _body(body), allowed) for name, check, body, allowed in table}


def _uid_processes(uid: int) -> list[int]:
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and _owner(e.path) == uid]


def _owner(path: str) -> int | None:
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def test_hostile_corpus_is_contained_and_independent_of_workers(tmp_path, listener, monkeypatch):
    port, received = listener
    secret = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("EVOLM_TEST_SECRET", secret)
    corpus = _corpus(tmp_path, port, secret)
    names = list(corpus)
    problems = [corpus[n][0] for n in names]
    completions = [[corpus[n][1]] for n in names]
    # the same harness passes an honest program, so failures below are the sandbox's doing
    honest = Problem("honest", "def f():\n", "f", "", "def check(c):\n    assert c() == 1\n")
    problems.append(honest)
    completions.append(["    import os, tempfile\n    open('/tmp/x', 'w').write('ok')\n    return 1\n"])
    start = time.perf_counter()
    by_workers = {w: execute_completions(problems, completions, FAST, workers=w) for w in (1, 2)}
    elapsed = time.perf_counter() - start

    for w, results in by_workers.items():
        outcome = {p.task_id: rs[0] for p, rs in zip(problems, results, strict=True)}
        assert outcome["honest"].passed, outcome["honest"]
        for name in names:
            r = outcome[f"hostile/{name}"]
            assert r.status in corpus[name][2], (w, name, r)
            assert r.wall_s < FAST.timeout_s + 5, (w, name, r)
    # the score is independent of the worker count; so is the status of every program whose outcome
    # is not a race (a fork bomb may hit its process limit and fail, or spin until the wall clock)
    scores = {w: [rs[0].passed for rs in results] for w, results in by_workers.items()}
    assert scores[1] == scores[2]
    steady = [i for i, n in enumerate(names) if len(corpus[n][2]) == 1]
    statuses = {w: [results[i][0].status for i in steady] for w, results in by_workers.items()}
    assert statuses[1] == statuses[2]

    # nothing escaped
    assert received == []
    assert not (tmp_path / "outside" / "escaped.txt").exists()
    for path in (REPO_FILE, PREFIX_FILE, "/usr/escaped.txt", "/escaped.txt", "/root/escaped.txt", "/dev/escaped.txt"):
        assert not os.path.exists(path)
    # the evaluator survived (this line runs) and no sandboxed process outlived its run
    if os.geteuid() == 0:
        for slot in range(2):
            assert _uid_processes(FAST.uid_base + slot) == []
    assert elapsed < 120


def test_limits_are_reported():
    cfg = SandboxConfig(timeout_s=1.0)
    loop = run_program("while True:\n    pass\n", cfg)
    assert loop.status == "timed out" and 1.0 <= loop.wall_s < 3.0
    assert "wall-clock" in loop.detail
    big = run_program("open('/tmp/big', 'wb').write(b'x' * (20 << 20))\n", SandboxConfig(max_file_mb=1))
    assert big.status == "failed" and "File too large" in big.detail
    ok = run_program("open('/tmp/small', 'wb').write(b'x' * (512 << 10))\n", SandboxConfig(max_file_mb=1))
    assert ok.passed, ok
    tmpfs = run_program(
        "for i in range(8):\n    open(f'/tmp/{i}', 'wb').write(b'x' * (1 << 20))\n", SandboxConfig(tmpfs_mb=2)
    )
    assert tmpfs.status == "failed" and "No space left" in tmpfs.detail


def test_sandbox_view_of_the_machine():
    probe = (
        "import os, socket\n"
        "env = dict(os.environ)\n"
        "assert set(env) <= {'PATH', 'HOME', 'LANG', 'PYTHONHASHSEED', 'PWD'}, env\n"
        "assert os.getcwd() == '/tmp'\n"
        "assert os.getuid() != 0 and os.geteuid() != 0\n"
        "assert not os.path.exists('/etc') and not os.path.exists('/work') and not os.path.exists('/home')\n"
        "assert sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [1, 2]\n"
        "assert [n for _, n in socket.if_nameindex()] == ['lo']\n"
    )
    r = run_program(probe, SandboxConfig())
    assert r.passed, r


def test_missing_bwrap_refuses_to_run(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailableError, match="apt-get install -y bubblewrap"):
        run_programs(["assert True\n"], SandboxConfig())


def test_bad_config_is_a_clear_error():
    from evolm.errors import ConfigError

    with pytest.raises(ConfigError, match="timeout_s=0"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ConfigError, match="max_processes=0"):
        SandboxConfig(max_processes=0)
    with pytest.raises(ConfigError, match="workers=0"):
        run_programs([], SandboxConfig(), workers=0)


def test_run_result_passed_property():
    assert RunResult("passed", "", 0.1).passed
    assert not RunResult("timed out", "x", 0.1).passed
