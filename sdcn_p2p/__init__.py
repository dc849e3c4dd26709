"""SDCN p2p: a peer-to-peer network for sharing Stable Diffusion compute.

Layers, bottom up (each module imports only those above it in this list):

- `identity`: Ed25519 keys and libp2p-compatible PeerIds; key files.
- `records`: signed envelopes (libp2p RFC 0002) and PeerRecords, also sealed as libp2p's
  (RFC 0003).
- `multiaddr`: ``/ip4|ip6|dns4|dns6/<host>/tcp/<port>/ws|wss[/p2p/<id>]``.
- `wire`: pure codecs and state machines: varints, strict msgpack, multistream-select,
  protobuf and libp2p's messages, binary multiaddrs, Noise XX with its framing, yamux.
- `transport`: WebSocket (on wsproto) and an in-memory network for tests and simulations.
- `connection`: a connection upgraded as libp2p does (multistream-select, Noise, yamux) and its
  streams, each negotiated with multistream-select.
- `peerstore`: addresses, signed records, identify info and RTT of known peers.
- `host`: listen, dial, one connection per peer, limits, handlers, subscriptions to connection
  events; `protocols`: ping (``/ipfs/ping/1.0.0``), identify (``/sdcn/identify/2.0.0``) and
  libp2p's identify (``/ipfs/id/1.0.0``), which send what the Host snapshots and return what
  they learned; the Host stores it.
- `dht`: Kademlia over ``/sdcn/kad/2.0.0``: routing table, lookups, signed record store.
- `adverts`: the cache of providers' signed adverts, queried by model.
- `gossip`: their GossipSub-style spread: `messages`, pure `state` (seen cache, mesh, push
  budget), `config`, and `service`, the only part that awaits.
- `peer`: Peer = Host + DHT + gossip + adverts; the roles plug into it.
- `httpserver`: FastAPI apps on hypercorn's trio worker, in the peer's trio run.
- `backends`: what runs a provider's jobs: `testcard`, `webui`, and `diffusers` (`samplers`,
  `scan`, `backend`).
- `testing`: test support for anyone: in-memory networks of hosts and peers (`network`), a fake
  AUTOMATIC1111 webui (`fakewebui`), a tiny random Stable Diffusion (`tinysd`).
- `cli`: the ``sdcn`` command.
"""

from sdcn_p2p._version import __version__
from sdcn_p2p.adverts import AdvertCache
from sdcn_p2p.connection import Connection, Stream
from sdcn_p2p.dht import Dht, DhtConfig, LookupResult
from sdcn_p2p.errors import (
    ConfigError,
    DialError,
    HandshakeError,
    JobError,
    MessageTooLarge,
    MultiaddrError,
    ProtocolError,
    RecordError,
    ResourceLimitExceeded,
    SdcnError,
    StreamReset,
    UnsupportedProtocol,
)
from sdcn_p2p.gossip import Gossip, GossipConfig
from sdcn_p2p.host import Host, HostConfig, open_host
from sdcn_p2p.identity import Identity, PeerId, load_or_create_identity
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import Peer, PeerConfig, open_peer
from sdcn_p2p.peerstore import PeerInfo, PeerStore
from sdcn_p2p.protocols.identify import IDENTIFY
from sdcn_p2p.protocols.ping import PING
from sdcn_p2p.records import Advert, Envelope, LoraInfo, ModelInfo, PeerRecord
from sdcn_p2p.transport.memory import MemoryNetwork, MemoryTransport
from sdcn_p2p.transport.websocket import WebSocketTransport, open_websocket_transport

__all__ = [
    "IDENTIFY",
    "PING",
    "Advert",
    "AdvertCache",
    "ConfigError",
    "Connection",
    "Dht",
    "DhtConfig",
    "DialError",
    "Envelope",
    "Gossip",
    "GossipConfig",
    "HandshakeError",
    "Host",
    "HostConfig",
    "Identity",
    "JobError",
    "LookupResult",
    "LoraInfo",
    "MemoryNetwork",
    "MemoryTransport",
    "MessageTooLarge",
    "ModelInfo",
    "Multiaddr",
    "MultiaddrError",
    "Peer",
    "PeerConfig",
    "PeerId",
    "PeerInfo",
    "PeerRecord",
    "PeerStore",
    "ProtocolError",
    "RecordError",
    "ResourceLimitExceeded",
    "SdcnError",
    "Stream",
    "StreamReset",
    "UnsupportedProtocol",
    "WebSocketTransport",
    "__version__",
    "load_or_create_identity",
    "open_host",
    "open_peer",
    "open_websocket_transport",
]
