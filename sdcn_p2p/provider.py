"""The provider role: advertise what a backend can run, and run jobs for other peers.

A Provider serves ``/sdcn/job/2.0.0`` on a Peer. It runs at most `slots` jobs at once and
keeps at most `max_queue` more waiting; beyond that it refuses with ``busy``. It checks every
job against the capabilities it advertised (a webui would silently run another model) and
refuses with ``unsupported``. Closing or resetting the job stream cancels the job. Every
result goes out with the provider's signed receipt for the job and its images
(`sdcn_p2p.jobs.receipts`).

Its signed advert is republished every `advert_interval` seconds and within a second of a
change in load, capabilities or state. A backend that cannot be reached makes the provider
advertise itself ``unavailable`` until it answers again. `drain()` advertises ``draining``,
refuses new jobs and returns once the running ones are done.

A provider that cannot accept connections (no advertised address) dials every gateway it
learns of from their adverts and keeps those connections alive: gateways send it jobs over
the connections it opened.

Each job's log lines carry its id (the one in the job request, else one of our own), and a
job that was not refused ends with one line at info: its model, outcome, and time queued and
run (never the prompt). The provider's metrics (``sdcn_provider_...``) count jobs by outcome,
time their runs, and read its queue, busy slots, speed and VRAM at each scrape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from sdcn_p2p._config import require, require_at_least, require_positive
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.backends import Backend, Capabilities
from sdcn_p2p.connection import Stream
from sdcn_p2p.errors import NETWORK_ERRORS, BackendUnavailable, JobError, JobErrorCode, SdcnError
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs import JobRequest, JobResult
from sdcn_p2p.jobs.images import PNG_SIGNATURE
from sdcn_p2p.jobs.protocol import (
    JOB,
    MAX_JOB_MESSAGE,
    error_message,
    parse_job_id,
    parse_job_message,
    progress_message,
    queued_message,
    result_message,
)
from sdcn_p2p.jobs.receipts import Receipt, job_digest
from sdcn_p2p.jobs.schema import new_job_id
from sdcn_p2p.logs import log_context
from sdcn_p2p.peer import Peer
from sdcn_p2p.records import Advert, AdvertState, Reachability, Role

__all__ = [
    "Provider",
    "ProviderConfig",
    "open_provider",
    "run_until_signalled",
]

log = logging.getLogger(__name__)

#: Seconds a job stream has to deliver its request.
REQUEST_TIMEOUT = 30.0
#: it/s at 512x512 advertised before any job is measured, when the backend has no estimate.
DEFAULT_SPEED = 1.0
#: Weight of the newest job in the measured speed (an EWMA).
SPEED_ALPHA = 0.3
# Jobs whose init image and results exceed this many bytes are signed in a worker thread.
_THREAD_BYTES = 1024 * 1024
#: Bytes in the MiB that backends report VRAM in.
_MIB = 2**20


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """Capacity, timers (seconds) and advert settings of a provider."""

    slots: int = 1
    max_queue: int = 8
    advert_interval: float = 60.0
    advert_ttl: float = 180.0
    #: Least time between two adverts: changes are batched for this long.
    min_advert_gap: float = 1.0
    capability_interval: float = 30.0
    #: Longest a job may run, whatever deadline the gateway asks for.
    max_job_seconds: float = 900.0
    #: it/s at 512x512 advertised until a job has been measured (None: the backend's own guess).
    initial_speed: float | None = None
    #: Extra roles to advertise (a provider that is also a gateway).
    roles: tuple[str, ...] = field(default=(Role.PROVIDER,))

    def __post_init__(self) -> None:
        require_at_least(self, 1, "slots")
        require_at_least(self, 0, "max_queue")
        require_positive(
            self,
            "advert_interval",
            "advert_ttl",
            "min_advert_gap",
            "capability_interval",
            "max_job_seconds",
        )
        require(
            self,
            "advert_ttl",
            self.advert_ttl > self.advert_interval,
            "must exceed advert_interval, or adverts expire before they are renewed",
        )
        if self.initial_speed is not None:
            require_positive(self, "initial_speed")
        ok = isinstance(self.roles, tuple) and all(isinstance(r, str) and r for r in self.roles)
        require(self, "roles", ok, "must be a tuple of role names")


class Provider:
    """Runs jobs on `backend` for the network. Create with `open_provider`."""

    def __init__(self, peer: Peer, backend: Backend, config: ProviderConfig) -> None:
        self.peer = peer
        self.backend = backend
        self.config = config
        self.capabilities: Capabilities | None = None
        self.state: AdvertState = AdvertState.UNAVAILABLE  # until the backend has answered once
        self.running = 0
        self.waiting = 0
        self.jobs_done = 0
        self.jobs_cancelled = 0  # by clients that closed their stream
        self.speed = config.initial_speed
        self._slots = trio.Semaphore(config.slots)
        self._changed = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._seq = 0
        self._nursery: trio.Nursery | None = None
        self._gateways: set[PeerId] = set()
        self.advert: Advert | None = None
        self._instrument()

    @property
    def load(self) -> int:
        """Jobs running or waiting for a slot."""
        return self.running + self.waiting

    @property
    def advertised_speed(self) -> float:
        """The speed (it/s at 512x512) our advert gives: measured, else the backend's
        estimate, else DEFAULT_SPEED."""
        if self.speed is not None:
            return self.speed
        caps = self.capabilities
        return caps.speed if caps is not None and caps.speed else DEFAULT_SPEED

    def _instrument(self) -> None:
        metrics = self.peer.metrics
        self._jobs_total = metrics.counter(
            "sdcn_provider_jobs_total",
            "Job requests by outcome: ok, or the error code answered (busy, unsupported, "
            "bad_request, backend_failed, timeout, cancelled)",
            ["outcome"],
        )
        self._run_seconds = metrics.histogram(
            "sdcn_provider_job_run_seconds",
            "Time the backend ran each job that got a slot (ending in any outcome)",
        )
        for name, what, read in (
            ("sdcn_provider_queue_length", "Jobs waiting for a slot", lambda: self.waiting),
            ("sdcn_provider_slots_busy", "Slots running a job", lambda: self.running),
            (
                "sdcn_provider_speed_its",
                "Speed in iterations per second at 512x512, as advertised",
                lambda: self.advertised_speed,
            ),
        ):
            metrics.gauge(name, what).set_function(read)
        vram = metrics.gauge("sdcn_provider_vram_bytes", "The backend's GPU memory", ["kind"])
        vram.labels("total").set_function(
            lambda: _MIB * self.capabilities.vram_total_mb if self.capabilities else 0
        )
        vram.labels("free").set_function(
            lambda: _MIB * self.capabilities.vram_free_mb if self.capabilities else 0
        )

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve jobs and keep the advert current until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._refresh_capabilities()
            self.peer.host.set_handler(JOB, self._handle_job, max_message_size=MAX_JOB_MESSAGE)
            with contextlib.ExitStack() as subscriptions:
                if not self.peer.reachable:
                    # Dial every gateway we learn of, and again when its connection drops.
                    subscriptions.enter_context(self.peer.adverts.subscribe(self._on_advert))
                    subscriptions.enter_context(
                        self.peer.host.subscribe(on_disconnected=self._on_disconnected)
                    )
                    for advert in self.peer.adverts:
                        self._on_advert(advert)
                nursery.start_soon(self._capabilities_loop)
                nursery.start_soon(self._advert_loop)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self.peer.host.remove_handler(JOB)
                    self._nursery = None

    async def wait_idle(self) -> None:
        """Return once no job is running or waiting here."""
        while self.load:
            await self._idle.wait()

    async def drain(self) -> None:
        """Advertise ``draining``, refuse new jobs and wait for the running ones to finish."""
        if self.state is not AdvertState.DRAINING:
            log.info("draining: %d job(s) to finish", self.load)
            self.state = AdvertState.DRAINING
            # Sent before anything else happens: with no job running, the peer may close next.
            await self._publish(flush=True)
        await self.wait_idle()

    # --- capabilities and adverts --------------------------------------------------------------

    async def _capabilities_loop(self) -> None:
        while True:
            await trio.sleep(self.config.capability_interval)
            await self._refresh_capabilities()

    async def _refresh_capabilities(self) -> None:
        try:
            capabilities = await self.backend.capabilities()
        except BackendUnavailable as exc:
            if self.state is AdvertState.ONLINE:
                log.warning("backend unavailable: %s", exc)
                self.state = AdvertState.UNAVAILABLE
                self._mark_changed()
            return
        # Free VRAM moves all the time: it goes out with the next periodic advert, but alone it
        # is no reason to republish.
        steady = dataclasses.replace(capabilities, vram_free_mb=0)
        held = self.capabilities
        changed = held is None or steady != dataclasses.replace(held, vram_free_mb=0)
        self.capabilities = capabilities
        if changed or self.state is AdvertState.UNAVAILABLE:
            if self.state is AdvertState.UNAVAILABLE:
                log.info(
                    "backend %s ready: %d model(s), %d LoRA(s)",
                    capabilities.backend,
                    len(capabilities.models),
                    len(capabilities.loras),
                )
                self.state = AdvertState.ONLINE
            self._mark_changed()

    def _mark_changed(self) -> None:
        self._changed.set()

    async def _advert_loop(self) -> None:
        while True:
            await self._publish()
            with trio.move_on_after(self.config.advert_interval):
                await self._changed.wait()
            await trio.sleep(self.config.min_advert_gap)  # batch bursts of changes

    async def _publish(self, *, flush: bool = False) -> None:
        self._changed = trio.Event()
        advert = self._build_advert()
        self.advert = advert
        try:
            await self.peer.publish_advert(advert, flush=flush)
        except SdcnError as exc:
            log.warning("could not publish our advert: %s", exc)

    def _build_advert(self) -> Advert:
        caps = self.capabilities
        now = self.peer.wall_clock()
        self._seq = max(self._seq + 1, int(now * 1000))
        host = self.peer.host
        return Advert(
            peer_id=self.peer.peer_id,
            seq=self._seq,
            issued_at=now,
            ttl=self.config.advert_ttl,
            addrs=tuple(host.advertised_addrs),
            reachability=(
                Reachability.PUBLIC if self.peer.reachable else Reachability.OUTBOUND_ONLY
            ),
            backend=caps.backend if caps else getattr(self.backend, "name", ""),
            models=caps.models if caps else (),
            loras=caps.loras if caps else (),
            samplers=caps.samplers if caps else (),
            vram_total_mb=caps.vram_total_mb if caps else 0,
            vram_free_mb=caps.vram_free_mb if caps else 0,
            max_pixels=caps.max_pixels if caps else 0,
            max_steps=caps.max_steps if caps else 0,
            slots=self.config.slots,
            queue=min(self.load, 10**6),
            max_queue=min(self.config.max_queue, 10**6),
            speed=min(self.advertised_speed, 1e4),
            state=self.state,
            roles=self.config.roles,
        )

    # --- gateways, for providers nobody can dial -------------------------------------------------

    def _on_advert(self, advert: Advert) -> None:
        if (
            Role.GATEWAY in advert.roles
            and advert.peer_id != self.peer.peer_id
            and advert.addrs
            and advert.peer_id not in self._gateways
            and self._nursery is not None
        ):
            self._gateways.add(advert.peer_id)
            self.peer.host.peerstore.add_addrs(advert.peer_id, list(advert.addrs))
            self.peer.host.keep_alive(advert.peer_id)
            self._nursery.start_soon(self._dial_gateway, advert.peer_id)

    def _on_disconnected(self, peer: PeerId) -> None:
        if peer in self._gateways and self._nursery is not None:
            self._nursery.start_soon(self._dial_gateway, peer)

    async def _dial_gateway(self, peer: PeerId) -> None:
        """Connect to a gateway so it can send us jobs; retry with backoff while it advertises."""
        delay = 1.0
        while peer in self._gateways and not self.peer.host.is_connected(peer):
            try:
                await self.peer.host.connect(peer)
                log.info("connected to gateway %s", peer)
                return
            except SdcnError as exc:
                if self.peer.adverts.get(peer) is None:
                    # The gateway stopped advertising: forget it.
                    self._gateways.discard(peer)
                    self.peer.host.keep_alive(peer, False)
                    return
                log.info("gateway %s unreachable (%s); retrying in %.0f s", peer, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 300.0)

    # --- jobs --------------------------------------------------------------------------------

    async def run_job(
        self,
        job: JobRequest,
        *,
        deadline: float,
        on_progress: Callable[[int, int], None] | None = None,
        on_queued: Callable[[int], None] | None = None,
    ) -> JobResult:
        """Run `job` here within `deadline` seconds: the job protocol's handler and a gateway
        on this same peer both come through here.

        `on_queued(position)` is called when the job has to wait for a slot. Raises JobError
        (busy, unsupported, backend_failed, timeout); cancelling cancels the job.
        """
        clock = _JobClock(trio.current_time())
        outcome = str(JobErrorCode.BACKEND_FAILED)  # unless it ends otherwise
        try:
            self._check_supported(job)
            clock.accepted = True
            deadline = min(deadline, self.config.max_job_seconds)
            with trio.move_on_at(clock.received + deadline):
                result = await self._queue_and_run(job, clock, on_progress, on_queued)
                outcome = "ok"
                return result
            raise JobError(JobErrorCode.TIMEOUT, f"job did not finish within {deadline:.0f} s")
        except JobError as exc:
            outcome = str(exc.code)
            raise
        except trio.Cancelled:
            outcome = str(JobErrorCode.CANCELLED)
            raise
        finally:
            self._ended(job, outcome, clock)

    def _ended(self, job: JobRequest, outcome: str, clock: _JobClock) -> None:
        """Count a job that ended in `outcome`, and log it if it was not refused."""
        self._jobs_total.labels(outcome).inc()
        now = trio.current_time()
        started = clock.started if clock.started is not None else now
        queue, run = started - clock.received, now - started
        if clock.started is not None:
            self._run_seconds.observe(run)
        if not clock.accepted:
            log.debug("refused a %s job of %s: %s", job.kind, job.model, outcome)
            return
        log.info(
            "ran a %s job of %s: %s, queue %.3f s, run %.3f s",
            job.kind,
            job.model,
            outcome,
            queue,
            run,
            extra={
                "model": job.model,
                "status": outcome,
                "queue_s": round(queue, 3),
                "run_s": round(run, 3),
            },
        )

    def _check_supported(self, job: JobRequest) -> None:
        """Refuse what this provider cannot run right now (busy) or at all (unsupported)."""
        if self.state is AdvertState.DRAINING:
            raise JobError(JobErrorCode.BUSY, "provider is draining")
        if self.state is AdvertState.UNAVAILABLE or self.capabilities is None:
            raise JobError(JobErrorCode.BUSY, "provider's backend is unavailable")
        self.capabilities.resolve(job)  # JobError(JobErrorCode.UNSUPPORTED) naming what is missing
        if self.load >= self.config.slots + self.config.max_queue:
            raise JobError(JobErrorCode.BUSY, f"{self.load} job(s) running or queued")

    async def _queue_and_run(
        self,
        job: JobRequest,
        clock: _JobClock,
        on_progress: Callable[[int, int], None] | None,
        on_queued: Callable[[int], None] | None,
    ) -> JobResult:
        if self._idle.is_set():
            self._idle = trio.Event()
        self.waiting += 1
        running = False
        self._mark_changed()
        try:
            if self._slots.value == 0 and on_queued is not None:
                on_queued(self.waiting - 1)
            async with self._slots:
                self.waiting -= 1
                self.running += 1
                running = True
                return await self._generate(job, clock, on_progress or _ignore_progress)
        finally:
            if running:
                self.running -= 1
            else:
                self.waiting -= 1
            self._mark_changed()
            if self.load == 0:
                self._idle.set()

    async def _generate(
        self, job: JobRequest, clock: _JobClock, on_progress: Callable[[int, int], None]
    ) -> JobResult:
        started = clock.started = trio.current_time()
        try:
            output = await self.backend.generate(job, on_progress)
        except JobError as exc:
            if exc.code is JobErrorCode.BACKEND_FAILED and self._nursery is not None:
                # Is the backend gone? Find out now rather than at the next refresh.
                self._nursery.start_soon(self._refresh_capabilities)
            raise
        run_s = max(trio.current_time() - started, 1e-3)
        self._measure(job, run_s)
        self.jobs_done += 1
        info: dict[str, Any] = {
            **output.info,
            "seed": job.seed,
            "model": job.model,
            "sampler_name": job.sampler_name,
            "steps": job.steps,
            "width": job.width,
            "height": job.height,
            "provider": str(self.peer.peer_id),
            "backend": self.capabilities.backend if self.capabilities else "",
            "queue_ms": round((started - clock.received) * 1000),
            "run_ms": round(run_s * 1000),
        }
        return JobResult(output.images, info, await self._sign(job, output.images))

    async def _sign(self, job: JobRequest, images: list[bytes]) -> bytes:
        """Our receipt for `images` as `job`'s result (hashing large data in a worker thread)."""

        def sign() -> bytes:
            return Receipt.sign(self.peer.identity, job_digest(job), images).to_bytes()

        size = len(job.init_image or b"") + sum(map(len, images))
        return await trio.to_thread.run_sync(sign) if size > _THREAD_BYTES else sign()

    async def _handle_job(self, stream: Stream) -> None:
        """``/sdcn/job/2.0.0``: one job per stream; closing the stream cancels it."""
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                message = await stream.receive_message()
            try:
                job, deadline = await _parse_job(message)
            except JobError as exc:
                self._jobs_total.labels(str(exc.code)).inc()
                log.debug("refused a job request from %s: %s", stream.peer_id.short(), exc)
                raise
            with log_context(job_id=parse_job_id(message) or new_job_id()):
                await self._serve_job(stream, job, deadline)
        except JobError as exc:
            await _send_quietly(stream, error_message(exc.code, exc.message))
        except trio.TooSlowError:
            await _send_quietly(
                stream, error_message(JobErrorCode.TIMEOUT, "no job request arrived")
            )

    async def _serve_job(self, stream: Stream, job: JobRequest, deadline: float) -> None:
        """Run `job`, telling the client its place in the queue and its progress, and send
        the result."""
        replies = _Replies()
        result: JobResult | None = None
        async with open_service_nursery() as nursery:
            nursery.start_soon(_cancel_when_closed, stream, nursery.cancel_scope)
            nursery.start_soon(replies.forward, stream)
            result = await self.run_job(
                job, deadline=deadline, on_progress=replies.progress, on_queued=replies.queued
            )
            nursery.cancel_scope.cancel()
        if result is None:  # the client closed the stream: the job was cancelled
            self.jobs_cancelled += 1
            return
        await stream.send_message(result_message(result.images, result.info, result.receipt))

    def _measure(self, job: JobRequest, run_s: float) -> None:
        """Fold the job's speed (it/s at 512x512) into the advertised EWMA."""
        work = job.steps * job.batch_size * job.width * job.height / (512 * 512)
        sample = work / run_s
        if self.speed is None:
            self.speed = sample
        else:
            self.speed = (1 - SPEED_ALPHA) * self.speed + SPEED_ALPHA * sample


async def _parse_job(message: Any) -> tuple[JobRequest, float]:
    """Validate a job request; decoding an init image (up to ~1 s of CPU for a large one)
    happens in a worker thread so the peer keeps answering meanwhile. A small PNG is decoded
    at once: deflate packs at most ~1,000 bytes into one, so 8 KiB is at most ~8 MB of pixels,
    a few ms, less than the thread hand-off would cost the job.
    """
    job = message.get("job") if isinstance(message, dict) else None
    init = job.get("init_image") if isinstance(job, dict) else None
    small_png = (
        isinstance(init, bytes)
        and len(init) <= _INLINE_PNG_BYTES
        and init.startswith(PNG_SIGNATURE)
    )
    if init is None or small_png:
        return parse_job_message(message)
    return await trio.to_thread.run_sync(parse_job_message, message)


_INLINE_PNG_BYTES = 8 * 1024


@dataclass(slots=True)
class _JobClock:
    """When a job arrived and started running (trio time), and whether it was accepted."""

    received: float
    accepted: bool = False
    started: float | None = None


class _Replies:
    """What to tell the client while its job waits or runs: the latest queue position and
    (step, total), sent on by one task as they change.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] = []
        self._latest_progress: tuple[int, int] | None = None
        self._event = trio.Event()

    def queued(self, position: int) -> None:
        self._pending.append(queued_message(position))
        self._event.set()

    def progress(self, step: int, total: int) -> None:
        if (step, total) != self._latest_progress:
            self._latest_progress = (step, total)
            self._pending = [m for m in self._pending if m["type"] != "progress"]
            self._pending.append(progress_message(step, total))
            self._event.set()

    async def forward(self, stream: Stream) -> None:
        while True:
            await self._event.wait()
            self._event = trio.Event()
            pending, self._pending = self._pending, []
            for message in pending:
                await stream.send_message(message)


def _ignore_progress(step: int, total: int) -> None:
    pass


async def _cancel_when_closed(stream: Stream, scope: trio.CancelScope) -> None:
    """Cancel `scope` when the client closes or resets the stream (or breaks the protocol)."""
    with contextlib.suppress(*NETWORK_ERRORS):
        await stream.receive_some()
    scope.cancel()


async def _send_quietly(stream: Stream, message: dict[str, Any]) -> None:
    """Best effort: the client may be gone already."""
    try:
        await stream.send_message(message)
    except NETWORK_ERRORS as exc:
        log.debug("could not send %s to %s: %r", message.get("type"), stream.peer_id.short(), exc)


async def run_until_signalled(provider: Provider) -> None:
    """Serve until SIGINT or SIGTERM, then drain: advertise ``draining`` and finish the
    running jobs. A second signal stops at once.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        first = await signals.__anext__()
        log.info(
            "%s: finishing %d job(s) before leaving; again to stop at once",
            signal.Signals(first).name,
            provider.load,
        )
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                await provider.drain()
                nursery.cancel_scope.cancel()

            nursery.start_soon(drain)
            await signals.__anext__()
            log.warning("stopping now: %d job(s) abandoned", provider.load)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_provider(
    peer: Peer, backend: Backend, config: ProviderConfig = ProviderConfig()
) -> AsyncIterator[Provider]:
    """Start providing on `peer`; stops (without draining) when the block exits."""
    async with open_service_nursery() as nursery:
        provider = Provider(peer, backend, config)
        await nursery.start(provider.run)
        try:
            yield provider
        finally:
            nursery.cancel_scope.cancel()
