import pytest

from sdcn_p2p.errors import RecordError
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peerstore import MAX_ADDRS_PER_PEER, PeerStore
from sdcn_p2p.records import PeerRecord
from sdcn_p2p.testing import test_identity

ALICE = test_identity(1)
BOB = test_identity(2)


def addr(port: int) -> Multiaddr:
    return Multiaddr.parse(f"/ip4/10.0.0.1/tcp/{port}/ws")


def test_addresses_are_newest_first_deduplicated_and_bounded() -> None:
    store = PeerStore()
    store.add_addrs(ALICE.peer_id, [addr(1), addr(2)])
    store.add_addrs(ALICE.peer_id, [addr(1).with_peer_id(ALICE.peer_id)])
    assert store.addrs(ALICE.peer_id) == [addr(1), addr(2)]
    store.add_addrs(ALICE.peer_id, [addr(p) for p in range(100, 140)])
    assert len(store.addrs(ALICE.peer_id)) == MAX_ADDRS_PER_PEER


def test_unspecified_and_port_zero_addresses_are_not_dialable() -> None:
    store = PeerStore()
    store.add_addrs(ALICE.peer_id, [Multiaddr.parse("/ip4/0.0.0.0/tcp/4001/ws"), addr(0)])
    assert store.addrs(ALICE.peer_id) == []


def test_signed_record_replaces_addresses_and_stale_records_are_refused() -> None:
    store = PeerStore()
    store.add_addrs(ALICE.peer_id, [addr(9)])
    record = PeerRecord(ALICE.peer_id, 10, (addr(1), addr(2)))
    store.consume_record(record.seal(ALICE))
    assert store.addrs(ALICE.peer_id) == [addr(1), addr(2)]
    for seq in (10, 9):
        with pytest.raises(RecordError, match="stale"):
            store.consume_record(PeerRecord(ALICE.peer_id, seq, (addr(3),)).seal(ALICE))
    assert store.get(ALICE.peer_id).record == record


def test_record_signed_by_another_key_is_refused() -> None:
    store = PeerStore()
    envelope = PeerRecord(ALICE.peer_id, 1, (addr(1),)).seal(ALICE)
    forged = type(envelope)(
        BOB.public_key_bytes, envelope.payload_type, envelope.payload, BOB.sign(b"whatever")
    )
    with pytest.raises(RecordError):
        store.consume_record(forged)
    assert ALICE.peer_id not in store


def test_rtt_is_an_ewma_with_alpha_one_fifth() -> None:
    store = PeerStore()
    assert store.rtt(ALICE.peer_id) is None
    assert store.record_rtt(ALICE.peer_id, 0.100) == pytest.approx(0.100)
    assert store.record_rtt(ALICE.peer_id, 0.200) == pytest.approx(0.120)


def test_rtt_subscribers_hear_each_sample_until_they_unsubscribe() -> None:
    store = PeerStore()
    samples: list[float] = []
    with store.subscribe_rtt(samples.append):
        store.record_rtt(ALICE.peer_id, 0.100)
        store.record_rtt(ALICE.peer_id, 0.200)
    store.record_rtt(ALICE.peer_id, 0.300)
    assert samples == [0.100, 0.200]


def test_least_recently_updated_peers_are_evicted_but_pinned_ones_stay() -> None:
    store = PeerStore(max_peers=3)
    ids = [test_identity(i).peer_id for i in range(10, 15)]
    store.pinned.add(ids[0])
    for peer in ids:
        store.record_rtt(peer, 0.01)
    assert len(store) == 3
    assert ids[0] in store and ids[-1] in store and ids[1] not in store
