"""The decoder's answers through shared memory when Triton runs on this host.

Over HTTP the decoder's logits (1 MB a prompt, 64 MB for one of segment everything's calls)
are serialised, sent over the socket, read and parsed. With Triton's system shared memory the
request names a POSIX shared-memory segment that Triton has mapped, and Triton writes the
outputs there instead. The inputs stay on HTTP (README, "The decoder's answers through
shared memory where they can be"): a call whose embedding is in shared memory can reach
Triton within a millisecond or two of its predecessor's answer, while the instance is still
winding down, and with a bounded queue Triton's dynamic batcher may then wait its default
500 ms for it.

Whether Triton can map a segment is found out, not configured: registering one asks Triton to
open it by its key, which works only where the two share /dev/shm (one host or one pod, not
separate containers). An endpoint that refuses answers over HTTP from then on.
Triton forgets registrations when it restarts, so `TritonGateway` repeats over HTTP a call
that Triton refused and has the endpoint register again before its next one.

A slot holds one call's answer: the logits and IoU of up to `prompts` prompts.
Calls with more prompts, or made while every slot is busy, go over HTTP. Segments are named
after the process, so a proxy removes the segments of proxies that died (and Triton's
registrations of them) instead of leaking them.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import contract

log = logging.getLogger("proxy.shm")

SHM_DIR = Path("/dev/shm")
PREFIX = "mobilesam-proxy"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-")
# The names of this process's open pools (a process may hold several: tests, two gateways).
_LIVE_PREFIXES: set[str] = set()
FLOAT32 = np.dtype(np.float32)
LOGITS_BYTES_PER_PROMPT = contract.MASK_TOKENS * contract.LOW_RES_SIDE**2 * FLOAT32.itemsize


def owner_pid(name: str) -> int | None:
    """The pid a segment or region name was made by, if it is one of ours."""
    match = _NAME.match(name.lstrip("/"))
    return int(match.group(1)) if match else None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_orphan(name: str) -> bool:
    """A segment or region of a proxy process that no longer runs.

    One with this process's pid but none of its open pools' names is an earlier process's:
    in a container restarted with the same /dev/shm, the proxy often gets the same pid again.
    """
    pid = owner_pid(name)
    if pid is None:
        return False
    if pid == os.getpid():
        return not any(name.lstrip("/").startswith(p) for p in _LIVE_PREFIXES)
    return not is_alive(pid)


@dataclass(eq=False)
class Slot:
    """One segment: [logits of up to `prompts` prompts | their IoU], float32."""

    name: str  # the region's name in Triton and the segment's in /dev/shm
    prompts: int
    buffer: mmap.mmap

    @property
    def key(self) -> str:
        return f"/{self.name}"

    @property
    def byte_size(self) -> int:
        return len(self.buffer)

    logits_offset = 0

    @property
    def iou_offset(self) -> int:
        return self.prompts * LOGITS_BYTES_PER_PROMPT

    def read(self, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        """A copy of a float32 tensor written at `offset` (the slot is reused at once)."""
        return np.ndarray(shape, FLOAT32, self.buffer, offset).copy()


class SlotPool:
    """`count` slots of this process, handed out one call at a time, never waited for."""

    def __init__(self, count: int, prompts: int, directory: Path = SHM_DIR) -> None:
        self.directory = directory
        self.prompts = prompts
        self.own_prefix = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(4)}-"
        _LIVE_PREFIXES.add(self.own_prefix)
        remove_orphan_segments(directory)
        self.slots = [
            _create(directory, f"{self.own_prefix}{index}", prompts) for index in range(count)
        ]
        self.free = list(self.slots)
        self.allocated = False

    def acquire(self, prompts: int) -> Slot | None:
        """A free slot that holds a call of `prompts` prompts, or None (the call uses HTTP)."""
        if prompts > self.prompts or not self.free:
            return None
        return self.free.pop()

    def release(self, slot: Slot) -> None:
        self.free.append(slot)

    def allocate(self) -> None:
        """Reserve the segments' memory before Triton first writes into them.

        They are created sparse (free until written), but a write past what a small /dev/shm
        can hold would kill this process with SIGBUS instead of failing: reserve first, and
        let an OSError say the segments do not fit.
        """
        if self.allocated:
            return
        for slot in self.slots:
            fd = os.open(self.directory / slot.name, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, slot.byte_size)
            finally:
                os.close(fd)
        self.allocated = True

    def close(self) -> None:
        for slot in self.slots:
            with contextlib.suppress(BufferError):
                slot.buffer.close()
            with contextlib.suppress(FileNotFoundError):
                (self.directory / slot.name).unlink()
        self.slots, self.free = [], []
        _LIVE_PREFIXES.discard(self.own_prefix)


def _create(directory: Path, name: str, prompts: int) -> Slot:
    size = contract.decoder_output_bytes(prompts)
    fd = os.open(directory / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        buffer = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return Slot(name, prompts, buffer)


def remove_orphan_segments(directory: Path) -> None:
    """Unlink the segments of proxy processes that died without removing them."""
    if not directory.is_dir():
        return
    for path in directory.glob(f"{PREFIX}-*"):
        if is_orphan(path.name):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            log.info("removed the shared memory of a proxy that is gone: %s", path.name)
