"""`make run` and `make triton`: export if needed, then keep Triton (and the proxy) running
until SIGTERM or Ctrl-C.

Two processes, as in production (docker-compose.yml): `tritonserver` through `TritonServer`,
and `python -m proxy` (uvicorn).

- Triton starts first and must become ready, or the launcher exits 1 (a broken model
  repository is not worth retrying); then the proxy starts.
- A child that exits afterwards is restarted after a backoff: 1 s, doubling up to 30 s, and
  back to 1 s once it has run for a minute. While Triton is down the proxy answers 503 with
  Retry-After, and becomes ready again by itself once Triton is back.
- SIGTERM or Ctrl-C: the proxy stops first, finishing its requests in flight for up to
  DRAIN_TIMEOUT_S; then Triton, which drains its own queue; then the launcher exits 0.
- Nothing outlives the launcher, however it ends: its children get a parent-death signal,
  and Triton's watchdog reaps Triton's process group (serving.watchdog).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from common.settings import PROJECT_ROOT, Settings, get_settings
from serving.processes import die_with_parent, stop_process
from serving.triton import TritonError, TritonServer, export_if_needed

log = logging.getLogger("run")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long starts its backoff from the beginning
POLL_S = 0.25


@dataclass
class Restarts:
    """When a supervised child may be started again."""

    name: str
    failures: int = 0
    started_at: float = field(default_factory=time.monotonic)
    due_at: float | None = None

    def started(self) -> None:
        self.started_at = time.monotonic()
        self.due_at = None

    def exited(self, code: int | None) -> None:
        now = time.monotonic()
        if now - self.started_at >= STABLE_AFTER_S:
            self.failures = 0
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**self.failures)
        self.failures += 1
        self.due_at = now + delay
        log.error("%s exited with code %s; restarting in %.0f s", self.name, code, delay)

    def due(self) -> bool:
        return self.due_at is not None and time.monotonic() >= self.due_at


class ProxyProcess:
    """`python -m proxy`, as the launcher runs it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy"],
            cwd=PROJECT_ROOT,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        log.info(
            "proxy starting on http://%s:%d", self.settings.proxy_host, self.settings.proxy_port
        )

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, self.settings.drain_timeout_s + 5)


def serve(with_proxy: bool = True) -> int:
    """Run until SIGTERM or Ctrl-C; then stop the proxy, then Triton."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    settings = get_settings()
    try:
        export_if_needed(settings)
    except subprocess.CalledProcessError:
        return 1

    def terminate(signum: int, _frame) -> None:
        # Once: the shutdown below must not be interrupted by a second signal.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    # SIGINT explicitly too: a process started in the background by a shell inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt for it.
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    triton = TritonServer.from_settings(settings)
    proxy = ProxyProcess(settings) if with_proxy else None
    try:
        triton.start()
        triton.wait_ready(settings.triton_ready_timeout_s)
        log.info(
            "Triton ready: http %s, grpc :%d, metrics %s",
            triton.http_url,
            triton.grpc_port,
            triton.metrics_url,
        )
        if proxy is not None:
            proxy.start()
        supervise(triton, proxy)
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    except TritonError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if proxy is not None:
            proxy.stop()
        triton.stop()
    return 0


def supervise(triton: TritonServer, proxy: ProxyProcess | None) -> None:
    """Restart whichever child exits, with backoff; returns only by KeyboardInterrupt."""
    children = {"Triton": Restarts("Triton")}
    if proxy is not None:
        children["proxy"] = Restarts("proxy")
    recovering_since: float | None = None
    while True:
        time.sleep(POLL_S)
        for name, restarts in children.items():
            process = triton.process if name == "Triton" else proxy.process
            if restarts.due_at is None and process.poll() is not None:
                restarts.exited(process.returncode)
                if name == "Triton":
                    recovering_since = time.monotonic()
            elif restarts.due():
                if name == "Triton":
                    triton.stop()  # reap what is left of the old group first
                    triton.start()
                else:
                    proxy.start()
                restarts.started()
        if recovering_since is not None and children["Triton"].due_at is None and triton.is_ready():
            log.info(
                "Triton ready again %.1f s after it exited", time.monotonic() - recovering_since
            )
            recovering_since = None
