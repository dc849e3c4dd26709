"""The records a DHT server holds for others: signed PeerRecords and Adverts, bounded.

A key maps to a dictionary ``{publisher: StoredValue}`` (hivemind's dictionary values): the
providers of a model are the adverts under its model key, one per provider, each with its own
expiry; a peer's PeerRecord is the dictionary of one publisher under its peer key. Pure: times
are wall-clock seconds passed in, since record expiry is agreed between peers.

What `put` refuses, and how:

- invalid records (oversized, forged, tampered, of another kind, stored under a key the record
  does not name, expired): RecordError, from `validate`;
- a lower seq than the one held for (key, publisher): RecordError; the same seq: `put` returns
  False and keeps the held value (re-publishing is harmless);
- quotas: ResourceLimitExceeded when the publisher already holds `max_per_publisher` entries,
  or when the key's dictionary or the whole store is full of values that expire later than the
  new one; otherwise the value expiring soonest is evicted to make room. The store never holds
  more than its bounds.
"""

from __future__ import annotations

import functools
import heapq
import itertools
from dataclasses import dataclass

from sdcn_p2p.errors import ProtocolError, RecordError, ResourceLimitExceeded
from sdcn_p2p.identity import PeerId, decode_public_key
from sdcn_p2p.records import MAX_ENVELOPE_SIZE, Advert, Envelope, PeerRecord

__all__ = ["PEER_RECORD_TTL", "RecordStore", "StoredValue", "validate"]

#: Seconds a PeerRecord is kept after it is received.
PEER_RECORD_TTL = 3600.0


@dataclass(frozen=True, slots=True)
class StoredValue:
    """A validated record as stored under one key: `data` is the encoded envelope."""

    publisher: PeerId
    seq: int
    expires_at: float  # wall seconds
    envelope: Envelope
    data: bytes


def validate(
    key: bytes, envelope: Envelope, now: float, *, max_size: int = MAX_ENVELOPE_SIZE
) -> StoredValue:
    """Check that `envelope` may be stored under `key` at wall time `now`.

    Only PeerRecords and Adverts are accepted, under a key they name (`PeerRecord.dht_key`,
    one of `Advert.dht_keys`). Raises RecordError saying why not.
    """
    data = envelope.to_bytes()
    if len(data) > max_size:
        raise RecordError(f"record of {len(data)} bytes is over the {max_size}-byte cap")
    if envelope.payload_type == PeerRecord.PAYLOAD_TYPE:
        record = PeerRecord.from_envelope(envelope)
        if key != record.dht_key:
            raise RecordError(f"the peer record of {record.peer_id} is not stored under this key")
        return StoredValue(record.peer_id, record.seq, now + PEER_RECORD_TTL, envelope, data)
    if envelope.payload_type == Advert.PAYLOAD_TYPE:
        advert = Advert.from_envelope(envelope)
        advert.check_fresh(now)
        if key not in advert.dht_keys:
            raise RecordError(f"the advert of {advert.peer_id} names no model with this key")
        return StoredValue(advert.peer_id, advert.seq, advert.expires_at, envelope, data)
    raise RecordError(f"records of type {envelope.payload_type!r} are not stored in the DHT")


@functools.lru_cache(maxsize=4096)
def _signer_of_key(public_key: bytes) -> PeerId:
    try:
        return PeerId.from_public_key(decode_public_key(public_key))
    except (ProtocolError, ValueError) as exc:
        raise RecordError(f"envelope public key is unusable: {exc}") from None


def _signer(envelope: Envelope) -> PeerId:
    """Who signed `envelope`, if its signature verifies (not checked here)."""
    return _signer_of_key(envelope.public_key)


class RecordStore:
    """Validated records by key and publisher, within size and count bounds.

    `max_bytes` caps the sum of the stored envelopes' sizes.
    """

    def __init__(
        self,
        *,
        max_record_size: int = MAX_ENVELOPE_SIZE,
        max_per_publisher: int = 256,
        max_records: int = 20_000,
        max_values_per_key: int = 256,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.max_record_size = max_record_size
        self.max_per_publisher = max_per_publisher
        self.max_records = max_records
        self.max_values_per_key = max_values_per_key
        self.max_bytes = max_bytes
        self._keys: dict[bytes, dict[PeerId, StoredValue]] = {}
        self._per_publisher: dict[PeerId, int] = {}
        self._count = 0
        self._bytes = 0
        # (expires_at, tiebreak, key, value): entries whose value was replaced or removed are
        # skipped when popped, and the heap is rebuilt when they outnumber live ones.
        self._expiry: list[tuple[float, int, bytes, StoredValue]] = []
        self._tiebreak = itertools.count()

    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def put(self, key: bytes, envelope: Envelope, now: float) -> bool:
        """Validate and store `envelope` under `key` at wall time `now`.

        Returns True if stored, False if its seq is already held. Raises RecordError for an
        invalid or stale record and ResourceLimitExceeded for a quota refusal (see the module).
        The publisher's quota is checked first, so a flood costs no signature checks.
        """
        values = self._keys.get(key, {})
        signer = _signer(envelope)
        if signer not in values and self._per_publisher.get(signer, 0) >= self.max_per_publisher:
            raise ResourceLimitExceeded(
                f"{signer} already has {self.max_per_publisher} records stored"
            )
        value = validate(key, envelope, now, max_size=self.max_record_size)
        held = values.get(value.publisher)
        if held is not None and held.expires_at <= now:
            self._remove(key, held)
            held = None
        freed: list[StoredValue] = []  # values under `key` that the new one pushes out
        if held is not None:
            if value.seq == held.seq:
                return False
            if value.seq < held.seq:
                raise RecordError(
                    f"stale record: seq {value.seq} is below held seq {held.seq} "
                    f"of {value.publisher}"
                )
            freed.append(held)
        elif len(values) >= self.max_values_per_key:
            soonest = min(values.values(), key=lambda v: v.expires_at)
            if soonest.expires_at > now and soonest.expires_at >= value.expires_at:
                raise ResourceLimitExceeded(
                    f"the key already holds {self.max_values_per_key} values expiring later"
                )
            freed.append(soonest)
        victims = self._evictions(value, freed, now)
        for old in freed:
            self._remove(key, old)
        for victim_key, victim in victims:
            self._remove(victim_key, victim, in_heap=False)
        self._keys.setdefault(key, {})[value.publisher] = value
        self._per_publisher[value.publisher] = self._per_publisher.get(value.publisher, 0) + 1
        self._count += 1
        self._bytes += len(value.data)
        heapq.heappush(self._expiry, (value.expires_at, next(self._tiebreak), key, value))
        return True

    def _evictions(
        self, value: StoredValue, freed: list[StoredValue], now: float
    ) -> list[tuple[bytes, StoredValue]]:
        """The soonest-expiring values to evict (taken off the expiry heap) so that `value`
        fits once `freed` are gone. Raises ResourceLimitExceeded, changing nothing, if only
        values expiring later than `value` could make room.
        """
        count = self._count - len(freed) + 1
        size = self._bytes - sum(len(v.data) for v in freed) + len(value.data)
        popped: list[tuple[float, int, bytes, StoredValue]] = []
        victims: list[tuple[bytes, StoredValue]] = []
        while count > self.max_records or size > self.max_bytes:
            entry = self._pop_live()
            if entry is not None:
                popped.append(entry)
                expires_at, _, key, victim = entry
                if any(victim is old for old in freed):
                    continue
            if entry is None or (expires_at > now and expires_at >= value.expires_at):
                for item in popped:
                    heapq.heappush(self._expiry, item)
                raise ResourceLimitExceeded("the record store is full of values expiring later")
            victims.append((key, victim))
            count -= 1
            size -= len(victim.data)
        return victims

    def _pop_live(self) -> tuple[float, int, bytes, StoredValue] | None:
        while self._expiry:
            entry = heapq.heappop(self._expiry)
            if self._is_live(entry[2], entry[3]):
                return entry
        return None

    def _remove(self, key: bytes, value: StoredValue, *, in_heap: bool = True) -> None:
        values = self._keys[key]
        del values[value.publisher]
        if not values:
            del self._keys[key]
        remaining = self._per_publisher[value.publisher] - 1
        if remaining:
            self._per_publisher[value.publisher] = remaining
        else:
            del self._per_publisher[value.publisher]
        self._count -= 1
        self._bytes -= len(value.data)
        if in_heap and len(self._expiry) > 2 * self._count + 64:
            self._expiry = [e for e in self._expiry if self._is_live(e[2], e[3])]
            heapq.heapify(self._expiry)

    def _is_live(self, key: bytes, value: StoredValue) -> bool:
        return self._keys.get(key, {}).get(value.publisher) is value

    def values(self, key: bytes, now: float) -> list[StoredValue]:
        """The unexpired values under `key` at wall time `now`, one per publisher."""
        values = self._keys.get(key)
        if not values:
            return []
        expired = [v for v in values.values() if v.expires_at <= now]
        for value in expired:
            self._remove(key, value)
        return list(self._keys.get(key, {}).values())

    def get(self, key: bytes, now: float) -> list[Envelope]:
        """The unexpired envelopes under `key` at wall time `now`, one per publisher."""
        return [value.envelope for value in self.values(key, now)]

    def expire(self, now: float) -> int:
        """Drop every value expired at wall time `now`; return how many."""
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, _, key, value = heapq.heappop(self._expiry)
            if self._is_live(key, value):
                self._remove(key, value, in_heap=False)
                dropped += 1
        return dropped

    def __repr__(self) -> str:
        return f"<RecordStore {self._count} values under {len(self._keys)} keys>"
