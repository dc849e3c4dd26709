"""The job service: every job the gateway runs, sync or async, is a record with events.

- An **async** job (`JobService.submit`, ``POST /v1/jobs``) is stored durably before it is
  accepted, then waits in the service's own line (`gateway.admission`) for its turn at the
  dispatcher, runs in the service's nursery, and stores its result PNGs; it does not end when
  the client that submitted it goes away. At most `JobsConfig.max_unfinished` wait or run at
  once. Jobs of a model are handed to the dispatcher while fewer than
  `JobsConfig.max_unassigned` of them wait there for a provider, so the dispatcher's own line
  (bounded, with a 30 s wait) stays short and the long line, with its positions, is here. A
  job that still finds every provider busy goes back to its place, and its model's line
  pauses (1 s doubling to 30 s, or until an advert of a provider of that model arrives): the
  jobs behind it would fare no better. A job keeps trying so for up to
  `JobsConfig.max_queue_time`, or `JobsConfig.provider_wait` when no provider of its model is
  known at all (it left, or the gateway has just restarted and not yet heard of it).
- A **sync** job (`JobService.run`: ``/txt2img``, ``/img2img``, the A1111 API) runs in the
  caller's task, straight at the dispatcher as before; a caller that is cancelled (a client
  that disconnects) cancels it. Its record and result are written behind, without waiting.

Each job has a log of events, each numbered ``RUN.SEQ`` (RUN counts the gateway's starts that
ran the job, so ids after a restart never repeat old ones): ``queued`` (again when its place
changes), ``assigned`` (each attempt), ``progress`` (each step the provider reports), then one
of ``done``, ``failed``, ``cancelled``. Followers (`JobService.events`) read the log from any
point and wait for more. Positions in this service's line are logged when a follower is
watching (they change for every job behind each one that leaves).

A restart with the same data dir runs again the async jobs accepted and not finished (with
the seed drawn at submit, so the picture is the same) and marks unfinished sync jobs
cancelled (their clients are gone). Finished results are kept `JobsConfig.retention` seconds
and within `JobsConfig.results_max_mb`, oldest first out; their ids then answer ResultGone
for `JobsConfig.tombstone_keep` seconds more, then UnknownJob.

Clients (`gateway.limits`): every job is a client's (`Client`: an address or an API key).
`JobService.quotas` checks its limits when the job comes (sync or async alike, so the HTTP
APIs share them), and tracks its jobs in line and in flight. The line serves clients in turn,
weighted (`gateway.admission`): by the client's tier, times CONTRIBUTOR_BONUS for a key
linked to a provider that ran a job for this gateway within CONTRIBUTION_WINDOW. Such a
key's jobs go to its own providers first when they have room. What each provider ran (its
megapixel-steps) is kept in the store. While several clients use the gateway, async jobs go
to the dispatcher only as providers of their model have free slots, so that they wait here,
where the order is fair, and not in a provider's own queue.

Seams for what comes next: `_finished` is the one place every job ends (metrics: times,
outcomes, attempts); the stored request lets a job run again elsewhere (spot checks).
"""

from __future__ import annotations

import enum
import gc
import itertools
import logging
import math
import random
import secrets
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from gateway.admission import AdmissionLine
from gateway.directory import DEFAULT_SPEED, ProviderDirectory
from gateway.dispatch import (
    DispatchEvent,
    DispatchResult,
    JobAssigned,
    JobProgress,
    JobWaiting,
)
from gateway.errors import (
    AllBusy,
    DeadlinePassed,
    DispatchError,
    JobCancelled,
    NoProvider,
    ProviderFailed,
    Rejected,
    ResultGone,
    StoreError,
    StoreFull,
    StoreUnavailable,
    TooManyJobs,
    UnknownJob,
)
from gateway.jobstore import JobRecord, JobStore, open_job_store, valid_job_id
from gateway.limits import Client, Quotas, as_client
from sdcn_p2p._config import require, require_at_least, require_positive
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.jobs import MAX_SEED, JobRequest
from sdcn_p2p.records import Advert, normalize_model_name

if TYPE_CHECKING:
    from gateway.spotcheck import SpotCheck

__all__ = [
    "CONTRIBUTION_WINDOW",
    "CONTRIBUTOR_BONUS",
    "EventFeed",
    "Job",
    "JobEvent",
    "JobMode",
    "JobOutcome",
    "JobService",
    "JobState",
    "JobStatus",
    "JobsConfig",
    "open_job_service",
]

log = logging.getLogger(__name__)

#: Seconds an async job backs off after finding every provider busy: 1, 2, 4, ... at most this.
_MAX_BACKOFF = 30.0
#: Clients whose A1111 interrupt is remembered (for ``state.interrupted``).
_MAX_INTERRUPTED = 1024
#: How much more a key's share weighs while a provider linked to it serves this gateway.
CONTRIBUTOR_BONUS = 4.0
#: Seconds since a linked provider's latest job for this gateway that the bonus lasts.
CONTRIBUTION_WINDOW = 3600.0
# Seconds the scheduler looks again at a line held back for want of free slots.
_SLOT_RECHECK = 1.0


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobMode(enum.StrEnum):
    ASYNC = "async"  # POST /v1/jobs: stored before it is accepted, outlives its client
    SYNC = "sync"  # the caller waits for it, and cancels it by going away


_ENDED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class JobsConfig:
    """Where the job service keeps jobs, for how long, and how many."""

    #: Where records and results live; None: a temporary directory, deleted on close.
    data_dir: Path | None = None
    #: Seconds a finished job's result is kept.
    retention: float = 3600.0
    #: Most megabytes (MiB) of results kept; past it the oldest go first.
    results_max_mb: float = 2048
    #: Most async jobs waiting or running at once (more: TooManyJobs, a 503).
    max_unfinished: int = 10_000
    #: Most async jobs at the dispatcher at once (running, or waiting there for a provider).
    max_dispatching: int = 1024
    #: Most async jobs of one model at the dispatcher without a provider yet.
    max_unassigned: int = 64
    #: Longest an async job keeps trying when every provider stays busy (seconds).
    max_queue_time: float = 3600.0
    #: Longest an async job waits for a provider of its model to (re)appear (seconds).
    provider_wait: float = 120.0
    #: Seconds between keep-alives on an event stream with nothing to say.
    keepalive: float = 10.0
    #: Free space (MiB) the disk must keep for an async job to be accepted.
    min_free_mb: int = 64
    #: Seconds a deleted result's id answers "gone" before it is forgotten.
    tombstone_keep: float = 86_400.0

    def __post_init__(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        require_positive(
            self, "retention", "max_queue_time", "provider_wait", "keepalive", "tombstone_keep"
        )
        require_at_least(self, 0, "min_free_mb")
        cap = self.results_max_mb
        ok = isinstance(cap, int | float) and not isinstance(cap, bool) and 0 <= cap < math.inf
        require(self, "results_max_mb", ok, "must be a finite number ≥ 0")
        require_at_least(self, 1, "max_unfinished", "max_dispatching", "max_unassigned")


class Dispatch(Protocol):
    """What the service needs of `gateway.dispatch.Dispatcher`."""

    async def run_batch(
        self,
        jobs: Sequence[JobRequest],
        *,
        deadline: float | None = None,
        on_event: Callable[[DispatchEvent], None] | None = None,
        verify: bool = False,
        job_id: str | None = None,
        prefer: Collection[str] = (),
        own_load: bool = False,
    ) -> list[DispatchResult]: ...

    async def check_offered(self, job: JobRequest) -> None: ...


@dataclass(slots=True, eq=False)
class JobEvent:
    """One event of a job: `name` and `data` as the API describes them, except that a
    ``done`` event's images are PNG bytes and a ``failed`` event holds the ``error``.

    `wire` is for the HTTP layer to keep the event's encoded form in, made once for all
    followers.
    """

    id: str  # "RUN.SEQ"
    name: str
    data: dict[str, Any]
    wire: bytes | None = None

    @property
    def terminal(self) -> bool:
        return self.name in _ENDED


@dataclass(frozen=True, slots=True)
class JobState:
    """A job as ``GET /v1/jobs/{id}`` shows it."""

    id: str
    kind: str
    mode: str
    api: str
    status: JobStatus
    queue_position: int | None
    eta_s: float | None
    step: int
    total: int
    provider: str | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    #: (step, total) of each dispatched part (an A1111 request may make several).
    parts: tuple[tuple[int, int], ...] = ()
    images: list[bytes] | None = field(default=None, repr=False)  # done, when asked for
    info: dict[str, Any] | None = None  # done
    error: BaseException | None = None  # failed: a gateway.errors type
    verify: bool = False  # the client asked that a second provider agree first


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """A sync job's result: its id and the dispatcher's result of each part."""

    job_id: str
    results: list[DispatchResult]


@dataclass(slots=True)
class _Part:
    """One dispatched job of a Job (an A1111 request may make several)."""

    request: JobRequest
    step: int = 0
    total: int = 0
    attempt: int = 0  # the dispatcher's attempt count of the latest run
    assigned: bool = False  # to a provider now (not waiting for one)
    assigned_at: float | None = None  # trio time
    rate: tuple[float, int] | None = None  # (trio time, step) of the first progress report


class Job:
    """One job in memory while it waits or runs (and shortly after it ends)."""

    def __init__(self, record: JobRecord, parts: list[JobRequest], ticket: int) -> None:
        self.id = record.id
        self.record = record
        self.status = JobStatus(record.status)
        self.mode = JobMode(record.mode)
        self.parts = [_Part(request, total=request.steps) for request in parts]
        self.model = normalize_model_name(parts[0].model)
        self.ticket = ticket
        self.weight = 1.0  # its client's share in the line (async)
        self.prefer: frozenset[str] = frozenset()  # its client's own providers
        self.fills_slot = False  # sent to the dispatcher for a slot free of our jobs
        self.events: list[JobEvent] = []
        self.changed = trio.lowlevel.ParkingLot()  # followers wait here
        self.ended = trio.Event()  # its terminal event is logged
        self.stored = trio.Event()  # and its end is written
        self.scope = trio.CancelScope()  # cancelling it cancels the job
        self.in_line = False  # in the admission line (async, not at the dispatcher)
        self.unassigned = False  # at the dispatcher, without a provider (async)
        self.finishing = False  # its end is being stored: too late to cancel
        self.position: int | None = None
        self.earlier_attempts = 0  # attempts of dispatcher runs before this one
        self.orphaned_at: float | None = None  # trio time no provider of its model was found
        self.followers = 0
        self.results: list[DispatchResult] | None = None
        self.error: BaseException | None = None
        self._seq = itertools.count(1)

    @property
    def attempts(self) -> int:
        return self.earlier_attempts + sum(part.attempt for part in self.parts)

    @property
    def prefers(self) -> dict[str, Any]:
        """`run_batch`'s keywords for the providers to try first, if any, and for a job
        sent to fill a free slot (dispatchers that tests stand in need not take them
        otherwise)."""
        prefers: dict[str, Any] = {"prefer": self.prefer} if self.prefer else {}
        if self.fills_slot:
            prefers["own_load"] = True
        return prefers

    def log(self, name: str, data: dict[str, Any]) -> JobEvent:
        event = JobEvent(f"{self.record.runs}.{next(self._seq)}", name, data)
        self.events.append(event)
        if self.changed:  # (unparking is dear even with nobody parked)
            self.changed.unpark_all()
        return event


class EventFeed:
    """A job's events from some point on, waiting for more while the job runs: iterate it to
    get each JobEvent, or None when `keepalive` seconds passed with none. It ends after the
    terminal event.

    `empty`: the job has ended and the follower had its terminal event already.
    """

    def __init__(
        self,
        service: JobService,
        job: Job | None,
        replay: list[JobEvent],
        keepalive: float,
        cursor: int = 0,
    ) -> None:
        self._service = service
        self._job = job
        self._replay = replay
        self._keepalive = keepalive
        self._cursor = cursor
        if job is None:
            self.empty = not replay
        else:
            self.empty = job.ended.is_set() and cursor >= len(job.events)
            job.followers += 1
            if not job.ended.is_set():
                service._watched.add(job)

    def __aiter__(self) -> EventFeed:
        return self

    async def __anext__(self) -> JobEvent | None:
        job = self._job
        if job is None:
            if self._cursor < len(self._replay):
                self._cursor += 1
                return self._replay[self._cursor - 1]
            raise StopAsyncIteration
        while True:
            if self._cursor < len(job.events):
                self._cursor += 1
                return job.events[self._cursor - 1]
            if job.ended.is_set():
                raise StopAsyncIteration
            self._service._refresh_position(job)
            if self._cursor < len(job.events):
                continue
            with trio.move_on_after(self._keepalive) as waited:
                await job.changed.park()
            if waited.cancelled_caught:
                return None

    def close(self) -> None:
        """Stop following (the job's follower count goes down)."""
        if self._job is not None:
            self._job.followers -= 1
            if self._job.followers == 0:
                self._service._watched.discard(self._job)
            self._job = None
            self._replay = []


class JobService:
    """The gateway's jobs: made by `open_job_service`; see the module docstring."""

    def __init__(
        self,
        store: JobStore,
        dispatcher: Dispatch,
        directory: ProviderDirectory,
        config: JobsConfig,
        nursery: trio.Nursery,
        *,
        wall_clock: Callable[[], float],
        rng: random.Random | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        #: Runs the jobs (replaceable, as tests do).
        self.dispatcher = dispatcher
        self.config = config
        #: Each client's jobs and work against its limits.
        self.quotas = quotas or Quotas()
        #: What each provider ran for this gateway: peer id -> (megapixel-steps, jobs,
        #: Unix seconds of the latest).
        self.contributions: dict[str, tuple[float, int, float]] = dict(store.contributions)
        self._store = store
        self._directory = directory
        self._nursery = nursery
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._live: dict[str, Job] = {}
        self._by_task: dict[str, Job] = {}
        self._line: AdmissionLine[Job] = AdmissionLine()
        self._tickets = itertools.count()
        self._unfinished = 0  # async jobs accepted and not ended
        self._dispatching = 0  # async jobs at the dispatcher
        self._unassigned: Counter[str] = Counter()  # by model: at the dispatcher, no provider
        self._watched: set[Job] = set()  # queued jobs with followers
        self._interrupted: OrderedDict[str, None] = OrderedDict()
        self._wake = trio.Event()  # the scheduler has something to do
        #: model -> (rounds, trio time): its line waits after finding no provider free
        self._holds: dict[str, tuple[int, float]] = {}
        self._space = trio.Event()  # results are over the size cap

    # --- counts (for metrics and health) ---------------------------------------------------------

    @property
    def unfinished(self) -> int:
        """Async jobs accepted and not ended."""
        return self._unfinished

    @property
    def queued(self) -> int:
        """Async jobs in the service's line, not yet at the dispatcher."""
        return len(self._line)

    # --- async jobs ----------------------------------------------------------------------------

    async def submit(
        self, job: JobRequest, *, client: Client | str, verify: bool = False
    ) -> JobState:
        """Accept `job` as an async job of `client`: checked that some provider offers what
        it needs and that the client is within its limits, stored durably, and put in line.
        Returns its state (queued). With `verify`, its result is kept only once a second
        provider agreed (`Dispatcher.run`).

        Raises LimitExceeded, NoProvider, TooManyJobs, StoreFull or StoreUnavailable, and
        then keeps nothing. Cancelling while it stores the job waits for that, and the job
        stays.
        """
        client = as_client(client)
        if self._unfinished >= self.config.max_unfinished:
            raise TooManyJobs(
                f"the gateway holds {self._unfinished} unfinished jobs, its limit; try again later",
                retry_after=_retry_after(self._unfinished),
            )
        await self.dispatcher.check_offered(job)
        record, parts = self._new_record([job], JobMode.ASYNC, "sdcn", client.id, None, verify)
        self.quotas.accept(client, record.cost, trio.current_time(), waits=True)
        init_image = parts[0].init_image
        self._unfinished += 1
        try:
            with trio.CancelScope(shield=True):
                await self._store.add(record, init_image)
        except BaseException:
            self._unfinished -= 1
            self.quotas.ended(client.id, trio.current_time(), waiting=True, refund=record.cost)
            raise
        live = Job(record, [replace(p, init_image=None) for p in parts], next(self._tickets))
        live.weight = self.weight(client)
        live.prefer = client.providers
        self._live[live.id] = live
        self._enqueue(live)
        log.info("job %s accepted: %s %s", live.id, job.kind, job.model)
        return self._state(live)

    def _enqueue(self, job: Job, *, estimate: bool = True, returned: bool = False) -> None:
        self._line.add(
            job.model,
            job.ticket,
            job,
            client=job.record.client,
            weight=job.weight,
            cost=job.record.cost,
            returned=returned,
        )
        job.in_line = True
        job.status = JobStatus.QUEUED
        job.position = self._line_position(job)
        eta = self._eta(job) if estimate else None
        job.log("queued", {"position": job.position, "eta_s": eta})
        self._wake.set()

    def _line_position(self, job: Job) -> int:
        return self._line.position(job.model, job.ticket) + self._unassigned[job.model]

    async def _schedule(self) -> None:
        """Hand jobs from the line to the dispatcher as they may go, until cancelled."""
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            moved = False
            shared = self.quotas.shared(now)
            while self._dispatching < self.config.max_dispatching:
                job = self._line.next(partial(self._may_dispatch, shared=shared), self._may_serve)
                if job is None:
                    break
                moved = True
                job.in_line = False
                job.fills_slot = shared
                self.quotas.dispatched(job.record.client, now)
                self._dispatching += 1
                self._set_unassigned(job, True)
                self._nursery.start_soon(self._dispatch, job)
            if moved:
                self._line_moved()
            held = [until for _, until in self._holds.values() if until > now]
            if shared and self._line:  # slots may free up without a word to us
                held.append(now + _SLOT_RECHECK)
            with trio.move_on_at(min(held, default=math.inf)):
                await self._wake.wait()

    def _may_dispatch(self, model: str, *, shared: bool = False) -> bool:
        now = trio.current_time()
        hold = self._holds.get(model)
        if hold is not None and hold[1] > now:
            return False
        room = self.config.max_unassigned
        if shared:  # the rest wait here, in a fair line, rather than in providers' queues
            room = min(room, self._directory.free_slots(model, self._wall_clock()))
        return self._unassigned[model] < room

    def _may_serve(self, client_id: str) -> bool:
        return self.quotas.may_dispatch(client_id)

    def weight(self, client: Client) -> float:
        """`client`'s share in the line: its tier's weight, times CONTRIBUTOR_BONUS while
        a provider linked to its key has served this gateway lately."""
        if self.contributor(client):
            return client.weight * CONTRIBUTOR_BONUS
        return client.weight

    def contributor(self, client: Client) -> bool:
        """Whether a provider linked to `client`'s key ran a job for this gateway within
        CONTRIBUTION_WINDOW."""
        since = self._wall_clock() - CONTRIBUTION_WINDOW
        return any(
            (seen := self.contributions.get(provider)) is not None and seen[2] >= since
            for provider in client.providers
        )

    def _set_unassigned(self, job: Job, value: bool) -> None:
        if job.unassigned == value:
            return
        job.unassigned = value
        self._unassigned[job.model] += 1 if value else -1
        if not value:
            if self._unassigned[job.model] <= 0:
                del self._unassigned[job.model]
            self._wake.set()
        self._line_moved()  # those in line count these ahead of them

    async def _dispatch(self, job: Job) -> None:
        """Run an async job the scheduler took from the line (in the service's nursery)."""
        outcome: tuple[str, Any] = ("cancelled", None)
        try:
            with job.scope:
                try:
                    parts = await self._requests(job)
                    results = await self.dispatcher.run_batch(
                        parts,
                        on_event=partial(self._on_event, job),
                        verify=job.record.verify,
                        job_id=job.id,
                        **job.prefers,
                    )
                    outcome = ("done", results)
                except (AllBusy, NoProvider) as exc:
                    if self._may_retry(job, exc):
                        self._back_off(job, getattr(exc, "retry_after", None))
                        return
                    outcome = ("failed", exc)
                except (DispatchError, StoreError) as exc:
                    outcome = ("failed", exc)
        finally:
            # Its provider's slot is free now, not once its end is stored.
            self._dispatching -= 1
            self._set_unassigned(job, False)
            self._wake.set()
        with trio.CancelScope(shield=True):
            await self._end_async(job, *outcome)

    def _may_retry(self, job: Job, error: DispatchError) -> bool:
        """Whether an async job the dispatcher could not place should try again later."""
        if isinstance(error, NoProvider):
            now = trio.current_time()
            if job.orphaned_at is None:
                job.orphaned_at = now
            return now - job.orphaned_at < self.config.provider_wait
        job.orphaned_at = None
        return self._wall_clock() - job.record.created_at < self.config.max_queue_time

    async def _requests(self, job: Job) -> list[JobRequest]:
        """The job's requests, with the init image read back from the data dir."""
        requests = [part.request for part in job.parts]
        if not job.record.has_init:
            return requests
        try:
            image = await self._store.init_image(job.id)
        except ResultGone as exc:
            raise StoreUnavailable(exc.message) from None
        return [replace(request, init_image=image) for request in requests]

    def _back_off(self, job: Job, retry_after: float | None = None) -> None:
        """No provider was free: back to the job's place in line, and its model's line holds
        (for `retry_after` seconds when the dispatcher could tell, else 1 s doubling to 30 s
        while it keeps happening) unless an advert lifts the hold."""
        job.earlier_attempts = job.attempts
        for part in job.parts:
            part.attempt = 0
            part.assigned = False
        job.scope = trio.CancelScope()  # a scope serves one `with` block only
        now = trio.current_time()
        self.quotas.returned(job.record.client, now)
        rounds, until = self._holds.get(job.model, (0, 0.0))
        if until <= now:  # jobs already held back together count as one round
            rounds += 1
            delay = retry_after if retry_after is not None else 2.0 ** (rounds - 1)
            until = now + min(max(delay, 1.0), _MAX_BACKOFF)
            self._holds[job.model] = (rounds, until)
            log.debug("model %s: no provider free, its line waits %.0f s", job.model, until - now)
        self._enqueue(job, returned=True)

    def _on_advert(self, advert: Advert) -> None:
        """A provider that could take jobs of a held line has room: let the line go on."""
        if not advert.is_online_provider:
            return
        if self._line:  # its slots may let jobs kept back for want of them go
            self._wake.set()
        if not self._holds:
            return
        for model in advert.models:
            for name in (model.name, model.title):
                if name and self._holds.pop(normalize_model_name(name), None) is not None:
                    self._wake.set()

    async def _end_async(
        self, job: Job, status: str, outcome: Any, *, waiting: bool = False
    ) -> None:
        """End an async job that was `waiting` in line (else at the dispatcher)."""
        job.finishing = True
        if status == "done":  # counted now: the job's client may be waiting on its provider
            self._contributed(job)
        refund = job.record.cost if status != "done" else 0.0
        self.quotas.ended(job.record.client, trio.current_time(), waiting=waiting, refund=refund)
        images = [png for r in outcome for png in r.images] if status == "done" else []
        try:
            await self._store.finish(job.id, images, **self._end_values(job, status, outcome))
        except StoreError as exc:
            log.warning("job %s: could not store its end: %s", job.id, exc)
            status, outcome, images = "failed", exc, []
            self._store.update_nowait(job.id, **self._end_values(job, status, outcome))
        self._finished(job, status, outcome)
        job.stored.set()
        self._forget(job)
        self._check_space()

    def _check_space(self) -> None:
        if self._store.result_bytes > self._max_bytes:
            self._space.set()

    def _end_values(self, job: Job, status: str, outcome: Any) -> dict[str, Any]:
        job.record.finished_at = self._wall_clock()
        values: dict[str, Any] = {
            "status": status,
            "finished_at": job.record.finished_at,
            "attempts": job.attempts,
            "provider": job.record.provider,
            "last_event": f"{job.record.runs}.{len(job.events) + 1}",
        }
        if status == "done":
            values["info"] = outcome[0].info
        elif status == "failed":
            values["error_kind"] = type(outcome).__name__
            values["error_msg"] = getattr(outcome, "message", str(outcome))
        return values

    # --- sync jobs -----------------------------------------------------------------------------

    async def run(
        self,
        parts: Sequence[JobRequest],
        *,
        api: str,
        client: Client | str,
        task_id: str | None = None,
        verify: bool = False,
    ) -> JobOutcome:
        """Run `parts` (one job, or the jobs an A1111 request splits into) as a sync job of
        `client` in the caller's task, and return their results in order; with `verify`, once
        a second provider agreed (`Dispatcher.run`).

        Raises LimitExceeded (and runs nothing) if the client is over a limit, the
        DispatchError the dispatcher raises, or JobCancelled if the job was cancelled
        (`cancel`, `interrupt`); cancelling the caller cancels the job.
        """
        client = as_client(client)
        record, requests = self._new_record(parts, JobMode.SYNC, api, client.id, task_id, verify)
        self.quotas.accept(client, record.cost, trio.current_time(), waits=False)
        try:
            return await self._run_sync(record, requests, api, client, task_id)
        finally:
            self._wake.set()  # its provider's slot may take a job of the line

    async def _run_sync(
        self,
        record: JobRecord,
        requests: list[JobRequest],
        api: str,
        client: Client,
        task_id: str | None,
    ) -> JobOutcome:
        self._store.add_nowait(record, requests[0].init_image)
        job = Job(record, requests, next(self._tickets))
        self._live[job.id] = job
        if task_id is not None:
            self._by_task[task_id] = job
        if api == "a1111":
            self._interrupted.pop(client.id, None)
        job.prefer = client.providers
        job.log("queued", {"position": 0, "eta_s": self._eta(job)})
        try:
            with job.scope:
                results = await self.dispatcher.run_batch(
                    requests,
                    on_event=partial(self._on_event, job),
                    verify=record.verify,
                    job_id=job.id,
                    **job.prefers,
                )
        except DispatchError as exc:
            self._end_sync(job, "failed", exc)
            raise
        except BaseException:  # the caller was cancelled: the client went away
            self._end_sync(job, "cancelled", None)
            raise
        if job.scope.cancelled_caught:
            self._end_sync(job, "cancelled", None)
            raise JobCancelled(f"job {job.id} was cancelled")
        self._end_sync(job, "done", results)
        await self._store.wait_writable()
        return JobOutcome(job.id, results)

    def _end_sync(self, job: Job, status: str, outcome: Any) -> None:
        if status == "done":
            self._contributed(job)
        refund = job.record.cost if status != "done" else 0.0
        self.quotas.ended(job.record.client, trio.current_time(), waiting=False, refund=refund)
        images = [png for r in outcome for png in r.images] if status == "done" else []
        values = self._end_values(job, status, outcome)
        self._finished(job, status, outcome)

        def stored() -> None:
            job.stored.set()
            self._forget(job)
            self._check_space()

        self._store.finish_nowait(job.id, images, then=stored, **values)

    # --- both ----------------------------------------------------------------------------------

    def _new_record(
        self,
        parts: Sequence[JobRequest],
        mode: JobMode,
        api: str,
        client: str,
        task_id: str | None,
        verify: bool = False,
    ) -> tuple[JobRecord, list[JobRequest]]:
        """A new job's record, and its parts with concrete seeds (drawn here, so that a run
        after a restart draws the same picture)."""
        requests = [
            p if p.seed != -1 else p.with_seed(self._rng.randrange(MAX_SEED + 1)) for p in parts
        ]
        wire = []
        for request in requests:
            fields = request.to_wire()
            fields.pop("init_image", None)
            wire.append(fields)
        record = JobRecord(
            id=secrets.token_urlsafe(16),  # 128 random bits
            kind=requests[0].kind,
            mode=mode,
            api=api,
            client=client,
            task_id=task_id,
            parts=wire,
            has_init=requests[0].init_image is not None,
            cost=sum(r.steps * r.batch_size * r.pixels for r in requests) / 1e6,
            created_at=self._wall_clock(),
            verify=verify,
        )
        return record, requests

    def _on_event(self, job: Job, event: DispatchEvent) -> None:
        """A dispatcher event of one of `job`'s parts (in the dispatcher's task)."""
        part = job.parts[event.part]
        if isinstance(event, JobWaiting):
            part.assigned = False
            if job.mode is JobMode.ASYNC:
                self._set_unassigned(job, True)
            job.position = event.position
            if not any(p.assigned for p in job.parts):
                job.status = JobStatus.QUEUED
            job.log("queued", {"position": event.position, "eta_s": self._eta(job)})
        elif isinstance(event, JobAssigned):
            job.orphaned_at = None
            self._holds.pop(job.model, None)
            part.assigned, part.attempt = True, event.attempt
            part.assigned_at, part.rate = trio.current_time(), None
            part.step, part.total = 0, part.request.steps
            self._set_unassigned(job, False)
            provider = str(event.provider)
            job.record.provider = provider
            job.position = None
            job.status = JobStatus.RUNNING
            values: dict[str, Any] = {"status": "running", "provider": provider}
            if job.record.started_at is None:
                job.record.started_at = values["started_at"] = self._wall_clock()
            self._store.update_nowait(job.id, **values, attempts=job.attempts)
            job.log("assigned", {"provider": provider, "attempt": job.attempts})
        elif isinstance(event, JobProgress):
            if part.rate is None:
                part.rate = (trio.current_time(), event.step)
            part.step, part.total = event.step, event.total
            step, total = self._progress(job)
            job.log("progress", {"step": step, "total": total, "eta_s": self._eta(job)})

    def _finished(self, job: Job, status: str, outcome: Any) -> None:
        """Where every job ends: its terminal event, and followers told."""
        job.status = JobStatus(status)
        job.position = None
        if status == "done":
            job.results = outcome
            images = [png for result in outcome for png in result.images]
            job.log("done", {"images": images, "info": outcome[0].info})
            self._follow_check(job, outcome)
        elif status == "failed":
            job.error = outcome
            job.log("failed", {"error": outcome})
        else:
            job.log("cancelled", {})
        job.ended.set()
        if job.mode is JobMode.ASYNC:
            self._unfinished -= 1
        self._watched.discard(job)
        log.info(
            "job %s %s after %d attempt(s), %.0f ms",
            job.id,
            status,
            job.attempts,
            (job.record.finished_at - job.record.created_at) * 1000,
        )

    def _follow_check(self, job: Job, results: list[DispatchResult]) -> None:
        """When the background spot check of the job's (first) result ends, its outcome goes
        into the job's info (``spot_check``, ``spot_check_detail``), in memory and stored; at
        once if it ended before the job did."""
        check = results[0].check
        if check is None:
            return

        def checked(check: SpotCheck) -> None:
            detail = {"spot_check": str(check.status), "spot_check_detail": check.detail}
            results[0] = replace(results[0], info={**results[0].info, **detail})
            self._store.update_nowait(job.id, info=results[0].info)

        if check.status.final:
            if results[0].info.get("spot_check") != str(check.status):
                checked(check)
        else:
            check.subscribe(checked)

    def _contributed(self, job: Job) -> None:
        """Count a done job's work to the provider that ran it (the last one assigned)."""
        provider = job.record.provider
        if provider is None:
            return
        at = self._wall_clock()
        work, jobs, _ = self.contributions.get(provider, (0.0, 0, 0.0))
        self.contributions[provider] = (work + job.record.cost, jobs + 1, at)
        self._store.contribute_nowait(provider, job.record.cost, at)

    def account(self, client: Client) -> dict[str, Any]:
        """What ``GET /v1/account`` shows `client`: its tier, share, limits, usage, and the
        work of the providers linked to its key."""
        providers = []
        for provider in sorted(client.providers):
            work, jobs, last = self.contributions.get(provider, (0.0, 0, None))
            providers.append(
                {
                    "peer_id": provider,
                    "megapixel_steps": round(work, 3),
                    "jobs": jobs,
                    "last_job_at": last,
                }
            )
        return {
            "client": client.key if client.key is not None else "anonymous",
            "tier": client.tier,
            "weight": self.weight(client),
            "contributor": self.contributor(client),
            "limits": client.limits.to_json(),
            "usage": self.quotas.usage(client, trio.current_time()),
            "providers": providers,
        }

    def _forget(self, job: Job) -> None:
        """Drop an ended job from memory (followers keep their reference)."""
        self._live.pop(job.id, None)
        if job.record.task_id is not None and self._by_task.get(job.record.task_id) is job:
            del self._by_task[job.record.task_id]

    # --- asking about jobs ---------------------------------------------------------------------

    async def status(self, job_id: str, *, images: bool = True) -> JobState:
        """The state of `job_id`, with its result PNGs when done (and `images`).

        Raises UnknownJob, or ResultGone if its result was deleted or lost.
        """
        job = self._live.get(job_id)
        if job is not None:
            return self._state(job)
        record = await self._record(job_id)
        pngs = await self._store.images(record) if images and record.status == "done" else None
        return self._stored_state(record, pngs)

    async def _record(self, job_id: str) -> JobRecord:
        record = await self._store.get(job_id) if valid_job_id(job_id) else None
        if record is None:
            raise UnknownJob(f"no job {job_id!r:.80} (or it was deleted long ago)")
        if record.gone is not None:
            raise ResultGone(f"job {job_id}: {record.gone}")
        return record

    async def events(self, job_id: str, after: str | None = None) -> EventFeed:
        """Follow `job_id`'s events after the one with id `after` (all of them if None, or
        if `after` is not one of this run's); close the feed when done with it.

        Raises UnknownJob, or ResultGone if the job's result was deleted.
        """
        job = self._live.get(job_id)
        if job is not None:
            cursor = _cursor(after, job.record.runs, len(job.events))
            return EventFeed(self, job, [], self.config.keepalive, cursor)
        record = await self._record(job_id)
        if record.finished_at is None:  # a sync job whose end is being written
            return EventFeed(self, None, [], self.config.keepalive)
        if after is not None and after == record.last_event:
            return EventFeed(self, None, [], self.config.keepalive)
        pngs = await self._store.images(record) if record.status == "done" else None
        state = self._stored_state(record, pngs)
        return EventFeed(self, None, [_terminal_event(state, record)], self.config.keepalive)

    async def cancel(self, job_id: str) -> tuple[JobState, bool]:
        """Cancel `job_id` if it has not ended (the provider's stream is closed, which stops
        the job there); if it has, delete its stored result. Returns its state and whether
        a result was deleted.

        Raises UnknownJob, or ResultGone if its result was deleted already.
        """
        job = self._live.get(job_id)
        if job is not None and not job.ended.is_set() and not job.finishing:
            if job.in_line:
                self._line.remove(job.model, job.ticket)
                job.in_line = False
                self._line_moved()
                job.finishing = True
                with trio.CancelScope(shield=True):
                    await self._end_async(job, "cancelled", None, waiting=True)
            else:
                job.scope.cancel()
                await job.stored.wait()
            if job.status is JobStatus.CANCELLED:
                return self._state(job), False
        if job is not None:
            await job.stored.wait()
        if await self._store.delete_result(job_id, "deleted by DELETE /v1/jobs/{id}"):
            return self._stored_state(await self._store_get(job_id), None), True
        await self._record(job_id)  # raises why not
        return self._stored_state(await self._store_get(job_id), None), False

    async def _store_get(self, job_id: str) -> JobRecord:
        record = await self._store.get(job_id)
        if record is None:
            raise UnknownJob(f"no job {job_id!r:.80}")
        return record

    # --- the A1111 API's view: jobs by client -----------------------------------------------

    def client_jobs(self, client: str, task_id: str | None = None) -> list[JobState]:
        """The A1111 jobs in flight for `client` (or the one with `task_id`, if given)."""
        if task_id is not None:
            job = self._by_task.get(task_id)
            jobs = [job] if job is not None and not job.ended.is_set() else []
        else:
            jobs = [
                job
                for job in self._live.values()
                if job.record.client == client
                and job.record.api == "a1111"
                and not job.ended.is_set()
            ]
        return [self._state(job) for job in jobs]

    def interrupt(self, client: str) -> int:
        """Cancel `client`'s A1111 jobs in flight; returns how many."""
        jobs = [
            job
            for job in self._live.values()
            if job.record.client == client and job.record.api == "a1111" and not job.ended.is_set()
        ]
        for job in jobs:
            job.scope.cancel()
        self._interrupted[client] = None
        self._interrupted.move_to_end(client)
        while len(self._interrupted) > _MAX_INTERRUPTED:
            self._interrupted.popitem(last=False)
        return len(jobs)

    def was_interrupted(self, client: str) -> bool:
        """Whether `client` interrupted its jobs since it last started one (A1111's
        ``state.interrupted``)."""
        return client in self._interrupted

    # --- states and estimates --------------------------------------------------------------------

    def _state(self, job: Job) -> JobState:
        record = job.record
        step, total = self._progress(job)
        ended = job.status in _ENDED
        if job.in_line:
            job.position = self._line_position(job)
        return JobState(
            id=job.id,
            kind=record.kind,
            mode=record.mode,
            api=record.api,
            status=job.status,
            queue_position=job.position if job.status is JobStatus.QUEUED else None,
            eta_s=None if ended else self._eta(job),
            step=step,
            total=total,
            provider=record.provider,
            attempts=job.attempts,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            parts=tuple((p.step, p.total) for p in job.parts),
            images=[png for r in job.results for png in r.images] if job.results else None,
            info=job.results[0].info if job.results else None,
            error=job.error,
            verify=record.verify,
        )

    def _stored_state(self, record: JobRecord, images: list[bytes] | None) -> JobState:
        steps = sum(part.get("steps", 0) for part in record.parts)
        done = record.status == "done"
        return JobState(
            id=record.id,
            kind=record.kind,
            mode=record.mode,
            api=record.api,
            status=JobStatus(record.status),
            queue_position=None,
            eta_s=None,
            step=steps if done else 0,
            total=steps,
            provider=record.provider,
            attempts=record.attempts,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            images=images,
            info=record.info,
            error=_error(record) if record.status == "failed" else None,
            verify=record.verify,
        )

    @staticmethod
    def _progress(job: Job) -> tuple[int, int]:
        return sum(p.step for p in job.parts), sum(p.total for p in job.parts)

    def _eta(self, job: Job) -> float | None:
        """Seconds until `job` is likely done, from what the provider reported so far, or
        else from the adverts (None when nothing is known)."""
        now = trio.current_time()
        etas = []
        for part in job.parts:
            if part.assigned and part.rate is not None and part.step > part.rate[1]:
                since, first = part.rate
                per_step = (now - since) / (part.step - first)
                etas.append(per_step * (part.total - part.step))
            elif part.assigned:
                run = self._run_estimate(part.request, job.record.provider)
                if run is None:
                    return None
                etas.append(max(run - (now - (part.assigned_at or now)), 0.0))
            else:
                wait = self._wait_estimate(part.request, job.position or 0)
                if wait is None:
                    return None
                etas.append(wait)
        return round(max(etas), 1) if etas else None

    def _run_estimate(self, request: JobRequest, provider: str | None) -> float | None:
        directory = self._directory
        advert = next(
            (a for a in self._offering(request) if str(a.peer_id) == provider),
            None,
        )
        if advert is not None:
            return directory.eta(advert, request)
        etas = [directory.eta(a, request) for a in self._offering(request)]
        return min(etas, default=None)

    def _wait_estimate(self, request: JobRequest, position: int) -> float | None:
        """Time for `position` jobs like `request` ahead of it, then its own run."""
        adverts = self._offering(request)
        if not adverts:
            return None
        soonest = min(self._directory.eta(a, request) for a in adverts)
        per_second = 0.0  # jobs like this one the providers finish per second, together
        for advert in adverts:
            speed = advert.speed if advert.speed > 0 else DEFAULT_SPEED
            observed = self._directory.observed_speed(advert.peer_id)
            speed = min(speed, observed) if observed else speed
            per_second += advert.slots * speed / max(request.cost, 1e-6)
        return soonest + position / per_second

    def _offering(self, request: JobRequest) -> list:  # type: ignore[type-arg]
        loras = [name for name, _ in request.loras]
        return self._directory.adverts.find(request.model, loras)

    def _refresh_position(self, job: Job) -> None:
        """Log a ``queued`` event if a job in the line has moved up (followers call this)."""
        if job.in_line:
            position = self._line_position(job)
            if position != job.position:
                job.position = position
                job.log("queued", {"position": position, "eta_s": self._eta(job)})

    def _line_moved(self) -> None:
        for job in list(self._watched):
            self._refresh_position(job)

    # --- retention ----------------------------------------------------------------------------

    @property
    def _max_bytes(self) -> int:
        return int(self.config.results_max_mb * 2**20)

    async def sweep(self) -> None:
        """Delete the results past the retention, then the oldest ones while they take more
        than the size cap, and forget ids deleted long enough ago. The service does this
        every minute or so, and whenever results grow past the cap."""
        config = self.config
        now = self._wall_clock()
        try:
            expired = await self._store.expire(now - config.retention)
            dropped = await self._store.shrink(self._max_bytes)
            forgotten = await self._store.forget(now - config.retention - config.tombstone_keep)
        except StoreError as exc:
            log.warning("could not delete old job results: %s", exc)
            return
        if expired or dropped or forgotten:
            log.info(
                "job results: %d expired, %d deleted for room, %d ids forgotten",
                expired,
                dropped,
                forgotten,
            )

    async def _sweep(self) -> None:
        """`sweep` now and then, until cancelled."""
        interval = min(max(self.config.retention / 10, 1.0), 60.0)
        while True:
            self._space = trio.Event()
            await self.sweep()
            with trio.move_on_after(interval):
                await self._space.wait()

    # --- restart ---------------------------------------------------------------------------------

    def _recover(self, records: list[JobRecord]) -> None:
        """Take up the unfinished jobs the store held at open (oldest first): async ones go
        back in line, sync ones are cancelled (their clients went with the gateway)."""
        self._store.restart_nowait(self._wall_clock())
        collecting = gc.isenabled()
        gc.disable()  # objects made in bulk and kept: the collector's passes would be wasted
        try:
            resumed = self._resume(records)
        finally:
            if collecting:
                gc.enable()
        if resumed:
            log.info("resumed %d unfinished job(s) from the data dir", resumed)

    def _resume(self, records: list[JobRecord]) -> int:
        resumed = 0
        for record in records:
            if record.mode != JobMode.ASYNC:
                continue
            try:
                parts = [_request_from(fields) for fields in record.parts]
            except (TypeError, ValueError, KeyError) as exc:
                log.warning("job %s cannot be run again (%s): failed", record.id, exc)
                self._store.update_nowait(
                    record.id,
                    status="failed",
                    finished_at=self._wall_clock(),
                    error_kind="StoreUnavailable",
                    error_msg="the gateway could not read the job back after a restart",
                    last_event=f"{record.runs}.1",
                )
                continue
            record.runs += 1  # as restart_nowait does in the store
            record.status = "queued"
            job = Job(record, parts, next(self._tickets))
            job.earlier_attempts = record.attempts
            # Its client's limits are not known until it comes back: counted, not checked.
            self.quotas.accept(as_client(record.client), 0.0, trio.current_time(), waits=True)
            self._live[job.id] = job
            self._unfinished += 1
            self._enqueue(job, estimate=False)  # no adverts yet to estimate from
            resumed += 1
        return resumed


def _cursor(after: str | None, runs: int, count: int) -> int:
    """Where a follower that saw event `after` goes on in a log of `count` events."""
    if after is None:
        return 0
    run, _, seq = after.partition(".")
    if run != str(runs) or not seq.isdigit():
        return 0  # not an id of this run (a restart came between): everything
    return min(int(seq), count)


def _request_from(fields: dict[str, Any]) -> JobRequest:
    """A stored part back as a JobRequest (without its init image)."""
    values = dict(fields)
    values["loras"] = tuple((str(name), float(weight)) for name, weight in values["loras"])
    values.pop("init_image", None)
    return JobRequest(**values)


_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        Rejected,
        NoProvider,
        ProviderFailed,
        AllBusy,
        DeadlinePassed,
        StoreFull,
        StoreUnavailable,
        ResultGone,
    )
}


def _error(record: JobRecord) -> Exception:
    """The error a failed job's record names."""
    cls = _ERRORS.get(record.error_kind or "", ProviderFailed)
    return cls(record.error_msg or "the job failed")


def _terminal_event(state: JobState, record: JobRecord) -> JobEvent:
    event_id = record.last_event or f"{record.runs}.1"
    if state.status is JobStatus.DONE:
        return JobEvent(event_id, "done", {"images": state.images or [], "info": state.info})
    if state.status is JobStatus.FAILED:
        return JobEvent(event_id, "failed", {"error": state.error})
    return JobEvent(event_id, "cancelled", {})


def _retry_after(unfinished: int) -> int:
    """Seconds a client refused for a full line should wait: longer the fuller it is."""
    return max(1, min(60, unfinished // 1000 * 5 or 5))


@asynccontextmanager
async def open_job_service(
    dispatcher: Dispatch,
    directory: ProviderDirectory,
    config: JobsConfig = JobsConfig(),
    *,
    wall_clock: Callable[[], float],
    rng: random.Random | None = None,
    quotas: Quotas | None = None,
) -> AsyncIterator[JobService]:
    """Run the job service over `config.data_dir`, taking up the jobs a previous run left
    unfinished. On exit, jobs still waiting or running stay unfinished in the store (a
    restart runs them again).

    Raises ConfigError if the data dir cannot be used (`gateway.jobstore.open_job_store`).
    """
    async with (
        open_job_store(config.data_dir, min_free_mb=config.min_free_mb) as store,
        open_service_nursery() as nursery,
    ):
        service = JobService(
            store,
            dispatcher,
            directory,
            config,
            nursery,
            wall_clock=wall_clock,
            rng=rng,
            quotas=quotas,
        )
        service._recover(store.unfinished)
        store.unfinished = []
        nursery.start_soon(service._schedule)
        nursery.start_soon(service._sweep)
        try:
            with directory.adverts.subscribe(service._on_advert):
                yield service
        finally:
            nursery.cancel_scope.cancel()
