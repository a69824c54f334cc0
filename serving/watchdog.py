"""`python -m serving.watchdog PGID`: kill a server's process group when our parent dies.

The kernel's parent-death signal kills tritonserver with its launcher, but not the
Python-backend stubs it started: they are reparented to init and run on (seen here, minutes
after), holding memory, CPU and their /dev/shm regions. `TritonServer` starts one watchdog
per server, with the parent-death signal; when the launcher dies, however it dies, the
watchdog receives SIGTERM, kills the server's whole group (Triton runs in a session of its
own) and unlinks the stubs' shared memory. A clean stop ends the watchdog the same way, after
the server is gone.
"""

from __future__ import annotations

import os
import signal
import sys

from serving.processes import kill_process_group


def main(argv: list[str]) -> int:
    pgid, parent = int(argv[0]), int(argv[1])

    def reap(_signum: int, _frame: object) -> None:
        kill_process_group(pgid)
        os._exit(0)

    signal.signal(signal.SIGTERM, reap)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the launcher, which stops us
    if os.getppid() != parent:  # the parent died before we were ready
        reap(signal.SIGTERM, None)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
