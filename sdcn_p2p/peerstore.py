"""What a Host knows of other peers: addresses, signed peer records, identify info, RTT."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from sdcn_p2p._subscriptions import Callbacks, Subscription
from sdcn_p2p.identity import PeerId
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.records import Envelope, PeerRecord, check_newer

__all__ = ["PeerInfo", "PeerStore"]

RTT_ALPHA = 0.2
MAX_ADDRS_PER_PEER = 16


@dataclass
class PeerInfo:
    """Everything known of one peer. Mutated only through PeerStore."""

    peer_id: PeerId
    addrs: list[Multiaddr] = field(default_factory=list)
    record: PeerRecord | None = None
    envelope: Envelope | None = None
    rtt: float | None = None  # seconds, EWMA
    protocols: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    agent_version: str = ""
    extensions: dict[str, bytes] = field(default_factory=dict)  # from identify


class PeerStore:
    """Bounded store of PeerInfo, least recently updated evicted first.

    Peers listed in `pinned` (by the Host: currently connected) are never evicted.
    """

    def __init__(self, *, max_peers: int = 10_000) -> None:
        self.max_peers = max_peers
        self._peers: OrderedDict[PeerId, PeerInfo] = OrderedDict()
        self.pinned: set[PeerId] = set()
        self._on_rtt: Callbacks[float] = Callbacks()

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, peer_id: PeerId) -> PeerInfo | None:
        return self._peers.get(peer_id)

    def peers(self) -> list[PeerId]:
        return list(self._peers)

    def _entry(self, peer_id: PeerId) -> PeerInfo:
        info = self._peers.get(peer_id)
        if info is None:
            info = self._peers[peer_id] = PeerInfo(peer_id)
            self._evict()
        else:
            self._peers.move_to_end(peer_id)
        return info

    def _evict(self) -> None:
        excess = len(self._peers) - self.max_peers
        if excess <= 0:
            return
        for peer_id in list(self._peers):
            if excess <= 0:
                break
            if peer_id not in self.pinned:
                del self._peers[peer_id]
                excess -= 1

    def addrs(self, peer_id: PeerId) -> list[Multiaddr]:
        info = self._peers.get(peer_id)
        return list(info.addrs) if info else []

    def add_addrs(self, peer_id: PeerId, addrs: list[Multiaddr] | tuple[Multiaddr, ...]) -> None:
        """Remember dialable addresses (without /p2p/), newest first, at most 16 per peer."""
        info = self._entry(peer_id)
        for addr in addrs:
            addr = addr.without_peer_id()
            if addr.is_unspecified or addr.port == 0:
                continue
            if addr in info.addrs:
                info.addrs.remove(addr)
            info.addrs.insert(0, addr)
        del info.addrs[MAX_ADDRS_PER_PEER:]

    def consume_record(self, envelope: Envelope) -> PeerRecord:
        """Verify a signed peer record and keep it if newer than the one held.

        Its addresses replace the peer's known ones. Raises RecordError when forged,
        mis-keyed or stale.
        """
        return self.add_record(PeerRecord.from_envelope(envelope), envelope)

    def add_record(self, record: PeerRecord, envelope: Envelope) -> PeerRecord:
        """Keep `record`, already verified from `envelope`, if newer than the one held.

        Raises RecordError when it is stale.
        """
        held = self._peers.get(record.peer_id)
        check_newer(held.record.seq if held and held.record else None, record.seq)
        info = self._entry(record.peer_id)
        info.record = record
        info.envelope = envelope
        info.addrs = []
        self.add_addrs(record.peer_id, list(reversed(record.addrs)))
        return record

    def record_rtt(self, peer_id: PeerId, sample: float) -> float:
        """Fold an RTT sample (seconds) into the peer's EWMA (alpha 0.2); return the new value."""
        info = self._entry(peer_id)
        info.rtt = sample if info.rtt is None else (1 - RTT_ALPHA) * info.rtt + RTT_ALPHA * sample
        self._on_rtt.emit(sample)
        return info.rtt

    def subscribe_rtt(self, callback: Callable[[float], None]) -> Subscription:
        """Call `callback(sample)` with each RTT sample (seconds) until the subscription
        closes; it must be quick and must not raise."""
        return self._on_rtt.subscribe(callback)

    def rtt(self, peer_id: PeerId) -> float | None:
        info = self._peers.get(peer_id)
        return info.rtt if info else None

    def set_identify(
        self,
        peer_id: PeerId,
        *,
        protocols: tuple[str, ...],
        roles: tuple[str, ...],
        agent_version: str,
        extensions: dict[str, bytes] | None = None,
    ) -> None:
        info = self._entry(peer_id)
        info.protocols = protocols
        info.roles = roles
        info.agent_version = agent_version
        info.extensions = extensions or {}
