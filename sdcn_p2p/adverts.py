"""AdvertCache: the newest verified, unexpired advert of each provider, queried by model.

The cache is pure bookkeeping (no I/O, no tasks); wall time comes from the injected
`wall_clock`. Gossip, the DHT and the local provider feed it envelopes with `add`; the gateway
asks it `find(model, loras)` and `models()`. It never holds more than `max_adverts` adverts: when
full, the advert that expires soonest makes room, unless its peer is in `protected` (a gateway
protects the providers that completed its jobs, so a flood of fresh identities cannot push
them out). Expired adverts are dropped lazily by every query and by `expire()`.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from sdcn_p2p._subscriptions import Callbacks, Subscription
from sdcn_p2p.errors import RecordError
from sdcn_p2p.identity import PeerId
from sdcn_p2p.records import MAX_ENVELOPE_SIZE, Advert, Envelope, normalize_model_name

__all__ = ["AdvertCache", "ModelSummary"]


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """One model of the network catalog: who offers it, with which LoRAs."""

    name: str  # as its first provider spells it
    providers: int  # online providers
    loras: tuple[str, ...]  # offered by at least one of them, sorted


@dataclass(frozen=True, slots=True)
class _Entry:
    advert: Advert
    envelope: Envelope
    models: tuple[str, ...]  # normalized names, without repeats


class AdvertCache:
    """The newest verified, unexpired advert per peer, at most `max_adverts` of them."""

    def __init__(self, *, wall_clock: Callable[[], float], max_adverts: int = 10_000) -> None:
        if max_adverts < 1:
            raise ValueError(f"max_adverts must be at least 1, not {max_adverts}")
        self.max_adverts = max_adverts
        self._wall_clock = wall_clock
        self._entries: dict[PeerId, _Entry] = {}
        self._by_signature: dict[bytes, PeerId] = {}
        self._by_model: dict[str, dict[PeerId, None]] = {}  # a dict keeps insertion order
        # (expires_at, seq, peer): a min-heap with stale items, skipped when popped.
        self._expiry: list[tuple[float, int, PeerId]] = []
        self._on_advert: Callbacks[Advert] = Callbacks()
        self._digest_xor = 0  # XOR of _entry_hash over the entries: an order-free summary
        #: Peers whose adverts are never evicted to make room (they still expire).
        self.protected: set[PeerId] = set()

    # --- adding and removing ---------------------------------------------------------------------

    def add(self, envelope: Envelope) -> Advert | None:
        """Verify a sealed advert and keep it if its seq is above the one held for its peer.

        Returns the Advert when it was new and kept; None for a duplicate, a stale seq, or an
        advert that expires before all the unprotected ones of a full cache. Raises
        RecordError when the envelope is forged, malformed, over MAX_ENVELOPE_SIZE, expired or
        issued in the future.
        Subscribers run before this returns.
        """
        size = len(envelope.to_bytes())
        if size > MAX_ENVELOPE_SIZE:
            raise RecordError(f"advert envelope of {size} bytes is over {MAX_ENVELOPE_SIZE}")
        now = self._wall_clock()
        self._expire(now)
        # The same advert arrives from several peers: recognise it without verifying again.
        holder = self._by_signature.get(envelope.signature)
        if holder is not None and self._entries[holder].envelope == envelope:
            return None
        advert = Advert.from_envelope(envelope)
        advert.check_fresh(now)
        held = self._entries.get(advert.peer_id)
        if held is not None:
            if advert.seq <= held.advert.seq:
                return None
            self._unlink(held)
        elif len(self._entries) >= self.max_adverts:
            soonest = self._soonest_unprotected()
            if soonest is None or (
                advert.expires_at <= soonest.advert.expires_at
                and advert.peer_id not in self.protected
            ):
                return None
            self._unlink(soonest)
        self._link(_Entry(advert, envelope, _model_names(advert)))
        self._on_advert.emit(advert)
        return advert

    def remove(self, peer_id: PeerId) -> Advert | None:
        """Forget the advert of `peer_id`; returns it, or None if none was held."""
        entry = self._entries.get(peer_id)
        if entry is None:
            return None
        self._unlink(entry)
        return entry.advert

    def expire(self) -> int:
        """Drop every advert expired at the current wall time; returns how many."""
        return self._expire(self._wall_clock())

    def subscribe(self, callback: Callable[[Advert], None]) -> Subscription:
        """Call `callback(advert)` for each advert `add` keeps, until the subscription closes:
        use it as ``with cache.subscribe(callback):``, or call its `close()`.

        `callback` runs inside `add`: it must be quick and must not raise.
        """
        return self._on_advert.subscribe(callback)

    # --- queries ---------------------------------------------------------------------------------

    def get(self, peer_id: PeerId) -> Advert | None:
        self.expire()
        entry = self._entries.get(peer_id)
        return entry.advert if entry else None

    def envelope(self, peer_id: PeerId) -> Envelope | None:
        """The signed envelope of `peer_id`'s advert, to pass on to other peers."""
        self.expire()
        entry = self._entries.get(peer_id)
        return entry.envelope if entry else None

    def digest(self) -> dict[PeerId, int]:
        """The seq held for each peer, for anti-entropy: ``{peer: seq}``."""
        self.expire()
        return {peer: entry.advert.seq for peer, entry in self._entries.items()}

    @property
    def digest_hash(self) -> bytes:
        """16 bytes summing up `digest()`: equal for two caches holding the same (peer, seq)
        pairs, so peers can skip a digest exchange that would change nothing.
        """
        self.expire()
        return self._digest_xor.to_bytes(16, "big")

    def find(
        self, model: str, loras: Iterable[str] = (), *, include_draining: bool = False
    ) -> list[Advert]:
        """Unexpired adverts offering `model` and every LoRA in `loras`, in arrival order.

        Names match after `normalize_model_name`. Only online providers
        (`Advert.is_online_provider`) unless `include_draining`, which takes any state.
        """
        self.expire()
        wanted = list(loras)
        found = []
        for peer in self._by_model.get(normalize_model_name(model), ()):
            advert = self._entries[peer].advert
            if (include_draining or advert.is_online_provider) and advert.has_loras(wanted):
                found.append(advert)
        return found

    def models(self) -> dict[str, ModelSummary]:
        """The catalog of models that online providers offer, by normalized name."""
        self.expire()
        catalog: dict[str, ModelSummary] = {}
        for key, peers in self._by_model.items():
            adverts = [self._entries[p].advert for p in peers]
            online = [a for a in adverts if a.is_online_provider]
            if not online:
                continue
            name = next(m.name for m in online[0].models if normalize_model_name(m.name) == key)
            loras = sorted({lo.name for a in online for lo in a.loras})
            catalog[key] = ModelSummary(name, len(online), tuple(loras))
        return catalog

    def __len__(self) -> int:
        self.expire()
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        self.expire()
        return peer_id in self._entries

    def __iter__(self) -> Iterator[Advert]:
        """The unexpired adverts, in arrival order (a snapshot)."""
        self.expire()
        return iter([entry.advert for entry in self._entries.values()])

    # --- bookkeeping -----------------------------------------------------------------------------

    def _link(self, entry: _Entry) -> None:
        advert = entry.advert
        self._entries[advert.peer_id] = entry
        self._digest_xor ^= _entry_hash(advert)
        self._by_signature[entry.envelope.signature] = advert.peer_id
        for name in entry.models:
            self._by_model.setdefault(name, {})[advert.peer_id] = None
        heapq.heappush(self._expiry, (advert.expires_at, advert.seq, advert.peer_id))
        if len(self._expiry) > 2 * len(self._entries) + 64:
            # Replaced adverts leave stale heap items behind; rebuild before they pile up.
            self._expiry = [
                (e.advert.expires_at, e.advert.seq, p) for p, e in self._entries.items()
            ]
            heapq.heapify(self._expiry)

    def _unlink(self, entry: _Entry) -> None:
        peer = entry.advert.peer_id
        del self._entries[peer]
        self._digest_xor ^= _entry_hash(entry.advert)
        if self._by_signature.get(entry.envelope.signature) == peer:
            del self._by_signature[entry.envelope.signature]
        for name in entry.models:
            peers = self._by_model[name]
            del peers[peer]
            if not peers:
                del self._by_model[name]

    def _current(self, item: tuple[float, int, PeerId]) -> _Entry | None:
        """The entry a heap item stands for, or None if the item is stale."""
        _, seq, peer = item
        entry = self._entries.get(peer)
        return entry if entry is not None and entry.advert.seq == seq else None

    def _soonest_unprotected(self) -> _Entry | None:
        """The entry that expires first among unprotected peers, or None if all are protected."""
        skipped = []
        found = None
        while self._expiry:
            entry = self._current(self._expiry[0])
            if entry is None:
                heapq.heappop(self._expiry)
            elif entry.advert.peer_id in self.protected:
                skipped.append(heapq.heappop(self._expiry))
            else:
                found = entry
                break
        for item in skipped:
            heapq.heappush(self._expiry, item)
        return found

    def _expire(self, now: float) -> int:
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            entry = self._current(heapq.heappop(self._expiry))
            if entry is not None:
                self._unlink(entry)
                dropped += 1
        return dropped


def _entry_hash(advert: Advert) -> int:
    data = advert.peer_id.bytes + advert.seq.to_bytes(8, "big")
    return int.from_bytes(hashlib.sha256(data).digest()[:16], "big")


def _model_names(advert: Advert) -> tuple[str, ...]:
    return tuple(dict.fromkeys(normalize_model_name(m.name) for m in advert.models))
