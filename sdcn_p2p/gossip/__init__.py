"""Advert gossip over ``/sdcn/gossip/2.0.0``: a GossipSub-style mesh for one topic, adverts.

Each peer keeps a mesh of about `GossipConfig.degree` connected peers that speak the protocol,
made symmetric with GRAFT and PRUNE, and pushes every advert that is new to its AdvertCache to
each mesh peer but the one it came from, at once and only once (a seen cache of (peer, seq)).
Forged, expired, stale or oversized adverts are dropped, never forwarded. A peer may push
`push_rate` adverts a second (bursts of `push_burst`); the rest of a push beyond that is
dropped unread, so a flood costs no signature checks and reaches no one. When a connection to
a gossip peer opens, its dialler sends a digest ({peer: seq}) and both sides pull what they
lack; every `anti_entropy_interval` a peer does the same with one random mesh peer.

- `messages`: the wire format (`parse_message`, one type per message) and its size limits, pure.
- `state`: `SeenCache`, `MeshState` and `PushBudget`, pure (time passed in).
- `config`: `GossipConfig`, checked on construction.
- `service`: `Gossip`, the only part that awaits: serves the protocol, keeps the mesh, pushes
  and syncs adverts.
"""

from sdcn_p2p.gossip.config import GossipConfig
from sdcn_p2p.gossip.messages import (
    DIGEST_EXTENSION,
    GOSSIP,
    AdvertBatch,
    Digest,
    GossipMessage,
    Graft,
    Prune,
    max_entries,
    parse_message,
)
from sdcn_p2p.gossip.service import Gossip, GossipStats
from sdcn_p2p.gossip.state import MeshState, PushBudget, SeenCache

__all__ = [
    "DIGEST_EXTENSION",
    "GOSSIP",
    "AdvertBatch",
    "Digest",
    "Gossip",
    "GossipConfig",
    "GossipMessage",
    "GossipStats",
    "Graft",
    "MeshState",
    "Prune",
    "PushBudget",
    "SeenCache",
    "max_entries",
    "parse_message",
]
