"""`python -m serving.container`: Triton as the main process of its container (Dockerfile.triton).

The container runs what the tests run: the command of `TritonServer.from_settings()` (the same
binary, flags and backend layout; the ports and repository from the environment), so no flag
is restated in a Dockerfile.

It listens on TRITON_HOST when that is an address of the container: 127.0.0.1 (the default) in
the network namespace compose's `pod` shares with the proxy, out of everyone else's reach.
Otherwise TRITON_HOST is the name others reach Triton by (a Kubernetes Service, whose settings
every container shares), and it listens on all of the container's interfaces.

Before it execs `tritonserver` it frees the /dev/shm regions of stubs that died with an earlier
run of this container: the container's /dev/shm outlives a restart, and a region whose stub was
SIGKILLed is never unlinked, so every crash would leak one region per instance until the
models no longer load.

`--prepare` lays out the backend directory at build time (as root, so the image needs no write
access at start) and fails if the server or the backend lacks a shared library in this image;
`--check` is the image's health check: Triton is ready.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

from common.settings import get_settings
from serving.shared_memory import free_stale_regions
from serving.triton import TritonServer, prepare_backend_directory, server_environment

# The backend directory (the Python backend with its 3.11 stub), laid out at build time.
WORK_DIR = Path("/opt/triton")


def listen_address(host: str) -> str:
    """`host` if this container can listen there, else every interface."""
    try:
        with socket.socket() as probe:
            probe.bind((host, 0))
            return probe.getsockname()[0]
    except OSError:  # not an address of ours (EADDRNOTAVAIL), or a name that does not resolve
        return "0.0.0.0"


def server() -> TritonServer:
    settings = get_settings()
    host = listen_address(settings.triton_host)
    return TritonServer.from_settings(settings, host=host, work_dir=WORK_DIR)


def command() -> list[str]:
    return server().command(prepare_backend_directory(WORK_DIR))


def missing_libraries(backends: Path) -> list[str]:
    """`ldd`'s "not found" lines for the server and the Python backend, in Triton's environment."""
    binaries = [command()[0], *map(str, (backends / "python").glob("*.so"))]
    binaries.append(str(backends / "python" / "triton_python_backend_stub"))
    report = subprocess.run(
        ["ldd", *binaries], env=server_environment(), capture_output=True, text=True, check=True
    )
    return [line.strip() for line in report.stdout.splitlines() if "not found" in line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.container", description=__doc__)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--prepare", action="store_true", help="lay out the backends and exit")
    action.add_argument("--check", action="store_true", help="exit 0 if Triton is ready")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if server().is_ready() else 1
    if args.prepare:
        backends = prepare_backend_directory(WORK_DIR)
        missing = missing_libraries(backends)
        print("\n".join(missing) or f"backends ready in {backends}", file=sys.stderr)
        return 1 if missing else 0
    argv_of_triton = command()
    for region in free_stale_regions():
        print(f"freed {region}, left by a stub of an earlier run", file=sys.stderr)
    print(" ".join(argv_of_triton), file=sys.stderr, flush=True)
    os.execve(argv_of_triton[0], argv_of_triton, server_environment())


if __name__ == "__main__":
    sys.exit(main())
