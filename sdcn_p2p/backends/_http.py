"""HTTP shared by the backends that drive a server over its API (webui, ComfyUI)."""

from __future__ import annotations

from typing import Any

import httpx

from sdcn_p2p.errors import ConfigError

__all__ = ["HttpFailure", "check_url", "request_capped"]


class HttpFailure(Exception):
    """No usable answer: the server could not be reached, was too slow, or sent too much.

    ``__cause__`` is httpx's exception, if any (a ConnectError: the request never left).
    """


def check_url(url: str, server: str) -> None:
    """Raise ConfigError unless `url` is http(s)://HOST[:PORT][/PATH]; `server` names what it
    is the URL of ("webui")."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"bad {server} URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"the {server} URL must be http(s)://HOST[:PORT], got {url!r}")


async def request_capped(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    limit: int,
    timeouts: httpx.Timeout,
    **options: Any,
) -> tuple[int, bytes]:
    """Send one request (`options`: httpx's content, params, files, data, headers); return the
    status and the body, read up to `limit` bytes. Raises HttpFailure saying why not.
    """
    try:
        async with client.stream(method, path, timeout=timeouts, **options) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise HttpFailure(f"{path} answered more than {limit} bytes")
            return response.status_code, bytes(body)
    except httpx.TimeoutException as exc:
        raise HttpFailure(f"{path} did not answer in time ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:
        raise HttpFailure(f"cannot reach it: {exc or type(exc).__name__}") from exc
