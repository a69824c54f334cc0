"""Give freed memory back to the system (glibc).

glibc's malloc keeps freed memory in its arenas for reuse, and a process that decoded a few
large images stays at its peak for good (measured in RELIABILITY.md). Fewer arenas, and a trim
when the last large image of a burst is released, bring it back near its baseline. Elsewhere
than glibc these are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h

_libc = None
_path = ctypes.util.find_library("c")
if _path:
    try:
        _libc = ctypes.CDLL(_path)
        _libc.malloc_trim  # noqa: B018 - glibc only
        _libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        _libc = None


def limit_arenas(count: int) -> bool:
    """At most `count` malloc arenas: call before threads start allocating."""
    return bool(_libc and _libc.mallopt(M_ARENA_MAX, count))


def release_free_memory() -> bool:
    """Return the arenas' free pages to the system; True if glibc gave any back."""
    return bool(_libc and _libc.malloc_trim(0))
