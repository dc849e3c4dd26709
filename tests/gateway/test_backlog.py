from __future__ import annotations

import math

import pytest

from gateway.backlog import MIN_SAMPLES, WINDOW, Throughput, start_in


def test_throughput_is_measured_once_enough_jobs_finished() -> None:
    meter = Throughput(since=100.0)
    for i in range(MIN_SAMPLES - 1):
        meter.record(100.0 + 0.5 * (i + 1))
    assert meter.rate(104.0) is None
    meter.record(104.0)
    assert meter.rate(104.0) == pytest.approx(MIN_SAMPLES / 4.0)
    # Nothing finishing lowers it: the time since the last job counts.
    assert meter.rate(108.0) == pytest.approx(MIN_SAMPLES / 8.0)


def test_throughput_follows_the_latest_window_of_jobs() -> None:
    meter = Throughput(since=0.0)
    for i in range(WINDOW):  # 1 job/s
        meter.record(float(i + 1))
    assert meter.rate(float(WINDOW)) == pytest.approx(1.0)
    now = float(WINDOW)
    for _ in range(WINDOW):  # then 10 jobs/s
        now += 0.1
        meter.record(now)
    assert meter.rate(now) == pytest.approx(10.0)


def test_start_in_counts_every_job_ahead_and_its_own_turn() -> None:
    assert start_in(0, 0, 2.0) == 0.5
    assert start_in(9, 6, 4.0) == 4.0
    assert start_in(3, 0, 0.0) == math.inf
