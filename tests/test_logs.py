"""Log lines: text or JSON, with the fields of the job they are about."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

from sdcn_p2p.logs import ContextFilter, JsonFormatter, TextFormatter, log_context, log_fields

log = logging.getLogger("sdcn_p2p.test")


@contextmanager
def captured(formatter: logging.Formatter) -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)


def test_json_lines_hold_time_level_logger_message_and_fields() -> None:
    with captured(JsonFormatter()) as out:
        with log_context(job_id="7f3a"):
            log.info("ran %s", "a job", extra={"model": "card-a", "queue_s": 0.25})
        log.warning("no job here")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "ran a job" and first["level"] == "INFO"
    assert first["logger"] == "sdcn_p2p.test" and first["time"].endswith("+00:00")
    assert first["job_id"] == "7f3a" and first["model"] == "card-a" and first["queue_s"] == 0.25
    assert set(second) == {"time", "level", "logger", "message"}


def test_a_json_line_keeps_a_traceback_on_one_line() -> None:
    with captured(JsonFormatter()) as out:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("it broke")
    [line] = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "it broke" and "ValueError: boom" in entry["exception"]


def test_text_lines_end_with_the_context_fields_before_a_traceback() -> None:
    with captured(TextFormatter()) as out, log_context(job_id="7f3a"), log_context(part=1):
        log.info("ran it", extra={"model": "card-a"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it broke")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("INFO sdcn_p2p.test: ran it job_id=7f3a part=1")
    assert lines[1].endswith("it broke job_id=7f3a part=1")
    assert lines[2] == "Traceback (most recent call last):"


async def test_the_fields_follow_into_tasks_started_in_the_block_and_no_further() -> None:
    seen: dict[str, object] = {}

    async def child(name: str) -> None:
        seen[name] = dict(log_fields())

    async with trio.open_nursery() as nursery:
        with log_context(job_id="a"):
            nursery.start_soon(child, "inside")
            with log_context(job_id="b"):
                nursery.start_soon(child, "nested")
        nursery.start_soon(child, "after")
    assert seen == {"inside": {"job_id": "a"}, "nested": {"job_id": "b"}, "after": {}}


def test_configure_logging_refuses_an_unknown_format() -> None:
    from sdcn_p2p.logs import configure_logging

    with pytest.raises(ValueError, match="text, json"):
        configure_logging("info", "xml")
