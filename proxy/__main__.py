"""`python -m proxy`: serve the app with uvicorn on PROXY_HOST:PROXY_PORT."""

from __future__ import annotations

import uvicorn

from common.settings import get_settings
from proxy.allocator import limit_arenas
from proxy.app import create_app

# glibc gives each thread that allocates its own arena, and freed image memory stays in them;
# two arenas keep the worker threads' decodes from pinning memory eight times over.
MALLOC_ARENAS = 2


def main() -> None:
    limit_arenas(MALLOC_ARENAS)
    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=settings.proxy_host,
        port=settings.proxy_port,
        log_level="info",
        # On SIGTERM: stop accepting, let in-flight requests finish for this long.
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )


if __name__ == "__main__":
    main()
