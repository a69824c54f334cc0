"""`make run` and `make triton`: export if needed, start Triton (then the proxy), stop on
SIGTERM or Ctrl-C.

Two processes, as in production (docker-compose.yml): `tritonserver` through `TritonServer`,
and `python -m proxy` (uvicorn). The proxy starts once Triton is ready; if either exits, the
other is stopped too.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from common.settings import PROJECT_ROOT, get_settings
from serving.processes import stop_process
from serving.triton import TritonError, TritonServer, export_if_needed

log = logging.getLogger("run")


def serve(with_proxy: bool = True) -> int:
    """Run until SIGTERM, Ctrl-C, or either process exiting; then stop both, proxy first."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    settings = get_settings()
    try:
        export_if_needed(settings)
    except subprocess.CalledProcessError:
        return 1

    def terminate(signum: int, _frame) -> None:
        raise KeyboardInterrupt

    # SIGINT explicitly too: a process started in the background by a shell inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt for it.
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    triton = TritonServer.from_settings(settings)
    proxy: subprocess.Popen | None = None
    try:
        triton.start()
        triton.wait_ready(settings.triton_ready_timeout_s)
        log.info(
            "Triton ready: http %s, grpc :%d, metrics %s",
            triton.http_url,
            triton.grpc_port,
            triton.metrics_url,
        )
        if with_proxy:
            proxy = subprocess.Popen([sys.executable, "-m", "proxy"], cwd=PROJECT_ROOT)
            log.info("proxy starting on http://%s:%d", settings.proxy_host, settings.proxy_port)
        while triton.process.poll() is None and (proxy is None or proxy.poll() is None):
            time.sleep(0.5)
        log.error("%s exited; stopping", "Triton" if triton.process.poll() is not None else "proxy")
        return 1
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    except TritonError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if proxy is not None:
            stop_process(proxy)
        triton.stop()
