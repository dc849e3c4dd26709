"""Trust in providers: how often to spot-check each, strikes, exclusions (pure: time passed in).

A provider starts with no record. Each spot check of one of its jobs ends in a *pass* (another
provider drew the same picture) or a *strike* (a third provider sided with the other one: it
was the odd one out); `TrustLedger` keeps the outcomes of its last `TrustConfig.window` checked
jobs and the clean checks since its last strike, and from them:

- whether its pictures are checked before they reach clients: until it passed
  `verify_first` (3) checks, since it joined or since its last strike, a second provider
  re-runs each of its jobs before the answer, so a liar's first pictures never reach a client
  (when another provider can check them); meanwhile it gets one job at a time
  (`in_flight_limit`), so that a liar runs few jobs before the verdicts come;
- the probability that its next job is checked (in the background, after that):
  `first_probability` (1) for its first `first_checks` (12) clean checks, then falling by
  `decay` (0.7) per clean check to `min_probability` (2 %), so that a long clean record costs
  little; 1 while a strike stands in its window (a *suspect*). Checking a newcomer's every job
  at first is what catches a provider that lies only now and then (one that sends noise 20 %
  of the time lies at least once in its first 12 jobs 93 % of the time); it costs 12 jobs per
  provider, once;
- exclusion: `strikes` (2) strikes within the window exclude it for `exclusion` seconds (24 h),
  doubling with each exclusion (up to `max_exclusion`). It comes back on probation, its last
  strike still in its window: one more strike excludes it again, for twice as long.

While a third provider settles a check, the provider checked gets no jobs (`dispute`): a
liar's next pictures wait for the verdict rather than reach clients.

Jitter alone never strikes an honest provider: a strike needs its picture to differ from two
others that agree with each other (`gateway.compare.Thresholds` tolerate device jitter), so an
honest provider is struck only if two providers return the same wrong picture.

Times are wall-clock seconds (`Peer.wall_clock`); the ledger holds at most `max_providers`
records, forgetting the least recently checked first (but not one excluded now).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from gateway.compare import Thresholds
from sdcn_p2p._config import require, require_at_least, require_positive
from sdcn_p2p.identity import PeerId

__all__ = ["Exclusion", "Standing", "TrustConfig", "TrustLedger"]


@dataclass(frozen=True, slots=True)
class TrustConfig:
    """How often to check, when to exclude and for how long (seconds)."""

    first_probability: float = 1.0
    first_checks: int = 12
    decay: float = 0.7
    min_probability: float = 0.02
    window: int = 50
    strikes: int = 2
    exclusion: float = 86_400.0
    max_exclusion: float = 32 * 86_400.0
    #: Clean checks a provider needs before its pictures reach clients unverified: until
    #: then (and while a suspect) a second provider checks each job before the answer.
    verify_first: int = 3
    #: Clean checks after which a provider is preferred as a checker or arbiter.
    trusted_after: int = 3
    max_providers: int = 10_000
    #: Background spot checks running at once; a job drawn beyond that goes unchecked.
    max_checks: int = 64
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self) -> None:
        for name in ("first_probability", "decay", "min_probability"):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1
            require(self, name, ok, "must be a number from 0 to 1")
        require_at_least(self, 0, "first_checks", "verify_first", "trusted_after")
        require_at_least(self, 1, "window", "strikes", "max_providers", "max_checks")
        require_positive(self, "exclusion", "max_exclusion")


@dataclass(frozen=True, slots=True)
class Exclusion:
    """A provider left out until wall time `until`, and why."""

    until: float
    reason: str
    count: int  # its exclusions so far, this one included


@dataclass(frozen=True, slots=True)
class Standing:
    """A provider's record as `GET /v1/providers` shows it."""

    checks: int  # checked jobs in the window
    strikes: int  # strikes in the window
    clean: int  # clean checks since the last strike
    probability: float  # that its next job is checked
    exclusion: Exclusion | None  # in force now


@dataclass(slots=True)
class _Record:
    outcomes: deque[bool]  # True: a strike; the last `window` checked jobs
    clean: int = 0
    exclusions: int = 0
    excluded_until: float = 0.0
    reason: str = ""


class TrustLedger:
    """Each provider's record of spot checks, and who is excluded."""

    def __init__(self, config: TrustConfig = TrustConfig()) -> None:
        self.config = config
        self._records: OrderedDict[PeerId, _Record] = OrderedDict()
        self._disputed: dict[PeerId, int] = {}  # peer -> checks of its being settled now

    def probability(self, peer: PeerId) -> float:
        """The probability that `peer`'s next job is spot-checked."""
        config = self.config
        record = self._records.get(peer)
        if record is None:
            return config.first_probability
        if any(record.outcomes):
            return 1.0
        if record.clean < config.first_checks:
            return config.first_probability
        falls = record.clean - config.first_checks + 1
        return max(config.min_probability, config.first_probability * config.decay**falls)

    def is_suspect(self, peer: PeerId) -> bool:
        """Whether a strike of `peer`'s stands in its window."""
        record = self._records.get(peer)
        return record is not None and any(record.outcomes)

    def needs_verification(self, peer: PeerId) -> bool:
        """Whether `peer`'s pictures must be checked before they reach a client: it passed
        fewer than `verify_first` checks since its last strike, or ever."""
        record = self._records.get(peer)
        return (0 if record is None else record.clean) < self.config.verify_first

    def in_flight_limit(self, peer: PeerId) -> int | None:
        """How many of this gateway's jobs `peer` may hold at once: 1 while its pictures are
        verified before the answer (its next job waits for the verdict on this one), else
        no limit of ours (None)."""
        return 1 if self.needs_verification(peer) else None

    def is_trusted(self, peer: PeerId) -> bool:
        """Whether `peer` passed `trusted_after` checks since its last strike (or ever)."""
        record = self._records.get(peer)
        return record is not None and record.clean >= self.config.trusted_after

    def passed(self, peer: PeerId) -> None:
        """A check found `peer`'s picture right."""
        record = self._record(peer)
        record.outcomes.append(False)
        record.clean += 1

    def struck(self, peer: PeerId, reason: str, now: float) -> Exclusion | None:
        """A check found `peer` the odd one out (`reason` says how); returns the exclusion this
        strike brings, if it brings one."""
        config = self.config
        record = self._record(peer)
        record.outcomes.append(True)
        record.clean = 0
        if sum(record.outcomes) < config.strikes or now < record.excluded_until:
            return None
        record.exclusions += 1
        length = min(config.exclusion * 2.0 ** min(record.exclusions - 1, 64), config.max_exclusion)
        record.excluded_until = now + length
        record.reason = reason
        # On probation once back: its last strike stays in its window.
        record.outcomes = deque([True], maxlen=config.window)
        return Exclusion(record.excluded_until, reason, record.exclusions)

    def is_excluded(self, peer: PeerId, now: float) -> bool:
        """Whether `peer` is excluded at wall time `now`, or held while a third provider
        settles a check it disagreed in (`dispute`): it gets no jobs meanwhile."""
        if peer in self._disputed:
            return True
        record = self._records.get(peer)
        return record is not None and now < record.excluded_until

    def dispute(self, peer: PeerId) -> None:
        """Hold `peer` back until the check it disagreed in is settled; pair with `settle`."""
        self._disputed[peer] = self._disputed.get(peer, 0) + 1

    def settle(self, peer: PeerId) -> None:
        """A check held by `dispute` is settled."""
        count = self._disputed.get(peer, 0) - 1
        if count > 0:
            self._disputed[peer] = count
        else:
            self._disputed.pop(peer, None)

    def exclusion(self, peer: PeerId, now: float) -> Exclusion | None:
        """`peer`'s exclusion in force at `now`, if any."""
        record = self._records.get(peer)
        if record is None or now >= record.excluded_until:
            return None
        return Exclusion(record.excluded_until, record.reason, record.exclusions)

    def standing(self, peer: PeerId, now: float) -> Standing:
        """`peer`'s record (an empty one if it has none)."""
        record = self._records.get(peer)
        if record is None:
            return Standing(0, 0, 0, self.probability(peer), None)
        return Standing(
            len(record.outcomes),
            sum(record.outcomes),
            record.clean,
            self.probability(peer),
            self.exclusion(peer, now),
        )

    def excluded(self, now: float) -> int:
        """How many providers are excluded at wall time `now`."""
        return sum(now < record.excluded_until for record in self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def _record(self, peer: PeerId) -> _Record:
        record = self._records.get(peer)
        if record is None:
            record = self._records[peer] = _Record(deque(maxlen=self.config.window))
            self._forget(peer)
        else:
            self._records.move_to_end(peer)
        return record

    def _forget(self, keep: PeerId) -> None:
        """Drop the least recently checked records beyond `max_providers`, sparing those
        excluded (by the latest end any exclusion could have) and `keep`."""
        if len(self._records) <= self.config.max_providers:
            return
        for peer, record in list(self._records.items()):
            if len(self._records) <= self.config.max_providers:
                return
            if peer != keep and not record.exclusions:
                del self._records[peer]
        # Every record holds an exclusion: drop the oldest regardless.
        while len(self._records) > self.config.max_providers:
            oldest = next(iter(self._records))
            if oldest == keep:
                self._records.move_to_end(keep)
                continue
            del self._records[oldest]
