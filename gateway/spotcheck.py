"""Spot checks: re-run a sample of jobs on other providers and compare the pictures.

The `SpotChecker` is the Dispatcher's `checker`: it sees every job the dispatcher ran for a
client. It draws whether to check the job with the probability the `TrustLedger` gives its
provider P, and if so re-runs it in the background (the client is not delayed) with the same
seed and parameters on another provider Q: one proven here, not P, not one sharing P's network
address (its IPv4 address or IPv6 /64, from its advert and our connection to it), not a
suspect, and one with a clean record when there is such a provider. The two results are
compared perceptually (`gateway.compare`). If they differ, a third provider R, chosen alike
away from both, settles it: the one whose picture differs from the two others gets a strike
(the ledger excludes a provider at its second strike in 50 checked jobs); with no majority
nobody does, nor when a trusted provider would be struck on the word of newcomers alone.
While no proven provider could check a job, a provider new here may (it is the only way a
gateway that sent all its jobs to one provider gets to check it). When no other provider
could run the job at all, it is not checked, and counted.

A client that asks for ``verify`` gets its answer only after the second provider agreed (and,
if it did not, the picture two of three providers drew, or none): ``info["verified"]``,
``info["verification"]`` (how, or why not) and ``info["verified_by"]`` (the peer ids of the
providers that drew the same picture as the one that answered). The jobs of a provider with
fewer than `TrustConfig.verify_first` clean checks (a newcomer, or one struck since) are
verified so too, before the answer, and it gets one job at a time meanwhile
(`TrustLedger.in_flight_limit`): a liar's pictures stop at its first jobs, and a struck one's
stop reaching clients. (That delays a newcomer's first few clients; the checks of every later
job run in the background.) While a third provider settles a mismatch, the provider checked
gets no jobs.

``info["spot_check"]`` tells what became of a job's check when the answer left: ``"not
sampled"``, ``"scheduled"``, ``"unavailable"`` (no other provider could check it),
``"skipped"`` (too many checks running), or, for a verified job, its outcome (``"passed"``,
``"failed"``, ``"upheld"``, ``"unsettled"``). `DispatchResult.check` follows a scheduled check
to its end (`SpotCheck.subscribe`): what a job service shows on the job's status later.

When a strike excludes a provider, `on_exclusion` hears the `Evidence` (the job, its signed
result, the re-runs), which a fraud-report service spreads (`gateway.reports`).
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio

from gateway.compare import Distance, Fingerprint, compare_results, fingerprint
from gateway.directory import ProviderDirectory
from gateway.dispatch import Dispatcher, DispatchResult
from gateway.errors import DispatchError
from gateway.trust import Exclusion, TrustLedger
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.dht.store import Source
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.jobs.receipts import job_digest

__all__ = [
    "CheckStatus",
    "Evidence",
    "SpotCheck",
    "SpotChecker",
    "TrustStats",
    "fingerprints",
    "open_spot_checker",
]

log = logging.getLogger(__name__)

# Result images above this many bytes (all together) are fingerprinted in a worker thread.
_THREAD_BYTES = 256 * 1024


class CheckStatus(enum.StrEnum):
    """What became of a job's spot check."""

    NOT_SAMPLED = "not sampled"
    SCHEDULED = "scheduled"  # running in the background
    UNAVAILABLE = "unavailable"  # no other provider could run the job
    SKIPPED = "skipped"  # too many checks running
    PASSED = "passed"  # a second provider drew the same picture
    FAILED = "failed"  # it differed from two others that agree: its provider got a strike
    UPHELD = "upheld"  # the second provider was the odd one out, and got the strike
    UNSETTLED = "unsettled"  # no third provider, or three different pictures

    @property
    def final(self) -> bool:
        return self is not CheckStatus.SCHEDULED


class SpotCheck:
    """The spot check of one job: its status now, and callbacks for when it changes.

    A scheduled check changes once more, to its outcome; `wait` returns then (at once for any
    other status).
    """

    def __init__(self, status: CheckStatus, detail: str = "") -> None:
        self.status = status
        self.detail = detail
        self._done = trio.Event()
        self._callbacks: list[Callable[[SpotCheck], None]] = []
        if status.final:
            self._done.set()

    def subscribe(self, callback: Callable[[SpotCheck], None]) -> None:
        """Call `callback(check)` when the status changes (it must not block or raise)."""
        self._callbacks.append(callback)

    async def wait(self) -> None:
        await self._done.wait()

    def finish(self, status: CheckStatus, detail: str) -> None:
        self.status, self.detail = status, detail
        self._done.set()
        for callback in self._callbacks:
            callback(self)
        self._callbacks.clear()

    def __repr__(self) -> str:
        return f"SpotCheck({self.status.value!r}, {self.detail!r})"


@dataclass(slots=True)
class TrustStats:
    """What the checks cost and found; counters only grow. Costs are in `JobRequest.cost`."""

    jobs: int = 0  # clients' jobs seen
    job_cost: float = 0.0
    sampled: int = 0  # drawn for a check, or verified
    unchecked: int = 0  # drawn, but no other provider could run the job
    skipped: int = 0  # drawn, but too many checks were running
    reruns: int = 0  # second opinions run
    arbitrations: int = 0  # third opinions run
    rerun_cost: float = 0.0  # of both
    passed: int = 0
    failed: int = 0
    upheld: int = 0
    unsettled: int = 0
    strikes: int = 0
    exclusions: int = 0

    def outcomes(self) -> dict[str, int]:
        """Checks by outcome (`gateway.metrics.CHECK_OUTCOMES`): a second provider agreed
        (passed); the provider checked (failed) or the checker (upheld) was the odd one out;
        no verdict (unsettled); nobody else could run the job (unavailable); too many checks
        running (skipped)."""
        return {
            "passed": self.passed,
            "failed": self.failed,
            "upheld": self.upheld,
            "unsettled": self.unsettled,
            "unavailable": self.unchecked,
            "skipped": self.skipped,
        }

    @property
    def extra_compute(self) -> float:
        """Work spent on checks, as a fraction of the work done for clients."""
        return self.rerun_cost / self.job_cost if self.job_cost else 0.0


@dataclass(frozen=True, slots=True)
class Evidence:
    """Why `provider` was excluded: `result`, its signed answer to `job`, differed from the
    re-runs `others` (which agree with each other)."""

    job: JobRequest
    provider: PeerId
    result: DispatchResult
    others: tuple[DispatchResult, ...]
    exclusion: Exclusion


@dataclass(frozen=True, slots=True)
class _Settlement:
    status: CheckStatus
    detail: str
    answer: DispatchResult  # the picture to answer with
    verified: bool
    agreed: tuple[PeerId, ...] = ()  # providers that drew `answer`'s picture besides its own


async def fingerprints(images: Sequence[bytes]) -> list[Fingerprint]:
    """The images' fingerprints (in a worker thread when large); [] if one does not decode,
    which compares as infinitely far from anything."""

    def compute() -> list[Fingerprint]:
        try:
            return [fingerprint(image) for image in images]
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            log.debug("a result image does not decode: %r", exc)
            return []

    if sum(map(len, images)) > _THREAD_BYTES:
        return await trio.to_thread.run_sync(compute)
    return compute()


class SpotChecker:
    """Checks the results of a dispatcher's jobs (see the module docstring). Create with
    `open_spot_checker`, which owns the background checks."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        ledger: TrustLedger,
        nursery: trio.Nursery,
        *,
        rng: random.Random | None = None,
        on_exclusion: Callable[[Evidence], None] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.ledger = ledger
        self.stats = TrustStats()
        self.on_exclusion = on_exclusion
        self._nursery = nursery
        self._rng = rng or random.Random()
        self._running = 0
        self._idle = trio.lowlevel.ParkingLot()

    @property
    def directory(self) -> ProviderDirectory:
        return self.dispatcher.directory

    @property
    def running(self) -> int:
        """Background checks running now."""
        return self._running

    async def wait_idle(self) -> None:
        """Return once no background check runs (at once if none does)."""
        while self._running:
            await self._idle.park()

    async def __call__(
        self, job: JobRequest, result: DispatchResult, *, verify: bool
    ) -> DispatchResult:
        """See `gateway.dispatch.ResultChecker`."""
        stats = self.stats
        stats.jobs += 1
        stats.job_cost += job.cost
        provider = result.provider
        own = provider == self.dispatcher.peer.peer_id
        if verify or (
            provider is not None and not own and self.ledger.needs_verification(provider)
        ):
            return await self._verify(job, result, asked=verify)
        if provider is None or own:
            check = SpotCheck(CheckStatus.NOT_SAMPLED, "this gateway's own provider")
        elif self._rng.random() >= self.ledger.probability(provider):
            check = SpotCheck(CheckStatus.NOT_SAMPLED)
        else:
            check = self._schedule(job, result, provider)
        info = {**result.info, "spot_check": str(check.status)}
        return replace(result, info=info, check=check)

    def _schedule(self, job: JobRequest, result: DispatchResult, provider: PeerId) -> SpotCheck:
        self.stats.sampled += 1
        if not self._others(job, [provider]):
            self.stats.unchecked += 1
            return SpotCheck(CheckStatus.UNAVAILABLE, f"no other provider of {job.model!r}")
        if self._running >= self.ledger.config.max_checks:
            self.stats.skipped += 1
            return SpotCheck(CheckStatus.SKIPPED, "too many checks running")
        check = SpotCheck(CheckStatus.SCHEDULED)
        self._running += 1
        self._nursery.start_soon(self._check_in_background, job, result, check)
        return check

    async def _check_in_background(
        self, job: JobRequest, result: DispatchResult, check: SpotCheck
    ) -> None:
        try:
            settled = await self._settle(job, result)
            check.finish(settled.status, settled.detail)
        finally:
            self._running -= 1
            if not self._running:
                self._idle.unpark_all()

    async def _verify(
        self, job: JobRequest, result: DispatchResult, *, asked: bool
    ) -> DispatchResult:
        self.stats.sampled += 1
        settled = await self._settle(job, result)
        check = SpotCheck(settled.status, settled.detail)
        answer = settled.answer
        info = {**answer.info, "spot_check": str(settled.status)}
        if asked:
            info.update(
                verified=settled.verified,
                verification=settled.detail,
                verified_by=[str(peer) for peer in settled.agreed],
            )
        return replace(answer, info=info, check=check)

    # --- settling --------------------------------------------------------------------------

    async def _settle(self, job: JobRequest, first: DispatchResult) -> _Settlement:
        """Re-run `job` away from `first`'s provider, and on a mismatch once more, and strike
        the odd one out."""
        stats = self.stats
        p = first.provider
        assert p is not None
        second = await self.second_opinion(job, [p])
        if isinstance(second, str):
            stats.unchecked += 1
            return _Settlement(CheckStatus.UNAVAILABLE, f"not verified: {second}", first, False)
        q = second.provider
        assert q is not None
        ours, theirs = await fingerprints(first.images), await fingerprints(second.images)
        apart = compare_results(ours, theirs)
        same = self.ledger.config.thresholds.same
        if same(apart):
            self.ledger.passed(p)
            stats.passed += 1
            return _Settlement(
                CheckStatus.PASSED, f"{q.short()} drew the same picture", first, True, (q,)
            )
        self.ledger.dispute(p)  # no jobs for it until this is settled
        try:
            third = await self.second_opinion(job, [p, q], arbiter=True)
        finally:
            self.ledger.settle(p)
        if isinstance(third, str):
            stats.unsettled += 1
            detail = f"not verified: {q.short()} drew another picture, and {third}"
            return _Settlement(CheckStatus.UNSETTLED, detail, first, False)
        r = third.provider
        assert r is not None
        arbiter = await fingerprints(third.images)
        p_ok, q_ok = same(compare_results(ours, arbiter)), same(compare_results(theirs, arbiter))
        if (q_ok and not p_ok and self._outvoted(p, q, r)) or (
            p_ok and not q_ok and self._outvoted(q, p, r)
        ):
            stats.unsettled += 1
            detail = (
                f"not verified: {q.short()} drew another picture, and only providers without "
                "a record here disagreed with one that has"
            )
            return _Settlement(CheckStatus.UNSETTLED, detail, first, False)
        if q_ok and not p_ok:
            stats.failed += 1
            self.ledger.passed(q)
            self._strike(job, first, (second, third), apart)
            detail = f"{p.short()} drew another picture than {q.short()} and {r.short()}"
            return _Settlement(CheckStatus.FAILED, detail, second, True, (r,))
        if p_ok and not q_ok:
            stats.upheld += 1
            self.ledger.passed(p)
            self._strike(job, second, (first, third), apart)
            detail = f"{r.short()} drew the same picture; {q.short()} did not"
            return _Settlement(CheckStatus.UPHELD, detail, first, True, (r,))
        if p_ok and q_ok:  # both within jitter of the third: no lie
            stats.passed += 1
            self.ledger.passed(p)
            detail = f"{r.short()} drew a picture close to both {p.short()}'s and {q.short()}'s"
            return _Settlement(CheckStatus.PASSED, detail, first, True, (r,))
        stats.unsettled += 1
        detail = f"not verified: {p.short()}, {q.short()} and {r.short()} drew three pictures"
        return _Settlement(CheckStatus.UNSETTLED, detail, first, False)

    def _outvoted(self, loser: PeerId, *others: PeerId) -> bool:
        """Whether a strike of `loser` would rest on newcomers alone: a trusted provider is
        struck only if a trusted one is among those it disagreed with (new identities are
        cheap, and two of them drawing one wrong picture must not exclude it)."""
        trusted = self.ledger.is_trusted
        return trusted(loser) and not any(trusted(peer) for peer in others)

    def _strike(
        self,
        job: JobRequest,
        loser: DispatchResult,
        others: tuple[DispatchResult, DispatchResult],
        apart: Distance,
    ) -> None:
        peer = loser.provider
        assert peer is not None
        names = " and ".join(o.provider.short() for o in others if o.provider is not None)
        reason = (
            f"job {job_digest(job).hex()[:12]}: its picture differed from the same picture "
            f"{names} drew ({apart.bits:.0f} of 64 hash bits, thumbnails {apart.pixel:.3f} apart)"
        )
        self.stats.strikes += 1
        log.warning("strike for %s: %s", peer, reason)
        exclusion = self.ledger.struck(peer, reason, self.dispatcher.peer.wall_clock())
        if exclusion is None:
            return
        self.stats.exclusions += 1
        log.warning("excluding %s until %.0f: %s", peer, exclusion.until, reason)
        if self.on_exclusion is not None:
            self.on_exclusion(Evidence(job, peer, loser, others, exclusion))

    async def second_opinion(
        self, job: JobRequest, involved: list[PeerId], *, arbiter: bool = False
    ) -> DispatchResult | str:
        """`job` run again on a provider away from `involved` (see `_avoid`), or a string
        saying why it could not be; `arbiter`: for a third opinion (counted apart)."""
        proven = True
        avoid = self._avoid(job, involved, proven=True)
        if avoid is None:  # nobody proven here: a newcomer then, its first job here
            proven, avoid = False, self._avoid(job, involved, proven=False)
        if avoid is None:
            return f"no other provider of {job.model!r} could run it"
        stats = self.stats
        try:
            result = await self.dispatcher.rerun(job, avoid=avoid, proven_only=proven)
        except DispatchError as exc:
            return f"no other provider ran it ({exc.message})"
        if arbiter:
            stats.arbitrations += 1
        else:
            stats.reruns += 1
        stats.rerun_cost += job.cost
        return result

    def _others(self, job: JobRequest, involved: list[PeerId]) -> bool:
        """Whether a provider away from `involved` could run `job` now."""
        return self._avoid(job, involved, proven=False) is not None

    def _avoid(
        self, job: JobRequest, involved: Iterable[PeerId], *, proven: bool
    ) -> set[PeerId] | None:
        """The providers a re-run away from `involved` must not go to: those, any sharing
        their network address, suspects, unproven ones (with `proven`), and all but the
        trusted ones when some are. None when that leaves nobody who could run `job`."""
        directory, ledger = self.directory, self.ledger
        avoid = set(involved)
        groups: set[str] = set()
        for peer in avoid:
            groups |= self._address_groups(peer)
        capable = directory.capable(job, self.dispatcher.peer.wall_clock())
        rest = []
        for advert in capable:
            peer = advert.peer_id
            if peer in avoid:
                continue
            if (
                (proven and not directory.is_proven(peer))
                or ledger.is_suspect(peer)
                or self._address_groups(peer) & groups
            ):
                avoid.add(peer)
            else:
                rest.append(peer)
        if self.dispatcher.local is None:  # our own peer cannot be dialled
            rest = [peer for peer in rest if peer != self.dispatcher.peer.peer_id]
        if not rest:
            return None
        trusted = [peer for peer in rest if ledger.is_trusted(peer)]
        if trusted:
            avoid.update(peer for peer in rest if not ledger.is_trusted(peer))
        return avoid

    def _address_groups(self, peer: PeerId) -> set[str]:
        """`peer`'s network addresses (IPv4, or IPv6 /64), from its advert and our
        connection to it; loopback counts as none (a devnet runs on one machine)."""
        host = self.dispatcher.peer.host
        addrs = []
        advert = self.directory.adverts.get(peer)
        if advert is not None:
            addrs.extend(advert.addrs)
        conn = host.connection(peer)
        if conn is not None and conn.remote_addr is not None:
            addrs.append(conn.remote_addr)
        groups = set()
        for addr in addrs:
            address = Source.of(peer, addr).address
            if address is not None:
                groups.add(address)
        return groups


@asynccontextmanager
async def open_spot_checker(
    dispatcher: Dispatcher,
    ledger: TrustLedger,
    *,
    rng: random.Random | None = None,
    on_exclusion: Callable[[Evidence], None] | None = None,
) -> AsyncIterator[SpotChecker]:
    """Check `dispatcher`'s jobs (it becomes the dispatcher's `checker`, and its directory
    sends a provider whose pictures are verified one job at a time) until the block exits,
    which cancels the checks still running and unhooks it."""
    async with open_service_nursery() as nursery:
        checker = SpotChecker(dispatcher, ledger, nursery, rng=rng, on_exclusion=on_exclusion)
        dispatcher.checker = checker
        dispatcher.directory.limit = ledger.in_flight_limit
        try:
            yield checker
        finally:
            dispatcher.checker = None
            dispatcher.directory.limit = None
            nursery.cancel_scope.cancel()
