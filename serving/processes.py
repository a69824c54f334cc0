"""Child processes of the launcher: stop them in order, and leave nothing of theirs behind.

Read from /proc (Linux): the launcher reaps whole process groups, because tritonserver can exit
while a Python-backend stub it started is still busy.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("serving")

# A stub's /dev/shm region; the stub gets its name on its command line.
PYTHON_BACKEND_SHM_PREFIX = "triton_python_backend_shm_region_"


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, ...; None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_group_members(pgid: int) -> list[int]:
    """PIDs whose process group is `pgid` (from /proc; empty where there is no /proc)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = proc_stat(int(entry.name))
        if fields and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def kill_process_group(pgid: int) -> list[int]:
    """SIGKILL what is left of a server's process group, and free its stubs' shared memory.

    tritonserver exits on SIGTERM after its exit timeout even while a Python-backend stub is
    still inside a long `execute()` (a segment-everything request, say); the stub then runs on
    as an orphan, holding CPU and its /dev/shm region, which a SIGKILLed stub never unlinks.
    Triton is started in a session of its own, so its group holds exactly what it started.
    """
    members = process_group_members(pgid)
    regions = []
    for pid in members:
        with contextlib.suppress(OSError):
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            regions += [
                a.decode() for a in arguments if a.startswith(PYTHON_BACKEND_SHM_PREFIX.encode())
            ]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    for region in regions:
        (Path("/dev/shm") / region).unlink(missing_ok=True)
    if members:
        log.warning("killed %d leftover process(es) of group %d: %s", len(members), pgid, members)
    return members


PR_SET_PDEATHSIG = 1  # prctl option, from linux/prctl.h


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` that has the kernel send `signum` to the child when its parent dies,
    even by SIGKILL. (Linux ties this to the thread that started the child: start children
    from the main thread.)"""
    parent = os.getpid()

    def arrange() -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signum)

    return arrange


def stop_process(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM, wait up to `timeout_s` for a clean exit, then SIGKILL; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop in %.0f s; killing it", process.pid, timeout_s)
            process.kill()
    return process.wait()
