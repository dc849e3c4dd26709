"""Small helpers shared across layers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn

import trio

__all__ = ["open_service_nursery"]


@asynccontextmanager
async def open_service_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for the background tasks of an object opened with ``async with``.

    A lone exception (from the block or a task) comes out as itself rather than wrapped in an
    ExceptionGroup, so public APIs raise plain SdcnError subclasses; two or more stay grouped.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            _reraise(group.exceptions[0])
        raise


def _reraise(exc: BaseException) -> NoReturn:
    """Raise `exc` keeping its own context, not the group it was unwrapped from (as trio does)."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context
