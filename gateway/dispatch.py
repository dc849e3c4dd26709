"""Dispatch and failover: run a job on the best provider, and on the next when one fails.

A job gets a concrete seed first (so that a retry draws the same picture), then goes to the
provider `ProviderDirectory.choose` picks. When one refuses what it advertised, fails in its
backend or drops the connection, it is banned and the next best is tried, up to
`GatewayConfig.max_attempts` providers within the job's deadline. When the AdvertCache knows
no provider for the model (a gateway that just joined), one DHT lookup of the model's key
fills it in (only then: not when every known provider is busy, or every 503 would wait on it).

Busy is back-pressure, not a failure: a provider that answers busy, or resets a new stream
while we keep it full, is held back (see `ProviderDirectory.hold_busy`) rather than banned;
so is one whose advert says its slots and queue are full, without being asked.
A ban would leave it idle once its queue drains, and under overload that cut what the
network served by half or more (benchmarks/load.py).

When every provider that could run a job is full (held back after busy, or running as many
of our jobs as we send one), the job waits in its model's line, first come first served, for
one to have room: up to `GatewayConfig.queue_wait` seconds (at most half its deadline), with
at most `GatewayConfig.max_waiting` jobs waiting in all; then, or beyond that, it is a 503.
While jobs of a model wait, a new job of that model joins the line without trying providers
first: the room a job frees is the line's. A job ending wakes the first in its model's line;
an advert of a provider with room wakes as many as it has free slots in each line of its
models; the first in each line also looks again every second, since a busy hold can lapse
unseen, and one that finds room wakes the next. (A job woken into a provider that turns out
busy goes back to its place, but a job behind it may have taken the room meanwhile.) Waiting
on the gateway spares an overloaded network the storm of clients retrying after 503s, which
otherwise took most of the gateway's time (benchmarks/load.py). But a job that would not
start within its wait (the jobs ahead of it over the throughput of the capable providers, see
gateway.backlog) does not wait in vain: it is a 503 at once, with that estimate as
`retry_after`.

Against providers that advertise what they cannot deliver (or never answer), a request
makes at most one attempt on an unproven provider (one that has completed no job here) while
a proven one could take the job, and that attempt gets half the time left, so the proven
provider still has time to finish when the unproven one fails or hangs.

Every result must carry the provider's signed receipt for the job and its images
(`sdcn_p2p.jobs.receipts`); one without a valid receipt counts as a provider failure. A
dispatcher given a `checker` (`gateway.spotcheck.SpotChecker`) hands it each job it ran for a
client, to spot-check in the background or verify before answering (``run(verify=True)``);
`rerun` is how a checker gets its second and third opinions.

A job that does not run raises one of the `gateway.errors` types (NoProvider, AllBusy, ...);
what a caller answers with is its business (the HTTP layer picks statuses). A caller that
follows a job (a job service) passes `on_event`: it hears `JobWaiting` when the job joins the
line (and when it goes back to another place in it), `JobAssigned` for each attempt, and
`JobProgress` for each step the provider reports.

Each job has an id (the caller's, or one drawn here): every log line about the job carries
it (`sdcn_p2p.logs.log_context`), and so does the job request, so that the provider's lines
do too. A job that ends logs one line at info: its model, provider, status, attempts, and time
queued and run (never the prompt). The dispatcher's metrics are `gateway.metrics`'.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import trio

from gateway.backlog import start_in
from gateway.directory import Candidate, ProviderDirectory
from gateway.errors import (
    AllBusy,
    DeadlinePassed,
    DispatchError,
    NoProvider,
    ProviderFailed,
    Rejected,
)
from gateway.metrics import DispatchMetrics, job_status
from gateway.waitqueue import WaitQueue
from sdcn_p2p._config import require, require_at_least, require_positive
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.errors import (
    NETWORK_ERRORS,
    JobError,
    JobErrorCode,
    RecordError,
    SdcnError,
    StreamReset,
)
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs import MAX_SEED, JobRequest, JobResult
from sdcn_p2p.jobs.protocol import request_job
from sdcn_p2p.jobs.receipts import Receipt, job_digest
from sdcn_p2p.jobs.schema import check_job_id, new_job_id
from sdcn_p2p.logs import log_context
from sdcn_p2p.peer import Peer
from sdcn_p2p.records import Advert, Envelope, model_key, normalize_model_name

if TYPE_CHECKING:
    from gateway.spotcheck import SpotCheck

__all__ = [
    "MAX_ATTEMPTS",
    "DispatchEvent",
    "DispatchResult",
    "Dispatcher",
    "GatewayConfig",
    "JobAssigned",
    "JobProgress",
    "JobWaiting",
    "ResultChecker",
]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
#: A provider that times out having had this many times its estimated run is banned; a
#: shorter deadline is the client's doing, and must not let one client ban every provider.
_TIMEOUT_BAN_FACTOR = 2.0
#: A waiting job looks for a provider with room this often (s) even when nothing woke it.
_RECHECK = 1.0
#: Busy answers one request takes before it gives up with a 503.
_MAX_BUSY = 16
#: Longest Retry-After (s) an early 503 gives, however long the line.
_MAX_RETRY_AFTER = 600.0
# Jobs whose init image and results exceed this many bytes have their receipts checked in a
# worker thread (hashing).
_THREAD_HASH_BYTES = 1024 * 1024
#: The outcome (gateway.metrics.ATTEMPT_OUTCOMES) of an attempt a provider answered with an
#: error; other codes are "failed".
_ATTEMPT_OUTCOME = {JobErrorCode.BUSY: "busy", JobErrorCode.TIMEOUT: "timeout"}


@dataclass(frozen=True, slots=True)
class DispatchResult:
    """A finished job: PNG images and the provider's info, plus ``attempts``; the provider
    that ran it and its signed receipt; and the job's spot check, when a checker made one
    (its status changes later: see `gateway.spotcheck.SpotCheck`)."""

    images: list[bytes] = field(repr=False)
    info: dict[str, Any]
    provider: PeerId | None = None
    receipt: bytes | None = field(default=None, repr=False)
    check: SpotCheck | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class JobWaiting:
    """The job waits in the gateway's line for a provider with room, `position` jobs ahead."""

    position: int
    part: int = 0  # which job of a batch (`Dispatcher.run_batch`)


@dataclass(frozen=True, slots=True)
class JobAssigned:
    """Attempt `attempt` (counting busy answers) sends the job to `provider`."""

    provider: PeerId
    attempt: int
    part: int = 0


@dataclass(frozen=True, slots=True)
class JobProgress:
    """The provider running the job finished `step` of `total` sampling steps."""

    step: int
    total: int
    part: int = 0


DispatchEvent = JobWaiting | JobAssigned | JobProgress
#: Called with each event of a job, in the dispatcher's task: it must not block or raise.
EventCallback = Callable[[DispatchEvent], None]


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Failover and deadlines (seconds) of a gateway's dispatcher."""

    max_attempts: int = MAX_ATTEMPTS
    #: The default deadline is base + job.cost * per_unit, at most cap.
    deadline_base: float = 30.0
    deadline_per_unit: float = 2.0
    deadline_cap: float = 600.0
    dht_lookup_timeout: float = 5.0
    #: Longest a job waits for a full provider to have room (at most half its deadline);
    #: 0: a 503 at once.
    queue_wait: float = 30.0
    #: Jobs waiting at once; more get a 503 at once.
    max_waiting: int = 1024

    def __post_init__(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        require_at_least(self, 1, "max_attempts")
        require_at_least(self, 0, "max_waiting")
        require_positive(self, "deadline_base", "deadline_cap", "dht_lookup_timeout")
        for name in ("deadline_per_unit", "queue_wait"):  # 0 is allowed: no wait, no scaling
            value = getattr(self, name)
            ok = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value >= 0
            )
            require(self, name, ok, "must be a finite number ≥ 0")


class LocalRunner(Protocol):
    """`Provider.run_job`: runs a job on a provider of our own peer."""

    async def __call__(
        self,
        job: JobRequest,
        *,
        deadline: float,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> JobResult: ...


class ResultChecker(Protocol):
    """What checks the results of clients' jobs (`gateway.spotcheck.SpotChecker`)."""

    async def __call__(
        self, job: JobRequest, result: DispatchResult, *, verify: bool
    ) -> DispatchResult:
        """The result to answer with: `result`, with its spot check in ``info``, or, with
        `verify`, once a second provider agreed (another's images if `result`'s lost)."""
        ...


class Dispatcher:
    """Runs jobs on providers found through `directory`, talking through `peer`'s host.

    `checker`, when set, checks every job `run` runs (see ResultChecker).
    """

    def __init__(
        self,
        peer: Peer,
        directory: ProviderDirectory,
        config: GatewayConfig,
        *,
        rng: random.Random | None = None,
        local: LocalRunner | None = None,
        metrics: DispatchMetrics | None = None,
    ) -> None:
        """`local`: how to run a job on a provider on this same peer (`Provider.run_job`);
        without it our own peer is never chosen, since a host cannot dial itself.
        `metrics`: where to record jobs (default: in the peer's registry).
        """
        self.peer = peer
        self.directory = directory
        self.config = config
        self.local = local
        self.metrics = metrics or DispatchMetrics(peer.metrics)
        self._rng = rng or random.Random()
        self._lines: dict[str, WaitQueue] = {}  # normalized model name -> its jobs waiting
        self._tickets = itertools.count()
        self._waiting = 0
        self.checker: ResultChecker | None = None
        self._running = 0  # attempts in flight
        self._work_held = 0.0  # megapixel-steps of the jobs accepted and not ended
        # Never closed: a Dispatcher lives as long as its peer's cache.
        self._advert_subscription = peer.adverts.subscribe(self._on_advert)

    @property
    def waiting(self) -> int:
        """Jobs waiting now for a provider to have room."""
        return self._waiting

    @property
    def running(self) -> int:
        """Jobs sent to a provider now and not back yet."""
        return self._running

    @property
    def queued_megapixel_steps(self) -> float:
        """The work (megapixel-steps) of the jobs accepted and not ended yet."""
        return max(self._work_held, 0.0)

    def default_deadline(self, job: JobRequest) -> float:
        """Seconds a job may take when the client sets no deadline, scaled by its cost."""
        config = self.config
        return min(config.deadline_base + job.cost * config.deadline_per_unit, config.deadline_cap)

    async def run(
        self,
        job: JobRequest,
        *,
        deadline: float | None = None,
        on_event: EventCallback | None = None,
        part: int = 0,
        verify: bool = False,
        job_id: str | None = None,
        prefer: Collection[str] = (),
        own_load: bool = False,
    ) -> DispatchResult:
        """Run `job` within `deadline` seconds (default: `default_deadline`) and return its
        images, trying up to `config.max_attempts` providers.

        A seed of -1 is replaced by a random one (``info["seed"]`` says which). `on_event`
        hears the job's events (see `DispatchEvent`), each with `part`. With `verify`, the
        answer waits until a second provider agrees (``info["verified"]``, and
        ``info["verification"]`` says how, or why not). `job_id` names the job in the logs,
        here and on the provider (default: a fresh id; ValueError if it is not 1 to 64 of
        ``[A-Za-z0-9._:-]``). `prefer`: peer ids (text) of providers that take the job first
        whenever one of them has a slot free of our jobs (the client's own). `own_load`:
        choose the provider by this gateway's jobs there only, not its advertised queue (the
        job service, filling the slots it knows are free). Raises a DispatchError subclass
        (`gateway.errors`). Cancelling is safe: the job's stream is reset, which cancels it
        on the provider.
        """
        if job_id is None:  # unique across gateways, so not from `self._rng` (maybe seeded)
            job_id = new_job_id()
        else:
            try:
                check_job_id(job_id)
            except JobError as exc:
                raise ValueError(exc.message) from None
        if job.seed == -1:
            job = job.with_seed(self._rng.randrange(MAX_SEED + 1))
        result = await self._dispatch(
            job,
            deadline,
            job_id,
            on_event=on_event,
            part=part,
            prefer=frozenset(prefer),
            own_load=own_load,
        )
        if self.checker is not None:
            return await self.checker(job, result, verify=verify)
        if verify:
            result.info.update(verified=False, verification="this gateway checks no results")
        return result

    async def rerun(
        self,
        job: JobRequest,
        *,
        avoid: Collection[PeerId] = (),
        deadline: float | None = None,
        proven_only: bool = True,
        job_id: str | None = None,
    ) -> DispatchResult:
        """Run `job` (with a concrete seed) again for a second opinion: on a provider not in
        `avoid` (and proven here, with `proven_only`), without a check of its own. `job_id`
        names it in the logs as `run`'s does (default: a fresh id).

        Raises a DispatchError subclass as `run` does, NoProvider or AllBusy when no such
        provider can take it.
        """
        if job.seed == -1:
            raise ValueError("a job run again needs its concrete seed")
        job_id = new_job_id() if job_id is None else job_id
        return await self._dispatch(
            job, deadline, job_id, avoid=frozenset(avoid), proven_only=proven_only
        )

    async def _dispatch(
        self,
        job: JobRequest,
        deadline: float | None,
        job_id: str,
        *,
        on_event: EventCallback | None = None,
        part: int = 0,
        avoid: frozenset[PeerId] = frozenset(),
        proven_only: bool = False,
        prefer: frozenset[str] = frozenset(),
        own_load: bool = False,
    ) -> DispatchResult:
        if deadline is None:
            deadline = self.default_deadline(job)
        started = trio.current_time()
        request = _Request(
            job,
            started,
            started + deadline,
            on_event=on_event,
            part=part,
            avoid=avoid,
            proven_only=proven_only,
            job_id=job_id,
            prefer=prefer,
            own_load=own_load,
        )
        work = job.megapixel_steps
        self._work_held += work
        with log_context(job_id=job_id):
            try:
                result = await self._run(request)
            except BaseException as exc:
                self._ended(request, exc, None)
                raise
            finally:
                self._work_held -= work
            self._ended(request, None, result)
        info = {**result.info, "attempts": request.attempts}
        return DispatchResult(result.images, info, request.tried[-1], result.receipt)

    def _ended(
        self, request: _Request, error: BaseException | None, result: JobResult | None
    ) -> None:
        """Record how `request`'s job ended, in the metrics and in one line at info."""
        job = request.job
        now = trio.current_time()
        status = job_status(error)
        # Queued: until the provider that ran it started (its own queue included); for a
        # job that never ran, until it gave up.
        queue = now - request.started
        run = None
        if result is not None and request.sent is not None:
            provider_queue = result.info.get("queue_ms", 0) / 1000
            queue = min(request.sent - request.started + provider_queue, queue)
            run = now - request.started - queue
        self.metrics.job_ended(job, status, now=now, queue=queue, run=run)
        provider = str(request.tried[-1]) if request.tried else ""
        fields = {
            "model": job.model,
            "provider": provider,
            "status": status,
            "attempts": request.attempts,
            "queue_s": round(queue, 3),
            "run_s": None if run is None else round(run, 3),
        }
        where = f" on {request.tried[-1].short()}" if request.tried else ""
        took = f"queue {queue:.3f} s, run {run:.3f} s" if run is not None else f"{queue:.3f} s"
        why = f": {error.message}" if isinstance(error, DispatchError) else ""
        log.info(
            "%s %s%s: %s, %d attempt(s), %s%s",
            job.kind,
            job.model,
            where,
            status,
            request.attempts,
            took,
            why,
            extra=fields,
        )

    async def check_offered(self, job: JobRequest) -> None:
        """Raise NoProvider unless some provider (in any state, busy or banned) offers all
        that `job` needs; when none is known to offer its model, the DHT is asked first.
        """
        if not self._known(job):
            await self._look_up(job.model, trio.current_time() + self.config.dht_lookup_timeout)
        if not self.directory.can_run(job):
            raise self._nobody_can(job)

    async def run_batch(
        self,
        jobs: Sequence[JobRequest],
        *,
        deadline: float | None = None,
        on_event: EventCallback | None = None,
        verify: bool = False,
        job_id: str | None = None,
        prefer: Collection[str] = (),
        own_load: bool = False,
    ) -> list[DispatchResult]:
        """Run `jobs` in parallel, as `run` runs each (job i's events have ``part=i``), and
        return their results in order. With `job_id`, part i of several is named
        ``<job_id>.<i>`` (one job alone, `job_id`); without, each part gets an id of its own.

        The first to fail cancels the others, and its error is raised.
        """
        results: list[DispatchResult | None] = [None] * len(jobs)

        async def run(index: int, job: JobRequest) -> None:
            part_id = job_id if job_id is None or len(jobs) == 1 else f"{job_id}.{index}"
            results[index] = await self.run(
                job,
                deadline=deadline,
                on_event=on_event,
                part=index,
                verify=verify,
                job_id=part_id,
                prefer=prefer,
                own_load=own_load,
            )

        try:
            async with open_service_nursery() as nursery:
                for index, job in enumerate(jobs):
                    nursery.start_soon(run, index, job)
        except BaseExceptionGroup as group:  # several failed at once: report one
            failures = [exc for exc in group.exceptions if isinstance(exc, SdcnError)]
            if len(failures) < len(group.exceptions):
                raise
            raise failures[0] from None
        return [result for result in results if result is not None]

    async def _run(self, request: _Request) -> JobResult:
        job = request.job
        looked_up = False
        while len(request.tried) < self.config.max_attempts:
            # A newcomer queues behind the jobs waiting for its model: the room a job frees
            # is theirs, and racing them for it only meets busy answers.
            candidate = None if self._behind_line(request) else self._choose(request)
            # Only when nobody is known to offer the model: providers that are all busy or
            # banned are no reason for a lookup, which would hold up every 503 under load.
            if candidate is None and not looked_up and not self._known(job):
                looked_up = True
                await self._look_up(job.model, request.end)
                candidate = self._choose(request)
            if candidate is None:
                candidate = await self._wait_for_room(request)
            if candidate is None:
                break
            left = request.end - trio.current_time()
            if left <= 0:
                raise DeadlinePassed("the deadline passed before a provider was found")
            result = await self._attempt(request, candidate, left)
            if result is not None:
                return result
        raise self._no_result(request)

    async def _wait_for_room(self, request: _Request) -> Candidate | None:
        """Queue until a provider has room for `request`'s job and return it; None when the
        wait ends without one, or when the job is not one to wait for (nobody could run it,
        the queue is full, or it had its wait).
        """
        config = self.config
        now = trio.current_time()
        if (
            request.busy >= _MAX_BUSY
            or config.queue_wait <= 0
            or not (self._behind_line(request) or self._only_full(request))
        ):
            return None
        line = normalize_model_name(request.job.model)
        if request.wait_until == 0.0:  # its first wait
            if self._waiting >= config.max_waiting:
                return None
            limit = min(config.queue_wait, (request.end - now) / 2)
            self._refuse_if_late(request, self._lines.get(line), limit)
            request.wait_until = now + limit
            request.ticket = next(self._tickets)
        line = normalize_model_name(request.job.model)
        queue = self._lines.setdefault(line, WaitQueue(now))
        event = queue.join(request.ticket)
        request.waiting_at(queue.position(request.ticket))
        self._waiting += 1
        try:
            while trio.current_time() < request.wait_until:
                with trio.move_on_at(min(request.wait_until, trio.current_time() + _RECHECK)):
                    await event.wait()
                if event.is_set():  # woken, and so out of line: back to its place
                    queue = self._lines.setdefault(line, queue)
                    event = queue.join(request.ticket)
                    request.waiting_at(queue.position(request.ticket))
                elif not queue.is_first(request.ticket):
                    continue  # looking again unwoken is for the first in line
                candidate = self._choose(request)
                if candidate is not None:
                    queue.leave(request.ticket, event)
                    queue.wake()  # the next in line may find room too
                    return candidate
                if not self._only_full(request):
                    return None  # no provider left to wait for (banned, or gone)
            return None
        finally:
            self._waiting -= 1
            queue.leave(request.ticket, event)
            if not queue and self._lines.get(line) is queue:
                del self._lines[line]

    def _refuse_if_late(self, request: _Request, queue: WaitQueue | None, limit: float) -> None:
        """Raise a 503 now if `request`'s job would not start within `limit` seconds of
        waiting behind `queue` (see gateway.backlog), with that estimate as Retry-After.
        """
        now = trio.current_time()
        job = request.job
        speed, queued = self.directory.capacity(
            job, self.peer.wall_clock(), exclude=self._exclude(request)
        )
        measured = queue.throughput.rate(now) if queue is not None else None
        rate = speed if measured is None else measured
        ahead = len(queue) if queue is not None else 0
        wait = start_in(ahead, queued, rate)
        if wait > limit:
            raise AllBusy(
                f"every provider of model {job.model!r} is full: {ahead + queued} job(s) ahead "
                f"at {rate:.1f}/s would start this one in {wait:.0f} s, past its {limit:.0f} s "
                "wait",
                retry_after=min(wait, _MAX_RETRY_AFTER),
            )

    def _behind_line(self, request: _Request) -> bool:
        """Whether `request` has not waited yet and jobs of its model are waiting (and
        none of the providers it prefers has room: those serve their owner first)."""
        return (
            request.wait_until == 0.0
            and bool(self._lines.get(normalize_model_name(request.job.model)))
            and self._own(request) is None
        )

    def _only_full(self, request: _Request) -> bool:
        return self.directory.only_full(
            request.job, self.peer.wall_clock(), exclude=self._exclude(request)
        )

    def _on_advert(self, advert: Advert) -> None:
        if not advert.is_online_provider:
            return
        if advert.full:  # it would answer busy: hold it back as if it had, without asking
            self.directory.hold_busy(advert.peer_id, self.peer.wall_clock(), advert.seq)
            return
        names = {normalize_model_name(n) for m in advert.models for n in (m.name, m.title) if n}
        for name in names:
            queue = self._lines.get(name)
            if queue is not None:
                queue.wake(max(1, advert.slots - advert.queue))

    def _known(self, job: JobRequest) -> bool:
        """Whether any provider we know of offers `job`'s model with its LoRAs."""
        return self.directory.has_model(job.model, [name for name, _ in job.loras])

    def _own(self, request: _Request) -> Candidate | None:
        """One of the providers `request` prefers, if one has a slot free of our jobs."""
        if not request.prefer:
            return None
        found = self.directory.candidates(
            request.job, self.peer.wall_clock(), exclude=self._exclude(request), own_load=True
        )
        return next(
            (c for c in found if str(c.peer_id) in request.prefer and c.in_flight < c.advert.slots),
            None,
        )

    def _choose(self, request: _Request) -> Candidate | None:
        own = self._own(request)
        if own is not None:
            return own
        if request.own_load:
            found = self.directory.candidates(
                request.job, self.peer.wall_clock(), exclude=self._exclude(request), own_load=True
            )
            if found:
                return found[0]
        return self.directory.choose(
            request.job,
            self.peer.wall_clock(),
            exclude=self._exclude(request),
            proven_only=request.tried_unproven,
        )

    def _exclude(self, request: _Request) -> set[PeerId]:
        exclude = set(request.tried) | request.avoid
        if request.proven_only:  # the others are no candidates, nor worth waiting for
            directory = self.directory
            capable = directory.capable(request.job, self.peer.wall_clock(), exclude=exclude)
            exclude.update(a.peer_id for a in capable if not directory.is_proven(a.peer_id))
        if self.local is None:
            exclude.add(self.peer.peer_id)
        return exclude

    def _has_proven_fallback(self, request: _Request) -> bool:
        """Whether a proven provider not yet tried could take the job."""
        found = self.directory.candidates(
            request.job, self.peer.wall_clock(), exclude=self._exclude(request)
        )
        return any(candidate.proven for candidate in found)

    async def _attempt(
        self, request: _Request, candidate: Candidate, left: float
    ) -> JobResult | None:
        """Run the job on `candidate`; None when it failed in a way worth another provider."""
        peer = candidate.peer_id
        host = self.peer.host
        request.tried.append(peer)
        request.emit(JobAssigned(peer, request.attempts))
        on_progress = request.progress_callback()
        shortened = False
        if not candidate.proven:
            request.tried_unproven = True
            if self._has_proven_fallback(request):
                left, shortened = left / 2, True
        if candidate.advert.addrs and not host.is_connected(peer):
            host.peerstore.add_addrs(peer, candidate.advert.addrs)
        log.debug("attempt %d on %s, eta %.1f s", len(request.tried), peer.short(), candidate.eta)
        self.directory.started(peer)
        self._running += 1
        busy = False
        outcome = "cancelled"  # unless it ends otherwise
        sent = request.sent = trio.current_time()
        try:
            if peer == self.peer.peer_id and self.local is not None:
                result = await self.local(request.job, deadline=left, on_progress=on_progress)
            else:
                result = await request_job(
                    host,
                    peer,
                    request.job,
                    deadline=left,
                    on_progress=on_progress,
                    job_id=request.job_id,
                )
            await self._check_receipt(request, peer, result)
            outcome = "ok"
        except JobError as exc:
            outcome = _ATTEMPT_OUTCOME.get(exc.code, "failed")
            log.debug("%s failed the job: %s", peer.short(), exc)
            if exc.code is JobErrorCode.BAD_REQUEST:
                raise Rejected(exc.message) from None
            if exc.code is JobErrorCode.TIMEOUT:
                if left >= _TIMEOUT_BAN_FACTOR * candidate.eta:
                    self.directory.ban(peer, self.peer.wall_clock())
                if shortened:  # a proven provider has the other half
                    request.last_error = exc
                    return None
                raise DeadlinePassed(f"no result within the deadline: {exc.message}") from None
            if exc.code is JobErrorCode.BUSY:  # back-pressure, not a failure: no ban
                busy = True
                request.last_error = exc
                return None
            self._failed(request, peer, exc)
            return None
        except NETWORK_ERRORS as exc:
            log.debug("job on %s broke: %r", peer.short(), exc)
            outcome = "failed"
            if self._refused_stream(peer, candidate, exc):
                outcome = "busy"
                busy = True
                request.last_error = exc
                return None
            self._failed(request, peer, exc)
            return None
        finally:
            self._running -= 1
            self.metrics.attempt(outcome)
            self.directory.finished(peer)
            if busy:  # after `finished`, which lifts holds
                self.directory.hold_busy(peer, self.peer.wall_clock(), candidate.advert.seq)
                # Not an attempt that failed: the provider may take the job once it has room.
                request.tried.remove(peer)
                request.busy += 1
            else:  # room for the job of this model that waited longest
                queue = self._lines.get(normalize_model_name(request.job.model))
                if queue is not None:
                    queue.throughput.record(trio.current_time())
                    queue.wake()
        self.directory.succeeded(peer)
        queued = result.info.get("queue_ms", 0) / 1000
        self.directory.observe(peer, request.job.cost, trio.current_time() - sent, queued)
        return result

    async def _check_receipt(self, request: _Request, peer: PeerId, result: JobResult) -> None:
        """Raise RecordError unless `result` carries `peer`'s valid receipt for the job and
        its images (hashing large ones in a worker thread)."""
        if result.receipt is None:
            raise RecordError("the provider did not sign its result")
        receipt = Receipt.from_bytes(result.receipt)
        job, images = request.job, result.images
        size = len(job.init_image or b"") + sum(map(len, images))
        if size <= _THREAD_HASH_BYTES:
            receipt.check(peer, job_digest(job), images)
        else:
            await trio.to_thread.run_sync(lambda: receipt.check(peer, job_digest(job), images))

    def _refused_stream(self, peer: PeerId, candidate: Candidate, exc: BaseException) -> bool:
        """Whether `exc` is a provider refusing one more stream while we keep it full (its
        stream limit): back-pressure like busy, not a failure, as long as the connection
        lives and we have more jobs in flight there than it has slots.
        """
        return (
            isinstance(exc, StreamReset)
            and self.peer.host.is_connected(peer)
            and self.directory.in_flight(peer) > candidate.advert.slots
        )

    def _failed(self, request: _Request, peer: PeerId, exc: BaseException) -> None:
        self.directory.ban(peer, self.peer.wall_clock())
        request.last_error = exc

    async def _look_up(self, model: str, end: float) -> None:
        """Add the adverts the DHT holds for `model` to the AdvertCache."""
        envelopes: list[Envelope] = []
        with trio.move_on_at(min(trio.current_time() + self.config.dht_lookup_timeout, end)):
            try:
                envelopes = await self.peer.dht.get(model_key(model))
            except NETWORK_ERRORS as exc:
                log.debug("DHT lookup of %r failed: %s", model, exc)
        added = 0
        for envelope in envelopes:
            try:
                added += self.peer.adverts.add(envelope) is not None
            except RecordError as exc:
                log.debug("DHT gave an unusable advert for %r: %s", model, exc)
        log.debug("DHT lookup of %r: %d advert(s), %d new", model, len(envelopes), added)

    def _no_result(self, request: _Request) -> DispatchError:
        job = request.job
        error = request.last_error
        if error is not None:
            if isinstance(error, JobError) and error.code is JobErrorCode.BACKEND_FAILED:
                return ProviderFailed(f"provider failed: {error.message}")
            last = str(error) or type(error).__name__
            waited = ""
            if request.wait_until:
                waited = f" in {trio.current_time() - request.started:.0f} s"
            return AllBusy(
                f"{request.attempts} attempt(s){waited}, no provider could run the job; "
                f"last: {last}"
            )
        return self._nobody_can(job)

    def _nobody_can(self, job: JobRequest) -> DispatchError:
        """Why no provider took `job` at all: NoProvider if none offers it, else AllBusy."""
        directory = self.directory
        model = job.model
        loras = [name for name, _ in job.loras]
        if not directory.has_model(model):
            return NoProvider(f"no provider offers model {model!r}")
        if not directory.has_model(model, loras):
            missing = [name for name in loras if not directory.has_model(model, [name])]
            if missing:
                names = ", ".join(repr(name) for name in missing)
                return NoProvider(f"no provider of model {model!r} offers LoRA {names}")
            names = ", ".join(repr(name) for name in loras)
            return NoProvider(f"no provider of model {model!r} offers LoRAs {names} together")
        if not directory.can_run(job):
            return NoProvider(
                f"no provider of model {model!r} offers sampler {job.sampler_name!r} "
                f"at {job.width}x{job.height} with {job.steps} steps"
            )
        return AllBusy(f"every provider of model {model!r} is busy, failing or unavailable")


@dataclass(slots=True)
class _Request:
    """One request's progress through its providers."""

    job: JobRequest
    started: float  # trio time
    end: float  # trio time when the deadline passes
    #: Providers that ran or failed the job (not those that answered busy).
    tried: list[PeerId] = field(default_factory=list)
    tried_unproven: bool = False  # an attempt went to a provider not proven yet
    busy: int = 0  # busy answers
    wait_until: float = 0.0  # trio time the wait for room ends; 0.0 before the first wait
    ticket: int = 0  # its place in line for room (see WaitQueue), from its first wait
    last_error: BaseException | None = None
    on_event: EventCallback | None = None
    part: int = 0  # which job of a batch
    position: int | None = None  # in line for room, as last reported
    avoid: frozenset[PeerId] = frozenset()  # providers never to try (a second opinion's)
    proven_only: bool = False  # only providers proven here (a second opinion)
    job_id: str = ""
    sent: float | None = None  # trio time the latest attempt was sent
    prefer: frozenset[str] = frozenset()  # providers (peer ids) to take it first
    own_load: bool = False  # choose by this gateway's jobs at each provider only

    @property
    def attempts(self) -> int:
        return len(self.tried) + self.busy

    def emit(self, event: JobWaiting | JobAssigned) -> None:
        if self.on_event is not None:
            self.on_event(replace(event, part=self.part))

    def waiting_at(self, position: int) -> None:
        """Report the job's place in line, if it is not the one reported last."""
        if position != self.position:
            self.position = position
            self.emit(JobWaiting(position))

    def progress_callback(self) -> Callable[[int, int], None] | None:
        """What reports the provider's progress as JobProgress events, if anyone listens."""
        on_event, part = self.on_event, self.part
        if on_event is None:
            return None
        return lambda step, total: on_event(JobProgress(step, total, part))
