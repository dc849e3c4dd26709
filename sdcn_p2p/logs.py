"""Log lines operators can follow: text or JSON, and fields that follow a job across tasks.

`log_context(job_id=...)` attaches fields to every line logged inside its block, in the task
that opened it and in the tasks that task starts meanwhile (trio gives a new task a copy of
its parent's context variables). The gateway opens one around each job it dispatches, and the
provider one around each job it runs, with the id that came in the job request: grepping one
job id follows the job from the gateway to the provider that ran it.

`configure_logging` sets up the ``sdcn`` command's logging (``--log-level``,
``--log-format``):

- ``text``: ``2026-05-01 12:00:00,123 INFO gateway.dispatch: message job_id=7f3a...``
- ``json``: one object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
  ``message``, then the context's fields and those passed with ``extra=``, and
  ``exception`` when there is one.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

__all__ = [
    "LOG_FORMATS",
    "ContextFilter",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "log_context",
    "log_fields",
]

LOG_FORMATS = ("text", "json")

_fields: ContextVar[Mapping[str, Any] | None] = ContextVar("sdcn_log_fields", default=None)
# What every LogRecord has; anything else on a record was passed with extra= or by the filter.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_CONTEXT_KEYS = "_sdcn_context_keys"


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add `fields` to every line logged in this block (and in the tasks started in it)."""
    token = _fields.set({**(_fields.get() or {}), **fields})
    try:
        yield
    finally:
        _fields.reset(token)


def log_fields() -> Mapping[str, Any]:
    """The fields `log_context` attaches here and now."""
    return _fields.get() or {}


class ContextFilter(logging.Filter):
    """Copies the `log_context` fields onto each record a handler emits (never dropping
    one); `configure_logging` puts one on its handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _fields.get()
        if fields:
            for key, value in fields.items():
                if not hasattr(record, key):
                    setattr(record, key, value)
            setattr(record, _CONTEXT_KEYS, tuple(fields))
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, then the context's fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        keys = getattr(record, _CONTEXT_KEYS, ())
        if not keys:
            return line
        head, newline, rest = line.partition("\n")  # after the message, before a traceback
        fields = " ".join(f"{key}={getattr(record, key)}" for key in keys)
        return f"{head} {fields}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text", *, stream: IO[str] | None = None) -> None:
    """Log to `stream` (stderr) at `level` (``"info"``...) in `fmt` (``text`` or ``json``),
    unless the root logger has handlers already."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
