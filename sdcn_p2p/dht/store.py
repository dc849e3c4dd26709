"""The records a DHT server holds for others: signed PeerRecords and Adverts, bounded.

A key maps to a dictionary ``{publisher: StoredValue}`` (hivemind's dictionary values): the
providers of a model are the adverts under its model key, one per provider, each with its own
expiry; a peer's PeerRecord is the dictionary of one publisher under its peer key. Pure: times
are wall-clock seconds passed in, since record expiry is agreed between peers.

Every value is charged to its `Source`: the connected peer that sent it and the address group
it sent from (its IPv4 address, or its IPv6 /64; a loopback or unknown address groups nothing).
Counting only publishers is not enough: one peer can sign records with as many identities as
it likes.

What `put` refuses, and how:

- invalid records (oversized, forged, tampered, of another kind, stored under a key the record
  does not name, expired): RecordError, from `validate`;
- a lower seq than the one held for (key, publisher): RecordError; the same seq: `put` returns
  False and keeps the held value (re-publishing is harmless);
- quotas: ResourceLimitExceeded when the publisher already holds `max_per_publisher` entries,
  the sender `max_per_sender`, or the senders of its address group `max_per_address` (our own
  puts are exempt from the last two).

When the key's dictionary or the whole store is full, a value leaves to make room: the one
expiring soonest among those of the heaviest sources (the address groups holding the most,
then the senders in them holding the most, the newcomer's own source counting the newcomer).
If that is the newcomer itself, it is refused with ResourceLimitExceeded and nothing changes.
So a flood from one machine, however many identities sign it, only ever displaces its own
records once the store is full; honest records are displaced only by a fair share. Expired
values always go first. The store never holds more than its bounds.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import itertools
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sdcn_p2p.errors import ProtocolError, RecordError, ResourceLimitExceeded
from sdcn_p2p.identity import PeerId, decode_public_key
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.records import MAX_ENVELOPE_SIZE, Advert, Envelope, PeerRecord

__all__ = ["LOCAL", "PEER_RECORD_TTL", "RecordStore", "Source", "StoredValue", "validate"]

#: Seconds a PeerRecord is kept after it is received.
PEER_RECORD_TTL = 3600.0


@dataclass(frozen=True, slots=True)
class Source:
    """Who had a value stored: the sending peer (None: ourselves) and its address group."""

    peer: PeerId | None = None
    address: str | None = None

    @classmethod
    def of(cls, peer: PeerId, addr: Multiaddr | None) -> Source:
        """The source of what `peer` sends over a connection from `addr`.

        IPv4 senders group by address and IPv6 senders by /64 (what one host is usually
        given); loopback and unknown addresses group nothing, so that peers on one machine
        (a devnet) do not share a quota.
        """
        if addr is None or addr.family not in ("ip4", "ip6") or addr.is_loopback:
            return cls(peer)
        if addr.family == "ip6":
            return cls(peer, str(ipaddress.ip_network(f"{addr.host}/64", strict=False)))
        return cls(peer, addr.host)

    @property
    def group(self) -> Hashable:
        """What this source's stores count against together: its address, else itself."""
        return ("ip", self.address) if self.address is not None else ("peer", self.peer)


#: The source of what we store ourselves.
LOCAL = Source()


@dataclass(frozen=True, slots=True)
class StoredValue:
    """A validated record as stored under one key: `data` is the encoded envelope."""

    publisher: PeerId
    seq: int
    expires_at: float  # wall seconds
    envelope: Envelope
    data: bytes
    source: Source = LOCAL


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


# (expires_at, tiebreak, key, value): entries whose value was replaced or removed are skipped
# when met, and a heap is rebuilt when they outnumber live ones.
_Entry = tuple[float, int, bytes, StoredValue]


@dataclass(slots=True)
class _Account:
    """What one source holds: how much, and its values by expiry."""

    count: int = 0
    bytes: int = 0
    heap: list[_Entry] = field(default_factory=list)


def _heaviest(usage: Mapping[Source, int]) -> set[Source]:
    """The sources to take room from: those holding the most within the address groups
    holding the most. `usage` must not be empty.
    """
    groups: Counter[Hashable] = Counter()
    for source, amount in usage.items():
        groups[source.group] += amount
    top = max(groups.values())
    candidates = {s: amount for s, amount in usage.items() if groups[s.group] == top}
    top = max(candidates.values())
    return {s for s, amount in candidates.items() if amount == top}


class RecordStore:
    """Validated records by key and publisher, within size and count bounds.

    `max_bytes` caps the sum of the stored envelopes' sizes.
    """

    def __init__(
        self,
        *,
        max_record_size: int = MAX_ENVELOPE_SIZE,
        max_per_publisher: int = 256,
        max_per_sender: int = 1024,
        max_per_address: int = 4096,
        max_records: int = 20_000,
        max_values_per_key: int = 256,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.max_record_size = max_record_size
        self.max_per_publisher = max_per_publisher
        self.max_per_sender = max_per_sender
        self.max_per_address = max_per_address
        self.max_records = max_records
        self.max_values_per_key = max_values_per_key
        self.max_bytes = max_bytes
        self._keys: dict[bytes, dict[PeerId, StoredValue]] = {}
        self._per_publisher: dict[PeerId, int] = {}
        self._accounts: dict[Source, _Account] = {}
        self._per_address: dict[str, int] = {}
        self._count = 0
        self._bytes = 0
        self._expiry: list[_Entry] = []
        self._tiebreak = itertools.count()

    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def held_by(self, source: Source) -> int:
        """How many values `source` has stored here."""
        account = self._accounts.get(source)
        return account.count if account is not None else 0

    def held_by_address(self, address: str) -> int:
        """How many values the senders in address group `address` have stored here."""
        return self._per_address.get(address, 0)

    def put(self, key: bytes, envelope: Envelope, now: float, source: Source = LOCAL) -> bool:
        """Validate and store `envelope`, sent by `source`, under `key` at wall time `now`.

        Returns True if stored, False if its seq is already held. Raises RecordError for an
        invalid or stale record and ResourceLimitExceeded for a quota refusal (see the module).
        The quotas are checked first, so a flood costs no signature checks.
        """
        values = self._keys.get(key, {})
        signer = _signer(envelope)
        self._check_quotas(values.get(signer), signer, source)
        value = replace(validate(key, envelope, now, max_size=self.max_record_size), source=source)
        held = values.get(value.publisher)
        if held is not None and held.expires_at <= now:
            self._remove(key, held)
            held = None
        freed: list[tuple[bytes, StoredValue]] = []  # values under `key` the new one pushes out
        if held is not None:
            if value.seq == held.seq:
                return False
            if value.seq < held.seq:
                raise RecordError(
                    f"stale record: seq {value.seq} is below held seq {held.seq} "
                    f"of {value.publisher}"
                )
            freed.append((key, held))
        elif len(values) >= self.max_values_per_key:
            unexpired = self.values(key, now)
            if len(unexpired) >= self.max_values_per_key:
                freed.append((key, self._key_victim(unexpired, value)))
        if self._count + 1 > self.max_records or self._bytes + len(value.data) > self.max_bytes:
            self.expire(now)
        for victim_key, victim in freed + self._evictions(value, [v for _, v in freed]):
            self._remove(victim_key, victim)
        self._insert(key, value)
        return True

    def _check_quotas(self, held: StoredValue | None, signer: PeerId, source: Source) -> None:
        if held is None and self._per_publisher.get(signer, 0) >= self.max_per_publisher:
            raise ResourceLimitExceeded(
                f"{signer} already has {self.max_per_publisher} records stored"
            )
        if source.peer is None or (held is not None and held.source == source):
            return  # ours, or an update of what this source stored: nothing grows
        if self.held_by(source) >= self.max_per_sender:
            raise ResourceLimitExceeded(
                f"{source.peer} already stored {self.max_per_sender} records here"
            )
        if (
            source.address is not None
            and self.held_by_address(source.address) >= self.max_per_address
        ):
            raise ResourceLimitExceeded(
                f"peers at {source.address} already stored {self.max_per_address} records here"
            )

    def _key_victim(self, values: Iterable[StoredValue], value: StoredValue) -> StoredValue:
        """The value that leaves a full dictionary of unexpired `values` to make room for
        `value`. Raises ResourceLimitExceeded if that is `value` itself.
        """
        values = list(values)
        usage = Counter(v.source for v in values)
        usage[value.source] += 1
        heavy = _heaviest(usage)
        victim = min(
            (v for v in values if v.source in heavy), key=lambda v: v.expires_at, default=None
        )
        if value.source in heavy and (victim is None or victim.expires_at >= value.expires_at):
            raise ResourceLimitExceeded(
                f"the key already holds {self.max_values_per_key} values, and those of the "
                "senders holding the most are expiring later"
            )
        assert victim is not None
        return victim

    def _evictions(
        self, value: StoredValue, freed: list[StoredValue]
    ) -> list[tuple[bytes, StoredValue]]:
        """The values to evict so that `value` fits once `freed` are gone, chosen as the
        module says. Raises ResourceLimitExceeded, changing nothing, if `value` itself would
        have to go. Expects no expired value in the store.
        """
        leaving = list(freed)  # and the victims, as they are chosen
        count = self._count - len(freed) + 1
        size = self._bytes - sum(len(v.data) for v in freed) + len(value.data)
        popped: list[tuple[_Account, _Entry]] = []  # taken off their heaps: back if refused
        victims: list[tuple[bytes, StoredValue]] = []
        try:
            while count > self.max_records or size > self.max_bytes:
                by_count = count > self.max_records
                heavy = _heaviest(self._usage_after(value, leaving, by_count))
                soonest = [
                    (entry, account)
                    for source in heavy
                    if (account := self._accounts.get(source)) is not None
                    and (entry := self._soonest(account, leaving, popped)) is not None
                ]
                entry, account = min(soonest, key=lambda pair: pair[0], default=(None, None))
                if value.source in heavy and (entry is None or entry[0] >= value.expires_at):
                    raise ResourceLimitExceeded(
                        "the record store is full, and the values of the senders holding the "
                        "most are expiring later"
                    )
                assert entry is not None and account is not None
                popped.append((account, heapq.heappop(account.heap)))
                victims.append((entry[2], entry[3]))
                leaving.append(entry[3])
                count -= 1
                size -= len(entry[3].data)
        except ResourceLimitExceeded:
            for account, entry in popped:
                heapq.heappush(account.heap, entry)
            raise
        return victims

    def _usage_after(
        self, value: StoredValue, leaving: list[StoredValue], by_count: bool
    ) -> dict[Source, int]:
        """What each source would hold (values, or bytes) once `value` is in and `leaving`
        are out.
        """

        def size(v: StoredValue) -> int:
            return 1 if by_count else len(v.data)

        usage = {s: a.count if by_count else a.bytes for s, a in self._accounts.items()}
        usage[value.source] = usage.get(value.source, 0) + size(value)
        for v in leaving:
            usage[v.source] -= size(v)
        return usage

    def _soonest(
        self,
        account: _Account,
        leaving: list[StoredValue],
        popped: list[tuple[_Account, _Entry]],
    ) -> _Entry | None:
        """The entry of `account` expiring soonest that is live and not `leaving`; dead
        entries are dropped, leaving ones are moved to `popped`.
        """
        heap = account.heap
        while heap:
            entry = heap[0]
            if not self._is_live(entry[2], entry[3]):
                heapq.heappop(heap)
            elif any(entry[3] is v for v in leaving):
                popped.append((account, heapq.heappop(heap)))
            else:
                return entry
        return None

    def _insert(self, key: bytes, value: StoredValue) -> None:
        self._keys.setdefault(key, {})[value.publisher] = value
        self._per_publisher[value.publisher] = self._per_publisher.get(value.publisher, 0) + 1
        account = self._accounts.setdefault(value.source, _Account())
        account.count += 1
        account.bytes += len(value.data)
        if value.source.address is not None:
            address = value.source.address
            self._per_address[address] = self._per_address.get(address, 0) + 1
        self._count += 1
        self._bytes += len(value.data)
        entry = (value.expires_at, next(self._tiebreak), key, value)
        heapq.heappush(self._expiry, entry)
        heapq.heappush(account.heap, entry)

    def _remove(self, key: bytes, value: StoredValue, *, compact: bool = True) -> None:
        values = self._keys[key]
        del values[value.publisher]
        if not values:
            del self._keys[key]
        _decrement(self._per_publisher, value.publisher)
        if value.source.address is not None:
            _decrement(self._per_address, value.source.address)
        account = self._accounts[value.source]
        account.count -= 1
        account.bytes -= len(value.data)
        if not account.count:
            del self._accounts[value.source]
        elif len(account.heap) > 2 * account.count + 64:
            account.heap = self._compacted(account.heap)
        self._count -= 1
        self._bytes -= len(value.data)
        if compact and len(self._expiry) > 2 * self._count + 64:
            self._expiry = self._compacted(self._expiry)

    def _compacted(self, heap: list[_Entry]) -> list[_Entry]:
        live = [e for e in heap if self._is_live(e[2], e[3])]
        heapq.heapify(live)
        return live

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
                self._remove(key, value, compact=False)
                dropped += 1
        return dropped

    def __repr__(self) -> str:
        return f"<RecordStore {self._count} values under {len(self._keys)} keys>"


def _decrement(counts: dict[Any, int], key: Any) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
