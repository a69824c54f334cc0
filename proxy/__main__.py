"""`python -m proxy`: serve the app with uvicorn on PROXY_HOST:PROXY_PORT."""

from __future__ import annotations

import uvicorn

from common.settings import get_settings
from proxy.app import create_app


def main() -> None:
    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=settings.proxy_host,
        port=settings.proxy_port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
