"""Serve an ASGI app (FastAPI) with hypercorn's trio worker, inside the caller's trio run."""

from __future__ import annotations

import logging

import trio

from sdcn_p2p.errors import ConfigError

__all__ = ["BACKLOG", "parse_bind", "serve_http"]

log = logging.getLogger(__name__)

#: Connections the kernel queues before we accept them (hypercorn's default is 100): when a
#: burst of clients overflows the queue, the kernel resets their connections.
BACKLOG = 1024


def parse_bind(text: str) -> str:
    """Check a ``HOST:PORT`` (``[::1]:8080`` for IPv6) and return it; raises ConfigError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return text


async def serve_http(
    app: object, bind: str, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve `app` on `bind` (``HOST:PORT``, port 0 picks one) until cancelled.

    Reports the bound URLs (``http://127.0.0.1:43210``) through `task_status`. Raises
    ConfigError if the address cannot be bound.
    """
    # Imported here, not at the top: `parse_bind` is all a provider needs of this module.
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [parse_bind(bind)]
    config.backlog = BACKLOG
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    try:
        await serve(app, config, shutdown_trigger=trio.sleep_forever, task_status=task_status)
    except OSError as exc:
        raise ConfigError(f"cannot serve HTTP on {bind}: {exc.strerror or exc}") from exc
