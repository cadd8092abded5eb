"""Run the API with uvicorn (``docent serve``)."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from docent.settings import DocentSettings
from serving.app import create_app

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: DocentSettings) -> None:
    """Serve until interrupted. Builds the engine inside uvicorn's loop (vLLM binds to it);
    with vLLM this must run under ``if __name__ == "__main__":`` (the console script does)."""
    if settings.api_keys is None and not is_loopback(settings.host):
        log.warning(
            "serving on %s without API keys: anyone who reaches it can ask and refresh; "
            "set DOCENT_API_KEYS",
            settings.host,
        )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
