"""A test card whose jobs take each step only when the test allows it, for deterministic
tests of progress, cancellation and queues in real time."""

from __future__ import annotations

from collections.abc import Callable

import trio

from sdcn_p2p.backends import JobOutput
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.jobs import JobRequest

__all__ = ["GatedBackend"]


class GatedBackend(TestcardBackend):
    """A test card (models `models`) that reports step *n* of a job only once `allow` has
    let *n* steps through (counted across jobs). `started` is set when a job starts,
    `cancelled` when one is cancelled."""

    __test__ = False

    def __init__(self, models: tuple[str, ...] = ("card",)) -> None:
        super().__init__(TestcardConfig(models=models))
        self.started = trio.Event()
        self.cancelled = trio.Event()
        self._allowed = 0
        self._changed = trio.lowlevel.ParkingLot()

    def allow(self, steps: int = 1) -> None:
        """Let `steps` more steps through."""
        self._allowed += steps
        self._changed.unpark_all()

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        self.started.set()
        try:
            for step in range(1, job.steps + 1):
                while self._allowed == 0:
                    await self._changed.park()
                self._allowed -= 1
                progress(step, job.steps)
            return await super().generate(job, _ignore)
        except trio.Cancelled:
            self.cancelled.set()
            raise


def _ignore(step: int, total: int) -> None:
    pass
