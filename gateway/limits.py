"""Per-client limits: who a client is, what it may do, and what it is doing (pure: time passed
in, seconds of trio's clock).

A `Client` is one anonymous address (an IPv4 address, or an IPv6 /64) or one API key, with
its `Limits` and its weight in the fair line (`gateway.admission`). `Quotas` keeps, per
client, what the limits are checked against:

- **requests**: a token bucket of `Limits.requests_per_second`, holding up to
  `Limits.request_burst`; every API request takes one.
- **in flight**: jobs at the dispatcher (running on a provider, or first in line for one): a
  sync job over the limit is refused; an async job waits in the gateway's line instead.
- **waiting**: async jobs in the gateway's line behind those; one more is refused.
- **megapixel-steps per minute**: a bucket refilled at ``megapixel_steps_per_minute / 60``
  a second, holding a minute's worth. A job takes its cost when accepted, if the bucket holds
  that much (a job bigger than a minute's worth needs a full bucket, and leaves it in debt);
  a job that ends without images gives it back.

A refusal is `LimitExceeded` naming the limit, with when to come back. `Quotas` also tells
whether several clients use the gateway now (`shared`), for the job service to keep jobs in
the gateway's line, where the order is fair, rather than in providers' own queues.

State is kept for at most `Quotas.max_clients` clients; beyond that the ones idle longest
(no jobs) are forgotten, their buckets full again.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
from typing import Any

from gateway.errors import LimitExceeded
from sdcn_p2p._config import require
from sdcn_p2p.errors import ConfigError

__all__ = [
    "ANONYMOUS_WEIGHT",
    "REFUSAL_REASONS",
    "SHARED_WINDOW",
    "Client",
    "Limits",
    "Quotas",
    "Reason",
    "TokenBucket",
    "as_client",
]

#: Seconds after its last job a client still counts as using the gateway (`Quotas.shared`).
SHARED_WINDOW = 60.0
#: The weight in the fair share of a client without a key.
ANONYMOUS_WEIGHT = 1.0


class Reason(enum.StrEnum):
    """Why a client was refused: the limit it is over, or what was wrong with its key."""

    NO_KEY = "no_key"  # 401: the gateway requires a key
    BAD_KEY = "bad_key"  # 401: a key the gateway does not know
    REQUESTS = "requests"  # 429: requests per second
    IN_FLIGHT = "in_flight"  # 429: jobs in flight
    WAITING = "waiting"  # 429: jobs waiting in the gateway's line
    MEGAPIXEL_STEPS = "megapixel_steps"  # 429: megapixel-steps per minute


#: The label values of ``sdcn_gateway_refused_total``.
REFUSAL_REASONS = tuple(str(reason) for reason in Reason)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may do; ``math.inf`` is no limit.

    The defaults let one person use a public gateway freely and hold one script to about
    what one fast GPU does (see the README, "Run a public gateway").
    """

    #: Requests a second, sustained (every API request counts: submitting, polling,
    #: following events).
    requests_per_second: float = 5.0
    #: Requests at once beyond the rate (a page loading, a client starting up).
    request_burst: float = 20
    #: Jobs at the dispatcher at once (running, or next in line for a provider).
    max_in_flight: float = 4
    #: Async jobs waiting in the gateway's line behind those.
    max_waiting: float = 100
    #: Work a minute (steps x width x height x images / 10^6), over the last minute.
    megapixel_steps_per_minute: float = 300.0

    def __post_init__(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        for item in fields(self):
            value = getattr(self, item.name)
            low = _LOWEST.get(item.name, 0.0)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            ok = number and not math.isnan(value)
            ok = ok and (value >= low if item.name in _LOWEST else value > 0)
            if ok and item.name in _LOWEST and math.isfinite(value):
                ok = float(value).is_integer()
            must = f"a whole number ≥ {low:g}" if item.name in _LOWEST else "a number > 0"
            require(self, item.name, ok, f"must be {must} (or inf: no limit)")

    @classmethod
    def unlimited(cls) -> Limits:
        """No limit at all."""
        return cls(*(math.inf,) * len(fields(cls)))

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, base: Limits | None = None) -> Limits:
        """`base` (default: the defaults) with the limits `values` names; ``"unlimited"`` is
        no limit. Raises ConfigError for an unknown name or a bad value."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown limit {unknown[0]!r} (known: {', '.join(sorted(known))})")
        changes = {
            name: math.inf if value == "unlimited" else value for name, value in values.items()
        }
        return replace(base or cls(), **changes)

    def to_json(self) -> dict[str, float | None]:
        """The limits as JSON: None where there is no limit."""
        return {
            item.name: (value if math.isfinite(value := getattr(self, item.name)) else None)
            for item in fields(self)
        }


# The counts, and the least each may be.
_LOWEST = {"request_burst": 1.0, "max_in_flight": 1.0, "max_waiting": 0.0}


@dataclass(frozen=True, slots=True)
class Client:
    """Who is asking: `id` is ``ip:ADDRESS`` (IPv6 by its /64), or ``key:NAME`` for an API key.

    `weight`: the tier's weight in the fair share; `providers`: the peer ids (text) of the
    providers the key belongs to.
    """

    id: str
    limits: Limits = field(default_factory=Limits.unlimited)
    weight: float = ANONYMOUS_WEIGHT
    key: str | None = None  # the key's name
    tier: str | None = None
    providers: frozenset[str] = frozenset()


def as_client(client: Client | str) -> Client:
    """`client`, or a client of that id without limits (callers inside the gateway)."""
    return client if isinstance(client, Client) else Client(client)


class TokenBucket:
    """Tokens refilled at `rate` a second up to `capacity` (starting full)."""

    __slots__ = ("_at", "capacity", "rate", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self._at = now

    def level(self, now: float) -> float:
        """The tokens held at `now`."""
        if now > self._at:
            self.tokens = min(self.capacity, self.tokens + (now - self._at) * self.rate)
            self._at = now
        return self.tokens

    def take(self, amount: float, now: float) -> float:
        """Take `amount` if the bucket holds it (or is full, for more than it holds) and
        return 0; else take nothing and return the seconds until it would."""
        if not math.isfinite(self.capacity):
            return 0.0
        need = min(amount, self.capacity)
        held = self.level(now)
        if held >= need:
            self.tokens = held - amount  # below zero for a job bigger than the bucket
            return 0.0
        return (need - held) / self.rate if self.rate > 0 else math.inf

    def give_back(self, amount: float) -> None:
        self.tokens = min(self.capacity, self.tokens + amount)


@dataclass(slots=True)
class _State:
    limits: Limits
    requests: TokenBucket
    work: TokenBucket
    in_flight: int = 0
    waiting: int = 0


class Quotas:
    """Each client's requests, jobs and work against its limits (see the module docstring)."""

    def __init__(self, max_clients: int = 65_536) -> None:
        self.max_clients = max_clients
        self._states: OrderedDict[str, _State] = OrderedDict()  # least recently used first
        self._busy: set[str] = set()  # clients with jobs in flight or waiting
        self._recent: OrderedDict[str, float] = OrderedDict()  # client -> its last job's time

    def __len__(self) -> int:
        return len(self._states)

    @property
    def active(self) -> int:
        """Clients with jobs in flight or waiting now."""
        return len(self._busy)

    # --- checks --------------------------------------------------------------------------------

    def request(self, client: Client, now: float) -> None:
        """Count one request of `client`; LimitExceeded if it is over its rate."""
        state = self._state(client, now)
        wait = state.requests.take(1, now)
        if wait > 0:
            limits = client.limits
            raise LimitExceeded(
                f"over the limit of {limits.requests_per_second:g} requests a second "
                f"(bursts of {limits.request_burst:g}); try again in {wait:.1f} s",
                Reason.REQUESTS,
                retry_after=wait,
            )

    def accept(self, client: Client, cost: float, now: float, *, waits: bool) -> None:
        """Take a job of `cost` megapixel-steps for `client`: into the gateway's line
        (`waits`, an async job) or straight to the dispatcher. Raises LimitExceeded, and then
        counts nothing; `retry_after` of the count limits is a guess (1 s), which callers
        that know better replace."""
        state = self._state(client, now)
        limits = client.limits
        if waits and state.waiting >= limits.max_waiting:
            raise LimitExceeded(
                f"over the limit of {limits.max_waiting:g} jobs waiting in the gateway's line; "
                "submit more once some have started",
                Reason.WAITING,
                retry_after=1.0,
            )
        if not waits and state.in_flight >= limits.max_in_flight:
            raise LimitExceeded(
                f"over the limit of {limits.max_in_flight:g} jobs in flight at once; "
                "send more once some have ended",
                Reason.IN_FLIGHT,
                retry_after=1.0,
            )
        wait = state.work.take(cost, now)
        if wait > 0:
            raise LimitExceeded(
                f"over the limit of {limits.megapixel_steps_per_minute:g} megapixel-steps a "
                f"minute (this job is {cost:.1f}); try again in {wait:.0f} s",
                Reason.MEGAPIXEL_STEPS,
                retry_after=wait,
            )
        if waits:
            state.waiting += 1
        else:
            state.in_flight += 1
        self._touch(client.id, now)

    def may_dispatch(self, client_id: str) -> bool:
        """Whether an async job of the client may go to the dispatcher (in flight < limit)."""
        state = self._states.get(client_id)
        return state is None or state.in_flight < state.limits.max_in_flight

    # --- moves -------------------------------------------------------------------------------

    def dispatched(self, client_id: str, now: float) -> None:
        """An async job of the client left the gateway's line for the dispatcher."""
        state = self._states.get(client_id)
        if state is not None:
            state.waiting -= 1
            state.in_flight += 1
            self._touch(client_id, now)

    def returned(self, client_id: str, now: float) -> None:
        """An async job of the client went back from the dispatcher to the gateway's line."""
        state = self._states.get(client_id)
        if state is not None:
            state.in_flight -= 1
            state.waiting += 1

    def ended(self, client_id: str, now: float, *, waiting: bool, refund: float = 0.0) -> None:
        """A job of the client ended: it was `waiting` in line (else in flight); `refund`
        megapixel-steps go back to its bucket (a job that ran nothing)."""
        state = self._states.get(client_id)
        if state is None:
            return
        if waiting:
            state.waiting -= 1
        else:
            state.in_flight -= 1
        if refund:
            state.work.give_back(refund)
        self._touch(client_id, now)

    # --- what a client has, and who is here ------------------------------------------------------

    def usage(self, client: Client, now: float) -> dict[str, float | None]:
        """`client`'s jobs in flight and waiting, and the megapixel-steps it may use now."""
        state = self._states.get(client.id)
        in_flight, waiting = (state.in_flight, state.waiting) if state else (0, 0)
        if state is None:
            available = client.limits.megapixel_steps_per_minute
        else:
            available = state.work.level(now)
        return {
            "jobs_in_flight": in_flight,
            "jobs_waiting": waiting,
            "megapixel_steps_available": round(available, 3) if math.isfinite(available) else None,
        }

    def shared(self, now: float) -> bool:
        """Whether several clients use the gateway now: at least two have jobs, or had one
        end within SHARED_WINDOW seconds."""
        if len(self._busy) >= 2:
            return True
        seen = set(self._busy)
        for client_id in reversed(self._recent):
            if self._recent[client_id] < now - SHARED_WINDOW:
                break
            seen.add(client_id)
            if len(seen) >= 2:
                return True
        return False

    # --- state ---------------------------------------------------------------------------------

    def _state(self, client: Client, now: float) -> _State:
        limits = client.limits
        state = self._states.get(client.id)
        if state is None:
            state = self._states[client.id] = _State(limits, *_buckets(limits, now))
            self._evict()
        else:
            self._states.move_to_end(client.id)
            if state.limits != limits:  # the keys file was reloaded: new limits, tokens kept
                requests, work = _buckets(limits, now)
                requests.tokens = min(requests.capacity, state.requests.level(now))
                work.tokens = min(work.capacity, state.work.level(now))
                state.limits, state.requests, state.work = limits, requests, work
        return state

    def _touch(self, client_id: str, now: float) -> None:
        state = self._states[client_id]
        if state.in_flight > 0 or state.waiting > 0:
            self._busy.add(client_id)
        else:
            self._busy.discard(client_id)
        self._recent.pop(client_id, None)
        self._recent[client_id] = now
        while self._recent and next(iter(self._recent.values())) < now - SHARED_WINDOW:
            self._recent.popitem(last=False)

    def _evict(self) -> None:
        excess = len(self._states) - self.max_clients
        if excess <= 0:
            return
        for client_id in list(self._states)[: excess + 64]:
            if client_id not in self._busy:
                del self._states[client_id]
                excess -= 1
                if excess <= 0:
                    return


def _buckets(limits: Limits, now: float) -> tuple[TokenBucket, TokenBucket]:
    per_minute = limits.megapixel_steps_per_minute
    return (
        TokenBucket(limits.requests_per_second, limits.request_burst, now),
        TokenBucket(per_minute / 60, per_minute, now),
    )
