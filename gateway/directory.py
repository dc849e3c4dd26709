"""Which providers can run a job, and which will finish it soonest (pure: time passed in).

A candidate is an unexpired advert in state ``online``, with role ``provider``, offering the
job's model (by name, or by title when no advert has that name), every LoRA, the sampler, and
enough pixels and steps, from a provider that is neither banned nor excluded (`gateway.trust`).
Each is scored by its estimated completion time (ARCHITECTURE.md, "Choosing a provider")::

    run   = job.cost / speed                       (job.cost: steps at 512x512)
    queue = max(advertised queue, this gateway's jobs in flight there) / slots
    eta   = rtt + queue * run + run

`speed` is the advertised one, or the speed this gateway observed (an EWMA over the jobs the
provider ran for it) when that is slower: a provider that claims more than it delivers is
believed only until its first jobs come back.

`choose` picks at random among the candidates within 10 % of the best, so that gateways
reading the same adverts do not all herd onto one provider. A provider with MAX_IN_FLIGHT of
this gateway's jobs, or as many as its advert says it holds (slots and queue), or held back
after answering busy, is no candidate. A provider that fails is banned for 5 s, doubling with
each consecutive failure up to 5 min; a success forgets its failures.

Adverts are claims anyone can make, so the gateway trusts what it has seen: a provider that
completed a job for it is *proven* (the last MAX_PROVEN are remembered, and their adverts
protected from eviction in the AdvertCache). An unproven provider is credited with no more
speed than the fastest proven candidate, and within the 10 % band proven providers win, so a
burst of fresh identities claiming to be fast cannot take work from providers that deliver:
they get a job only when they would finish it sooner than every proven one (see the
dispatcher for the rest of the guard).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from sdcn_p2p.adverts import AdvertCache
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs import JobRequest, split_sampler
from sdcn_p2p.records import Advert, normalize_model_name

__all__ = [
    "BAN_BASE",
    "BAN_MAX",
    "BUSY_HOLD",
    "CHOICE_BAND",
    "DEFAULT_RTT",
    "DEFAULT_SPEED",
    "MAX_IN_FLIGHT",
    "MAX_PROVEN",
    "OBSERVED_ALPHA",
    "Candidate",
    "ProviderDirectory",
]

#: Seconds assumed for a provider whose RTT has not been measured.
DEFAULT_RTT = 0.150
#: it/s at 512x512 assumed for an advert that claims no speed.
DEFAULT_SPEED = 0.5
#: Candidates whose ETA is within this fraction of the best are chosen among at random.
CHOICE_BAND = 0.10
#: First ban, in seconds; each consecutive failure doubles it, up to BAN_MAX.
BAN_BASE = 5.0
BAN_MAX = 300.0
#: Longest a provider that answered busy is left out, unless its next advert comes sooner.
BUSY_HOLD = 5.0
#: Jobs this gateway keeps in flight at one provider at most: more can only queue or bounce
#: off it as busy, and would run into its stream limit (128 by default).
MAX_IN_FLIGHT = 64
#: Proven providers remembered (the most recent successes).
MAX_PROVEN = 1024
#: Weight of the newest job in a provider's observed speed.
OBSERVED_ALPHA = 0.3
# Observed speeds (and job counts) kept before those of providers without an advert are
# forgotten.
_MAX_OBSERVED = 4096


@dataclass(frozen=True, slots=True)
class Candidate:
    """A provider that can run a job, and when it would be done."""

    advert: Advert
    eta: float  # estimated seconds until the result arrives
    rtt: float  # seconds: the measured EWMA, or DEFAULT_RTT
    in_flight: int  # this gateway's jobs running there now
    proven: bool = False  # it completed a job for this gateway

    @property
    def peer_id(self) -> PeerId:
        return self.advert.peer_id


@dataclass(slots=True)
class _Ban:
    failures: int
    until: float


class ProviderDirectory:
    """Candidates for a job from an AdvertCache, with this gateway's load and bans on top.

    `rtt(peer)` gives the measured round trip in seconds, or None. `excluded(peer, now)` says
    whether the gateway excluded a provider (`gateway.trust.TrustLedger.is_excluded`): such a
    provider is no candidate, like a banned one. `limit(peer)`, if given, caps this gateway's
    jobs in flight there further (None: no further cap; a spot checker sets it to
    `TrustLedger.in_flight_limit`), for a job that another provider could run too (and so
    check): the only provider of a job is never held to it. Times (`now`, ban ends) are
    wall-clock seconds, as `Peer.wall_clock` reads them.
    """

    def __init__(
        self,
        adverts: AdvertCache,
        rtt: Callable[[PeerId], float | None],
        *,
        rng: random.Random | None = None,
        excluded: Callable[[PeerId, float], bool] | None = None,
        limit: Callable[[PeerId], int | None] | None = None,
    ) -> None:
        self.adverts = adverts
        self._rtt = rtt
        self._rng = rng or random.Random()
        self._excluded = excluded
        #: Caps this gateway's jobs in flight at a provider further (see the class docstring).
        self.limit = limit
        self._in_flight: dict[PeerId, int] = {}
        self._bans: dict[PeerId, _Ban] = {}
        self._proven: dict[PeerId, None] = {}  # in order of the latest success
        self._busy: dict[PeerId, tuple[int, float]] = {}  # peer -> (advert seq, hold end)
        self._observed: dict[PeerId, float] = {}  # it/s at 512x512, EWMA
        self._sent: dict[PeerId, list[int]] = {}  # peer -> [jobs sent, jobs done]

    # --- choosing --------------------------------------------------------------------------------

    def candidates(
        self,
        job: JobRequest,
        now: float,
        *,
        exclude: Collection[PeerId] = (),
        own_load: bool = False,
    ) -> list[Candidate]:
        """The providers that can run `job` now, soonest first. With `own_load`, a
        provider's queue is this gateway's jobs there only, not the one its advert gives
        (which lags): right when this gateway is the one keeping them busy."""
        limited = self._limited(job, now)
        adverts = [a for a in self._capable(job, now, exclude) if not self._full(a, now, limited)]
        proven_speeds = [self._speed(a) for a in adverts if a.peer_id in self._proven]
        cap = max(proven_speeds, default=None)
        found = [self._candidate(advert, job, cap, own_load) for advert in adverts]
        found.sort(key=lambda c: c.eta)
        return found

    def only_full(self, job: JobRequest, now: float, *, exclude: Collection[PeerId] = ()) -> bool:
        """Whether providers could run `job` but every one is full for now (held back after
        answering busy, or running all of our jobs it takes): a job worth queueing for."""
        capable = list(self._capable(job, now, exclude))
        limited = self._limited(job, now)
        return bool(capable) and all(self._full(advert, now, limited) for advert in capable)

    def capable(
        self, job: JobRequest, now: float, *, exclude: Collection[PeerId] = ()
    ) -> list[Advert]:
        """The adverts of providers that could run `job`, full or not."""
        return list(self._capable(job, now, exclude))

    def _capable(
        self, job: JobRequest, now: float, exclude: Collection[PeerId]
    ) -> Iterator[Advert]:
        excluded = self._excluded
        for advert in self._offering(job.model, [name for name, _ in job.loras]):
            if (
                advert.is_online_provider
                and _fits(advert, job)
                and advert.peer_id not in exclude
                and not self.is_banned(advert.peer_id, now)
                and (excluded is None or not excluded(advert.peer_id, now))
            ):
                yield advert

    def _limited(self, job: JobRequest, now: float) -> bool:
        """Whether `limit` holds for `job`: there is one, and two providers could run it."""
        return self.limit is not None and len(list(islice(self._capable(job, now, ()), 2))) > 1

    def _full(self, advert: Advert, now: float, limited: bool) -> bool:
        room = MAX_IN_FLIGHT
        if advert.max_queue is not None:  # more of ours than it holds would meet busy
            room = min(room, advert.slots + advert.max_queue)
        if limited and self.limit is not None and (limit := self.limit(advert.peer_id)) is not None:
            room = min(room, limit)
        return self._held(advert, now) or self._in_flight.get(advert.peer_id, 0) >= room

    def choose(
        self,
        job: JobRequest,
        now: float,
        *,
        exclude: Collection[PeerId] = (),
        proven_only: bool = False,
    ) -> Candidate | None:
        """The candidate with the lowest ETA, or one at random within CHOICE_BAND of it,
        a proven one if the band holds any.

        With `proven_only`, unproven providers are left out while any proven one can run
        the job.
        """
        found = self.candidates(job, now, exclude=exclude)
        if proven_only and any(c.proven for c in found):
            found = [c for c in found if c.proven]
        if not found:
            return None
        limit = found[0].eta * (1 + CHOICE_BAND)
        band = [c for c in found if c.eta <= limit]
        return self._rng.choice([c for c in band if c.proven] or band)

    def eta(self, advert: Advert, job: JobRequest) -> float:
        """Estimated seconds until `advert`'s provider returns `job`'s result."""
        return self._candidate(advert, job, None).eta

    def _candidate(
        self, advert: Advert, job: JobRequest, cap: float | None, own_load: bool = False
    ) -> Candidate:
        """`cap`: the most speed (it/s) an unproven provider is credited with, if any."""
        peer = advert.peer_id
        measured = self._rtt(peer)
        rtt = DEFAULT_RTT if measured is None else measured
        in_flight = self._in_flight.get(peer, 0)
        proven = peer in self._proven
        speed = self._speed(advert)
        if not proven and cap is not None:
            speed = min(speed, cap)
        run = job.cost / speed
        # The advertised queue counts our jobs too once the provider has republished; the max
        # avoids counting them twice while reacting to them before the advert does.
        queue = (in_flight if own_load else max(advert.queue, in_flight)) / advert.slots
        return Candidate(advert, rtt + queue * run + run, rtt, in_flight, proven)

    def capacity(
        self, job: JobRequest, now: float, *, exclude: Collection[PeerId] = ()
    ) -> tuple[float, int]:
        """What the providers that could run `job` get through, full or not: jobs like it
        per second (each provider's slots over its run at the speed this gateway measured
        there, else the advertised one), and the jobs waiting in their own queues beyond
        their slots. While any of them is proven, only proven ones count: a claim is no
        capacity.
        """
        capable = list(self._capable(job, now, exclude))
        per_second, queued = 0.0, 0
        for advert in [a for a in capable if a.peer_id in self._proven] or capable:
            per_second += advert.slots * self._speed(advert) / job.cost
            load = max(advert.queue, self._in_flight.get(advert.peer_id, 0))
            queued += max(load - advert.slots, 0)
        return per_second, queued

    def free_slots(self, model: str, now: float) -> int:
        """Slots of the online providers of `model` (not banned, excluded or held back as
        busy; an unproven one's as many as its trust limit) that none of this gateway's jobs
        fills now."""
        free, excluded = 0, self._excluded
        for advert in self.adverts.find(model, []):
            if (
                advert.is_online_provider
                and not self.is_banned(advert.peer_id, now)
                and not self._held(advert, now)
                and (excluded is None or not excluded(advert.peer_id, now))
            ):
                slots = advert.slots
                if self.limit is not None and (limit := self.limit(advert.peer_id)) is not None:
                    slots = min(slots, limit)
                free += max(slots - self._in_flight.get(advert.peer_id, 0), 0)
        return free

    def has_model(self, model: str, loras: Iterable[str] = ()) -> bool:
        """Whether any provider, in any state, banned or not, offers `model` with every LoRA.

        Tells "nobody has it" (404) from "nobody can take it now" (503).
        """
        return bool(self._offering(model, list(loras)))

    def can_run(self, job: JobRequest) -> bool:
        """Whether any provider, in any state, banned or not, offers all that `job` needs."""
        return any(
            _fits(a, job) for a in self._offering(job.model, [name for name, _ in job.loras])
        )

    def _offering(self, model: str, loras: list[str]) -> list[Advert]:
        """Adverts of any state offering `model` by name (or else by title) and all `loras`."""
        found = self.adverts.find(model, loras, include_draining=True)
        if found:
            return found
        wanted = normalize_model_name(model)
        return [
            advert
            for advert in self.adverts
            if advert.has_loras(loras)
            and any(m.title and normalize_model_name(m.title) == wanted for m in advert.models)
        ]

    # --- this gateway's load -----------------------------------------------------------------

    def started(self, peer: PeerId) -> None:
        """Count a job this gateway sent to `peer`; pair with `finished`."""
        self._in_flight[peer] = self._in_flight.get(peer, 0) + 1
        self._count(peer)[0] += 1

    def finished(self, peer: PeerId) -> None:
        """A job counted by `started` ended, whichever way."""
        self._busy.pop(peer, None)  # it has room again, as far as we can tell
        count = self._in_flight.get(peer, 0) - 1
        if count > 0:
            self._in_flight[peer] = count
        else:
            self._in_flight.pop(peer, None)

    def in_flight(self, peer: PeerId) -> int:
        """This gateway's jobs running on `peer` now."""
        return self._in_flight.get(peer, 0)

    def jobs_sent(self, peer: PeerId) -> tuple[int, int]:
        """(attempts this gateway sent `peer`, those it completed), since this gateway started
        (forgotten for providers whose advert is gone, once many are counted)."""
        sent, done = self._sent.get(peer, (0, 0))
        return sent, done

    def _count(self, peer: PeerId) -> list[int]:
        counts = self._sent.get(peer)
        if counts is None:
            if len(self._sent) >= _MAX_OBSERVED:
                for gone in [p for p in self._sent if self.adverts.get(p) is None]:
                    del self._sent[gone]
            counts = self._sent[peer] = [0, 0]
        return counts

    def observe(self, peer: PeerId, cost: float, seconds: float, queued: float = 0.0) -> None:
        """Fold a job `peer` ran for us into its observed speed: `cost` units of work (see
        JobRequest.cost) answered `seconds` after we sent it, `queued` of them (as the provider
        reports) waiting for a slot.
        """
        rtt = self._rtt(peer) or 0.0
        run = max(seconds - rtt - min(max(queued, 0.0), seconds), 1e-3)
        sample = cost / run
        held = self._observed.get(peer)
        if held is None and len(self._observed) >= _MAX_OBSERVED:
            for gone in [p for p in self._observed if self.adverts.get(p) is None]:
                del self._observed[gone]
        self._observed[peer] = (
            sample if held is None else (1 - OBSERVED_ALPHA) * held + OBSERVED_ALPHA * sample
        )

    def observed_speed(self, peer: PeerId) -> float | None:
        """`peer`'s speed (it/s at 512x512) as this gateway saw it, or None before any job."""
        return self._observed.get(peer)

    def _speed(self, advert: Advert) -> float:
        """The speed (it/s at 512x512) an ETA uses: the advertised one, or the observed one
        when that is slower."""
        claimed = advert.speed if advert.speed > 0 else DEFAULT_SPEED
        return min(claimed, self._observed.get(advert.peer_id, claimed))

    # --- busy providers ----------------------------------------------------------------------

    def hold_busy(self, peer: PeerId, now: float, seq: int) -> None:
        """`peer` answered busy to its advert `seq`: leave it out until one of our jobs there
        ends, it publishes another advert, or BUSY_HOLD seconds pass. Not a failure: no ban,
        nothing doubles.
        """
        for other in [p for p, (_, until) in self._busy.items() if until <= now]:
            del self._busy[other]
        self._busy[peer] = (seq, now + BUSY_HOLD)

    def is_busy(self, peer: PeerId, now: float) -> bool:
        """Whether `peer` is held back after answering busy (see `hold_busy`)."""
        advert = self.adverts.get(peer)
        return advert is not None and self._held(advert, now)

    def _held(self, advert: Advert, now: float) -> bool:
        held = self._busy.get(advert.peer_id)
        return held is not None and held[0] == advert.seq and now < held[1]

    # --- bans --------------------------------------------------------------------------------

    def ban(self, peer: PeerId, now: float) -> float:
        """Ban `peer` after a failure: BAN_BASE seconds, doubled for each failure since its
        last success, at most BAN_MAX. Returns when the ban ends.

        Failures while a ban runs (other jobs that were in flight there) do not lengthen it:
        a provider that dies with ten of our jobs is one failure, not ten.
        """
        self._forget_old_bans(now)
        held = self._bans.get(peer)
        if held is not None and now < held.until:
            return held.until
        failures = 1 if held is None else held.failures + 1
        length = min(BAN_BASE * 2.0 ** min(failures - 1, 32), BAN_MAX)
        self._bans[peer] = _Ban(failures, now + length)
        return now + length

    def succeeded(self, peer: PeerId) -> None:
        """`peer` ran a job: forget its failures, and count it proven."""
        self._bans.pop(peer, None)
        self._count(peer)[1] += 1
        self._proven.pop(peer, None)
        self._proven[peer] = None
        self.adverts.protected.add(peer)
        if len(self._proven) > MAX_PROVEN:
            oldest = next(iter(self._proven))
            del self._proven[oldest]
            self.adverts.protected.discard(oldest)
            self.adverts.protected.discard(oldest)

    def is_proven(self, peer: PeerId) -> bool:
        """Whether `peer` completed a job for this gateway (among the last MAX_PROVEN)."""
        return peer in self._proven

    def banned_until(self, peer: PeerId) -> float | None:
        """When `peer`'s latest ban ends (possibly past), or None after a success or none."""
        held = self._bans.get(peer)
        return None if held is None else held.until

    def is_banned(self, peer: PeerId, now: float) -> bool:
        """Whether a ban of `peer` runs at wall time `now`."""
        held = self._bans.get(peer)
        return held is not None and now < held.until

    def _forget_old_bans(self, now: float) -> None:
        # A provider quiet for BAN_MAX past its ban starts afresh; this also bounds the table.
        for peer in [p for p, b in self._bans.items() if b.until + BAN_MAX <= now]:
            del self._bans[peer]


def _fits(advert: Advert, job: JobRequest) -> bool:
    """Whether `advert` offers `job`'s sampler, pixels and steps (model and LoRAs aside)."""
    if advert.max_pixels and job.pixels > advert.max_pixels:
        return False
    if advert.max_steps and job.steps > advert.max_steps:
        return False
    offered = {normalize_model_name(s) for s in advert.samplers}
    whole = normalize_model_name(job.sampler_name)
    base = normalize_model_name(split_sampler(job.sampler_name)[0])
    return whole in offered or base in offered
