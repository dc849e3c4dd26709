"""Gossip's pure state as plain functions: the seen cache, the mesh policy, the push budget.

Time is passed in, as a discrete-event simulation passes it; no trio here.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

import sdcn_p2p.gossip
from sdcn_p2p.gossip.config import GossipConfig
from sdcn_p2p.gossip.state import MeshState, PushBudget, SeenCache
from sdcn_p2p.testing import test_identity

PEER_IDS = [test_identity(i, seed=3).peer_id for i in range(12)]


def test_seen_cache_remembers_each_key_once_within_its_bound() -> None:
    seen = SeenCache(3)
    assert seen.add((PEER_IDS[0], 1), 100.0)
    assert not seen.add((PEER_IDS[0], 1), 100.0)
    assert seen.add((PEER_IDS[0], 2), 100.0)
    for seq in range(3, 50):
        assert seen.add((PEER_IDS[1], seq), 200.0)
        assert len(seen) <= 3
    assert (PEER_IDS[0], 1) not in seen  # the oldest went first
    assert (PEER_IDS[1], 49) in seen


def test_seen_cache_forgets_keys_whose_advert_expired() -> None:
    seen = SeenCache(10)
    seen.add((PEER_IDS[0], 1), 100.0)
    seen.add((PEER_IDS[1], 1), 110.0)
    seen.add((PEER_IDS[2], 1), 105.0)
    assert seen.expire(99.0) == 0
    assert seen.expire(100.0) == 1
    assert seen.expire(120.0) == 2
    assert len(seen) == 0


CONFIG = GossipConfig()


def test_mesh_state_tops_up_below_degree_low_from_the_best_candidates() -> None:
    mesh = MeshState(CONFIG)
    members = PEER_IDS[:2]
    graft, prune = mesh.heartbeat(members, PEER_IDS, 0.0, random.Random(1))
    assert graft == PEER_IDS[2:4] and prune == []
    assert mesh.pending == set(PEER_IDS[2:4])
    # Pending grafts count: nothing more is asked until they are answered.
    assert mesh.heartbeat(members, PEER_IDS, 1.0, random.Random(1)) == ([], [])
    mesh.pending.clear()
    assert mesh.heartbeat(PEER_IDS[:3], PEER_IDS, 2.0, random.Random(1)) == ([], [])


def test_mesh_state_prunes_down_to_degree_above_degree_high() -> None:
    mesh = MeshState(CONFIG)
    high = CONFIG.degree_high
    graft, prune = mesh.heartbeat(PEER_IDS[: high + 1], PEER_IDS, 0.0, random.Random(1))
    assert graft == [] and len(prune) == high + 1 - CONFIG.degree
    assert set(prune) <= set(PEER_IDS[: high + 1])
    assert mesh.heartbeat(PEER_IDS[:high], PEER_IDS, 0.0, random.Random(1)) == ([], [])


def test_mesh_state_backoff_keeps_a_peer_out_for_a_while() -> None:
    mesh = MeshState(CONFIG)
    mesh.backoff(PEER_IDS[0], 10.0)
    assert mesh.backed_off(PEER_IDS[0], 69.9)
    assert not mesh.accepts_graft(PEER_IDS[0], [], 69.9)
    assert not mesh.wants(PEER_IDS[0], [], 69.9)
    graft, _ = mesh.heartbeat([], PEER_IDS[:2], 20.0, random.Random(1))
    assert graft == [PEER_IDS[1]]
    assert not mesh.backed_off(PEER_IDS[0], 70.0)
    assert mesh.accepts_graft(PEER_IDS[0], [], 70.0)


def test_mesh_state_accepts_grafts_up_to_degree_high() -> None:
    mesh = MeshState(CONFIG)
    high = CONFIG.degree_high
    newcomer = PEER_IDS[-1]
    assert mesh.accepts_graft(newcomer, PEER_IDS[: high - 1], 0.0)
    assert not mesh.accepts_graft(newcomer, PEER_IDS[:high], 0.0)
    assert mesh.accepts_graft(PEER_IDS[0], PEER_IDS[:high], 0.0)  # already a member
    assert mesh.wants(newcomer, PEER_IDS[:3], 0.0)
    assert not mesh.wants(newcomer, PEER_IDS[:4], 0.0)


def test_push_budget_refills_at_its_rate_up_to_its_burst() -> None:
    budget = PushBudget(rate=10.0, burst=50)
    peer = test_identity(1).peer_id
    assert budget.take(peer, 80, now=0.0) == 50
    assert budget.take(peer, 80, now=1.0) == 10
    assert budget.take(peer, 80, now=100.0) == 50  # never more than the burst
    assert budget.take(test_identity(2).peer_id, 5, now=100.0) == 5


def test_push_budget_forgets_the_buckets_of_peers_that_stopped_pushing() -> None:
    budget = PushBudget(rate=1.0, burst=10)
    for index in range(2000):
        budget.take(test_identity(index, seed=4).peer_id, 1, now=float(index))
    assert len(budget._buckets) <= 1025  # refilled buckets are dropped, not kept for ever
    latest = test_identity(1999, seed=4).peer_id
    assert budget.take(latest, 10, now=1999.0) == 9  # the one that pushed last is still held


@pytest.mark.parametrize("module", ["messages.py", "state.py", "config.py"])
def test_the_pure_parts_import_no_io_and_await_nothing(module: str) -> None:
    nodes = list(ast.walk(ast.parse((Path(sdcn_p2p.gossip.__file__).parent / module).read_text())))
    imported = {n.module for n in nodes if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"trio", "time", "sdcn_p2p.host", "sdcn_p2p.connection"}
    assert not any(isinstance(n, ast.Await | ast.AsyncFunctionDef) for n in nodes)
