"""`python -m proxy`: serve the app with uvicorn on PROXY_HOST:PROXY_PORT."""

from __future__ import annotations

import uvicorn

from common.settings import get_settings
from proxy.allocator import limit_arenas
from proxy.app import create_app


def main() -> None:
    settings = get_settings()
    # glibc gives threads that allocate arenas of their own (up to 8 a core), and freed image
    # memory stays in them; a couple keep the worker threads' decodes from pinning it.
    if settings.malloc_arenas > 0:
        limit_arenas(settings.malloc_arenas)
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
