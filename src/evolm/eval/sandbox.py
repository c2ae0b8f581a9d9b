"""Running untrusted Python (model-written code) inside an OS-level sandbox.

Functional-correctness benchmarks such as HumanEval (Chen et al., 2021, "Evaluating Large Language
Models Trained on Code") score a completion by running it. The reference harness ``exec``s the code
in a forked process after disabling a list of dangerous functions; a guard list is not isolation
(code can re-import what was removed, fork, allocate, open sockets). Here every program runs in its
own process under bubblewrap (``bwrap``, the sandbox behind Flatpak), which builds Linux namespaces:

    evaluator (host)
      └─ bwrap                         new session, killed with its whole process group on timeout
           └─ bwrap (pid 1)             new pid / net / ipc / uts / cgroup namespaces; dies with parent
                └─ python -S -s -B -P -c HARNESS     (pid 2)
                     rlimits: CPU, AS, FSIZE, NPROC, CORE=0; drops to an unprivileged uid
                     exec(program)      the untrusted code

What the program sees:

- **Filesystem**: ``/usr`` (and the ``/bin``, ``/lib*`` links into it) and the Python installation,
  read-only; fresh ``/dev`` and ``/proc`` (of its own pid namespace); a size-limited tmpfs at
  ``/tmp`` (its working directory) as the only writable place. Home directories, ``/etc``, the
  repository, the host's ``/tmp`` and everything else are absent.
- **Network**: a new network namespace holding only its own loopback device: nothing outside the
  sandbox, the host's loopback included, is reachable.
- **Processes**: only its own; host pids, the evaluator included, do not exist in its namespace.
- **Environment**: cleared; ``PATH``, ``HOME=/tmp``, ``LANG`` and ``PYTHONHASHSEED=0`` only.
- **Identity**: never host root. When the evaluator runs as root the harness drops to a uid of its
  own per worker slot (``uid_base + slot``), so ``RLIMIT_NPROC`` (which the kernel does not apply
  to uid 0) counts only that sandbox's processes, and a slot is reused only once no process of its
  uid is left; otherwise bwrap maps the caller's uid inside a new user namespace, where the count is
  per namespace and creating further user namespaces is disabled.
- **Limits**: CPU seconds, address space per process, file size, processes (threads included) and
  no core dumps, set by the harness before the program is compiled; plus a wall-clock timeout after
  which the whole tree is SIGKILLed (bwrap's pid 1 dies with its parent, and the kernel kills every
  process of a pid namespace whose init exits). The worst-case memory of one sample is therefore
  ``max_processes * memory_mb`` plus ``tmpfs_mb``.

Scoring: a program passes only if it runs to its end and the harness, in the original process,
then prints a random per-run token with ``passed`` and exits 0. Raising, ``sys.exit``,
``os._exit``, being killed, hitting a limit or the timeout are failures; lines written by the
program or its forked children do not count. The sandbox contains what code can do to the machine;
like every in-process harness it cannot stop code that deliberately forges its own test result
from inside the interpreter (for example by inspecting the harness's frame).

Bubblewrap is required: without it ``run_programs`` raises ``SandboxUnavailableError`` naming the
install command, and never falls back to running code unsandboxed.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from evolm.errors import ConfigError, EvolmError

INSTALL_HINT = "apt-get install -y bubblewrap"

# Runs first inside the sandbox, as trusted code: reads the token and the program from stdin,
# sets the rlimits, drops root, runs the program and reports from the original process only.
_HARNESS = r"""
import os, resource, sys
def _harness():
    uid, nproc, cpu, mem, fsize = (int(a) for a in sys.argv[1:6])
    token = sys.stdin.readline().strip()
    source = sys.stdin.read()
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for what, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, mem, mem),
        (resource.RLIMIT_FSIZE, fsize, fsize),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(what, (soft, hard))
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            os._exit(3)
    me = os.getpid()
    try:
        exec(compile(source, "<sample>", "exec"), {"__name__": "__main__"})
        verdict = "passed"
    except BaseException as e:
        try:
            verdict = ("failed: " + type(e).__name__ + ": " + str(e))[:300]
        except BaseException:
            verdict = "failed"
    if os.getpid() != me:
        os._exit(1)
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    line = "\n" + token + " " + verdict.replace("\n", " ") + "\n"
    os.write(1, line.encode("utf-8", "replace"))
    os._exit(0)
_harness()
"""

_TAIL_BYTES = 4096


class SandboxUnavailableError(EvolmError):
    """Bubblewrap is missing or cannot create its namespaces on this machine."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one sandboxed run.

    Attributes:
        timeout_s: Wall-clock seconds before the whole process tree is killed (> 0).
        memory_mb: Address-space limit per process, MiB (RLIMIT_AS).
        max_processes: Processes and threads the program may have at once, itself included
            (RLIMIT_NPROC; >= 1).
        max_file_mb: Largest file the program may write, MiB (RLIMIT_FSIZE); also caps its output.
        tmpfs_mb: Size of the writable ``/tmp``, MiB.
        uid_base: First unprivileged uid used when the evaluator runs as root; worker slot ``i``
            runs as ``uid_base + i`` (uids that own no files or processes on the host).
    """

    timeout_s: float = 3.0
    memory_mb: int = 512
    max_processes: int = 4
    max_file_mb: int = 16
    tmpfs_mb: int = 16
    uid_base: int = 1_900_000

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s={self.timeout_s}; must be > 0 seconds")
        if not (isinstance(self.memory_mb, int) and self.memory_mb >= 64):
            raise ConfigError(f"memory_mb={self.memory_mb}; must be an integer >= 64 (Python itself needs ~30 MiB)")
        if not (isinstance(self.max_processes, int) and self.max_processes >= 1):
            raise ConfigError(f"max_processes={self.max_processes}; must be an integer >= 1")
        for name in ("max_file_mb", "tmpfs_mb"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{name}={value}; must be an integer >= 1 (MiB)")
        if not (isinstance(self.uid_base, int) and 1000 <= self.uid_base < 2**32 - 2**16):
            raise ConfigError(f"uid_base={self.uid_base}; must be an unprivileged uid in [1000, 2**32 - 65536)")


@dataclass(frozen=True)
class RunResult:
    """Outcome of one program.

    Attributes:
        status: ``"passed"`` (ran to the end), ``"failed"`` or ``"timed out"``.
        detail: The exception, signal or limit behind a failure; ``""`` when passed.
        wall_s: Seconds from start to exit, sandbox start-up included.
    """

    status: str
    detail: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def bwrap_path() -> str:
    """Absolute path of ``bwrap``; raises ``SandboxUnavailableError`` naming the install command."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailableError(
            "bubblewrap (`bwrap`) is not installed, and evolm never runs model-written code outside a "
            f"sandbox; install it with `{INSTALL_HINT}` (Debian/Ubuntu; `dnf install bubblewrap` on Fedora)"
        )
    return path


def _interpreter() -> tuple[str, list[str]]:
    """The base (non-venv) Python and the directories it needs besides ``/usr``."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    roots = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix), os.path.dirname(exe)}
    extra = sorted(r for r in roots if r != "/usr" and not r.startswith("/usr/"))
    # drop directories already inside another one
    extra = [r for r in extra if not any(r != o and r.startswith(o + "/") for o in extra)]
    return exe, extra


def _bwrap_argv(cfg: SandboxConfig, uid: int) -> list[str]:
    """The bwrap command line: namespaces, mounts and environment (limits are set by the harness)."""
    exe, extra = _interpreter()
    argv = [bwrap_path()]
    if os.geteuid() == 0:
        # Root: no user namespace (one would map the sandbox to host uid 0, which RLIMIT_NPROC
        # ignores); keep only the capabilities the harness needs to drop to ``uid``.
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-all", "--unshare-user", "--disable-userns"]
    argv += ["--die-with-parent", "--new-session", "--clearenv"]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = f"/{name}"
        if os.path.islink(host):
            argv += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            argv += ["--ro-bind", host, host]
    for root in extra:
        parents = Path(root).parents
        for parent in reversed(list(parents)[:-1]):  # world-traversable parents (bwrap's default is 0700)
            argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", root, root]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    argv += ["--perms", "1777", "--size", str(cfg.tmpfs_mb << 20), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    mib = 1 << 20
    nproc = cfg.max_processes + (0 if os.geteuid() == 0 else 1)  # bwrap's pid 1 shares the uid then
    limits = [uid, nproc, math.ceil(cfg.timeout_s) + 1, cfg.memory_mb * mib, cfg.max_file_mb * mib]
    argv += ["--", exe, "-S", "-s", "-B", "-P", "-c", _HARNESS, *map(str, limits)]
    return argv


def _exited_within(proc: subprocess.Popen, seconds: float) -> bool:
    """Block until ``proc`` exits or ``seconds`` pass (a pidfd wakes at once; ``wait`` polls)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], seconds)[0])
    finally:
        os.close(fd)


def _uid_pids(uid: int) -> list[int]:
    """Host pids of processes running as ``uid``."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(entry.path).st_uid == uid:
                    pids.append(int(entry.name))
    return pids


def _clear_slot(uid: int) -> None:
    """Wait until no process of a finished root-mode run is left under ``uid``.

    bwrap returns as soon as the program's process exits; the kernel then kills the rest of the
    pid namespace asynchronously. Waiting keeps the slot's RLIMIT_NPROC count at zero for the next
    run; stragglers after a moment are SIGKILLed (only sandboxes run under these uids).
    """
    start = time.monotonic()
    while pids := _uid_pids(uid):
        waited = time.monotonic() - start
        if waited > 5.0:
            return
        if waited > 0.5:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def run_program(source: str, cfg: SandboxConfig, slot: int = 0) -> RunResult:
    """Run one Python program in the sandbox.

    Args:
        source: Program text; it passes when it runs to its end without raising.
        cfg: Limits.
        slot: Worker slot, for the per-slot uid when running as root; at most one run per slot at a time.

    Returns:
        The ``RunResult``.
    """
    uid = cfg.uid_base + slot if os.geteuid() == 0 else -1
    argv = _bwrap_argv(cfg, uid)
    token = secrets.token_hex(16)
    timed_out = False
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out:
        stdin.write(f"{token}\n{source}".encode())
        stdin.seek(0)
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=out, start_new_session=True)
        if not _exited_within(proc, cfg.timeout_s):
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        wall = time.perf_counter() - start
        if uid >= 0:
            _clear_slot(uid)
        size = out.seek(0, os.SEEK_END)
        out.seek(max(0, size - _TAIL_BYTES))
        tail = out.read().decode("utf-8", "replace")
    lines = [line for line in tail.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if timed_out:
        return RunResult("timed out", f"killed after the {cfg.timeout_s:g} s wall-clock limit", wall)
    if code == 128 + signal.SIGXCPU:  # bwrap reports a signalled child as 128 + signal
        return RunResult(
            "timed out", f"killed by SIGXCPU after the {math.ceil(cfg.timeout_s) + 1} s CPU-time limit", wall
        )
    if code == 0 and last == f"{token} passed":
        return RunResult("passed", "", wall)
    if code == 0 and last.startswith(f"{token} failed"):
        return RunResult("failed", last[len(token) + 1 :], wall)
    reason = f"killed by signal {code - 128}" if code > 128 else f"exit status {code}"
    return RunResult("failed", f"{reason}, no result from the harness: {last[-200:]}", wall)


def check_sandbox(cfg: SandboxConfig | None = None) -> None:
    """Start one trivial program; raise ``SandboxUnavailableError`` if the sandbox does not work here."""
    cfg = cfg or SandboxConfig(timeout_s=30.0)
    result = run_program("assert 1 + 1 == 2\n", cfg)
    if not result.passed:
        raise SandboxUnavailableError(
            f"bubblewrap could not run a trivial program ({result.status}: {result.detail}); it needs "
            "permission to create pid/net/mount namespaces (as root, or unprivileged user namespaces); "
            f"install or repair it with `{INSTALL_HINT}`"
        )


def run_programs(sources: Sequence[str], cfg: SandboxConfig, workers: int = 1) -> list[RunResult]:
    """Run programs in the sandbox, ``workers`` at a time; results in input order.

    Each program gets its own sandbox; concurrently running programs use distinct worker slots (and,
    as root, distinct uids), so one program's processes cannot use up another's limits and the results
    do not depend on ``workers``.

    Raises:
        SandboxUnavailableError: bwrap is missing or cannot start a sandbox (checked first).
    """
    if not (isinstance(workers, int) and workers >= 1):
        raise ConfigError(f"workers={workers}; must be an integer >= 1")
    check_sandbox(SandboxConfig(timeout_s=max(30.0, cfg.timeout_s), uid_base=cfg.uid_base))
    slots: queue.Queue[int] = queue.Queue()
    for i in range(workers):
        slots.put(i)

    def one(source: str) -> RunResult:
        slot = slots.get()
        try:
            return run_program(source, cfg, slot)
        finally:
            slots.put(slot)

    if workers == 1:
        return [one(s) for s in sources]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, sources))
