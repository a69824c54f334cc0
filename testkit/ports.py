"""Free local TCP ports for the servers a test or a benchmark starts."""

from __future__ import annotations

import socket

_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A free local TCP port, never one this process was given before.

    The OS may hand the same ephemeral port to two binds in a row once the first socket is
    closed; a server launched with the same port twice (HTTP and metrics, say) fails to start.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port
