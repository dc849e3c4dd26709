"""Dispatch and failover: run a job on the best provider, and on the next when one fails.

A job gets a concrete seed first (so that a retry draws the same picture), then goes to the
provider `ProviderDirectory.choose` picks. When one refuses what it advertised, fails in its
backend or drops the connection, it is banned and the next best is tried, up to
`GatewayConfig.max_attempts` providers within the job's deadline. When the AdvertCache knows
no provider for the model (a gateway that just joined), one DHT lookup of the model's key
fills it in (only then: not when every known provider is busy, or every 503 would wait on it).

Busy is back-pressure, not a failure: a provider that answers busy, or resets a new stream
while we keep it full, is held back (see `ProviderDirectory.hold_busy`) rather than banned.
A ban would leave it idle once its queue drains, and under overload that cut what the
network served by half or more (benchmarks/load.py).

Against providers that advertise what they cannot deliver (or never answer), a request
makes at most one attempt on an unproven provider (one that has completed no job here) while
a proven one could take the job, and that attempt gets half the time left, so the proven
provider still has time to finish when the unproven one fails or hangs.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from gateway.directory import Candidate, ProviderDirectory
from sdcn_p2p.errors import NETWORK_ERRORS, JobError, RecordError, SdcnError, StreamReset
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs import JobRequest, JobResult, request_job
from sdcn_p2p.peer import Peer
from sdcn_p2p.records import Envelope, model_key

__all__ = [
    "MAX_ATTEMPTS",
    "DispatchError",
    "DispatchResult",
    "Dispatcher",
    "GatewayConfig",
]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
_SEEDS = 2**32
#: A provider that times out having had this many times its estimated run is banned; a
#: shorter deadline is the client's doing, and must not let one client ban every provider.
_TIMEOUT_BAN_FACTOR = 2.0


class DispatchError(SdcnError):
    """A job that did not run; `status` is the HTTP status to answer with, `message` why.

    400: a provider found the request invalid. 404: no provider offers the model, a LoRA, or
    the sampler, size or steps asked for. 502: the last provider tried failed in its backend.
    503: every capable provider is busy, banned or unreachable. 504: the deadline passed.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class DispatchResult:
    """A finished job: PNG images and the provider's info, plus ``attempts``."""

    images: list[bytes] = field(repr=False)
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Failover and deadlines (seconds) of a gateway's dispatcher."""

    max_attempts: int = MAX_ATTEMPTS
    #: The default deadline is base + job.cost * per_unit, at most cap.
    deadline_base: float = 30.0
    deadline_per_unit: float = 2.0
    deadline_cap: float = 600.0
    dht_lookup_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if min(self.deadline_base, self.deadline_cap, self.dht_lookup_timeout) <= 0:
            raise ValueError("deadline_base, deadline_cap and dht_lookup_timeout must be > 0")
        if self.deadline_per_unit < 0:
            raise ValueError("deadline_per_unit must be ≥ 0")


class LocalRunner(Protocol):
    """`Provider.run_job`: runs a job on a provider of our own peer."""

    async def __call__(
        self,
        job: JobRequest,
        *,
        deadline: float,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> JobResult: ...


class Dispatcher:
    """Runs jobs on providers found through `directory`, talking through `peer`'s host."""

    def __init__(
        self,
        peer: Peer,
        directory: ProviderDirectory,
        config: GatewayConfig,
        *,
        rng: random.Random | None = None,
        local: LocalRunner | None = None,
    ) -> None:
        """`local`: how to run a job on a provider on this same peer (`Provider.run_job`);
        without it our own peer is never chosen, since a host cannot dial itself.
        """
        self.peer = peer
        self.directory = directory
        self.config = config
        self.local = local
        self._rng = rng or random.Random()

    def default_deadline(self, job: JobRequest) -> float:
        """Seconds a job may take when the client sets no deadline, scaled by its cost."""
        config = self.config
        return min(config.deadline_base + job.cost * config.deadline_per_unit, config.deadline_cap)

    async def run(
        self,
        job: JobRequest,
        *,
        deadline: float | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> DispatchResult:
        """Run `job` within `deadline` seconds (default: `default_deadline`) and return its
        images, trying up to `config.max_attempts` providers.

        A seed of -1 is replaced by a random one (``info["seed"]`` says which).
        `on_progress(step, total)` follows the current attempt. Raises DispatchError.
        Cancelling is safe: the job's stream is reset, which cancels it on the provider.
        """
        if job.seed == -1:
            job = job.with_seed(self._rng.randrange(_SEEDS))
        if deadline is None:
            deadline = self.default_deadline(job)
        started = trio.current_time()
        request = _Request(job, started + deadline)
        try:
            result = await self._run(request, on_progress)
        except DispatchError as exc:
            log.info(
                "%s %s failed after %d attempt(s), %.0f ms: %d %s",
                job.kind,
                job.model,
                len(request.tried),
                (trio.current_time() - started) * 1000,
                exc.status,
                exc.message,
            )
            raise
        info = {**result.info, "attempts": len(request.tried)}
        log.info(
            "%s %s on %s: %d attempt(s), %.0f ms",
            job.kind,
            job.model,
            request.tried[-1].short(),
            len(request.tried),
            (trio.current_time() - started) * 1000,
        )
        return DispatchResult(result.images, info)

    async def _run(
        self, request: _Request, on_progress: Callable[[int, int], None] | None
    ) -> JobResult:
        job = request.job
        looked_up = False
        while len(request.tried) < self.config.max_attempts:
            candidate = self._choose(request)
            # Only when nobody is known to offer the model: providers that are all busy or
            # banned are no reason for a lookup, which would hold up every 503 under load.
            if candidate is None and not looked_up and not self._known(job):
                looked_up = True
                await self._look_up(job.model, request.end)
                candidate = self._choose(request)
            if candidate is None:
                break
            left = request.end - trio.current_time()
            if left <= 0:
                raise DispatchError(504, "the deadline passed before a provider was found")
            result = await self._attempt(request, candidate, left, on_progress)
            if result is not None:
                return result
        raise self._no_result(request)

    def _known(self, job: JobRequest) -> bool:
        """Whether any provider we know of offers `job`'s model with its LoRAs."""
        return self.directory.has_model(job.model, [name for name, _ in job.loras])

    def _choose(self, request: _Request) -> Candidate | None:
        return self.directory.choose(
            request.job,
            self.peer.wall_clock(),
            exclude=self._exclude(request),
            proven_only=request.tried_unproven,
        )

    def _exclude(self, request: _Request) -> set[PeerId]:
        exclude = set(request.tried)
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
        self,
        request: _Request,
        candidate: Candidate,
        left: float,
        on_progress: Callable[[int, int], None] | None,
    ) -> JobResult | None:
        """Run the job on `candidate`; None when it failed in a way worth another provider."""
        peer = candidate.peer_id
        host = self.peer.host
        request.tried.append(peer)
        shortened = False
        if not candidate.proven:
            request.tried_unproven = True
            if self._has_proven_fallback(request):
                left, shortened = left / 2, True
        if candidate.advert.addrs and not host.is_connected(peer):
            host.peerstore.add_addrs(peer, candidate.advert.addrs)
        log.debug("attempt %d on %s, eta %.1f s", len(request.tried), peer.short(), candidate.eta)
        self.directory.started(peer)
        busy = False
        sent = trio.current_time()
        try:
            if peer == self.peer.peer_id and self.local is not None:
                result = await self.local(request.job, deadline=left, on_progress=on_progress)
            else:
                result = await request_job(
                    host, peer, request.job, deadline=left, on_progress=on_progress
                )
        except JobError as exc:
            log.debug("%s failed the job: %s", peer.short(), exc)
            if exc.code == "bad_request":
                raise DispatchError(400, exc.message) from None
            if exc.code == "timeout":
                if left >= _TIMEOUT_BAN_FACTOR * candidate.eta:
                    self.directory.ban(peer, self.peer.wall_clock())
                if shortened:  # a proven provider has the other half
                    request.last_error = exc
                    return None
                raise DispatchError(504, f"no result within the deadline: {exc.message}") from None
            if exc.code == "busy":  # back-pressure, not a failure: no ban
                busy = True
                request.last_error = exc
                return None
            self._failed(request, peer, exc)
            return None
        except NETWORK_ERRORS as exc:
            log.debug("job on %s broke: %r", peer.short(), exc)
            if self._refused_stream(peer, candidate, exc):
                busy = True
                request.last_error = exc
                return None
            self._failed(request, peer, exc)
            return None
        finally:
            self.directory.finished(peer)
            if busy:  # after `finished`, which lifts holds
                self.directory.hold_busy(peer, self.peer.wall_clock(), candidate.advert.seq)
        self.directory.succeeded(peer)
        queued = result.info.get("queue_ms", 0) / 1000
        self.directory.observe(peer, request.job.cost, trio.current_time() - sent, queued)
        return result

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
            tried = len(request.tried)
            if isinstance(error, JobError) and error.code == "backend_failed":
                return DispatchError(502, f"provider failed: {error.message}")
            last = str(error) or type(error).__name__
            return DispatchError(
                503, f"{tried} provider(s) tried, none could run the job; last: {last}"
            )
        return self._nobody_can(job)

    def _nobody_can(self, job: JobRequest) -> DispatchError:
        """Why no provider took `job` at all: 404 if none offers it, else 503."""
        directory = self.directory
        model = job.model
        loras = [name for name, _ in job.loras]
        if not directory.has_model(model):
            return DispatchError(404, f"no provider offers model {model!r}")
        if not directory.has_model(model, loras):
            missing = [name for name in loras if not directory.has_model(model, [name])]
            if missing:
                names = ", ".join(repr(name) for name in missing)
                return DispatchError(404, f"no provider of model {model!r} offers LoRA {names}")
            names = ", ".join(repr(name) for name in loras)
            return DispatchError(
                404, f"no provider of model {model!r} offers LoRAs {names} together"
            )
        if not directory.can_run(job):
            return DispatchError(
                404,
                f"no provider of model {model!r} offers sampler {job.sampler_name!r} "
                f"at {job.width}x{job.height} with {job.steps} steps",
            )
        return DispatchError(
            503, f"every provider of model {model!r} is busy, failing or unavailable"
        )


@dataclass(slots=True)
class _Request:
    """One request's progress through its providers."""

    job: JobRequest
    end: float  # trio time when the deadline passes
    tried: list[PeerId] = field(default_factory=list)
    tried_unproven: bool = False  # an attempt went to a provider not proven yet
    last_error: BaseException | None = None
