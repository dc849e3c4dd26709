"""SDCN p2p: a peer-to-peer network for sharing Stable Diffusion compute.

Layers, bottom up (each module imports only those above it in this list):

- `errors`: the one exception tree, rooted at SdcnError; `JobErrorCode`.
- `logs`: text or JSON log lines with the fields of the job they are about (`log_context`).
- `httpserver`: ASGI apps (FastAPI) on hypercorn's trio worker, in the peer's trio run.
- `metrics`: a Prometheus registry per peer (`Peer.metrics`) and the server of ``/metrics``.
- `identity`: Ed25519 keys and libp2p-compatible PeerIds; key files.
- `records`: signed envelopes (libp2p RFC 0002), PeerRecords (also sealed as libp2p's, RFC 0003)
  and Adverts (with their `AdvertState`, `Role` and `Reachability`).
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
- `jobs`: the job schema (`jobs.schema`, `jobs.images`: no I/O, what a backend imports) and
  ``/sdcn/job/2.0.0`` with its client (`jobs.protocol`).
- `dht`: Kademlia over ``/sdcn/kad/2.0.0``: routing table, lookups, signed record store.
- `adverts`: the cache of providers' signed adverts, queried by model.
- `gossip`: their GossipSub-style spread: `messages`, pure `state` (seen cache, mesh, push
  budget), `config`, and `service`, the only part that awaits.
- `peer`: Peer = Host + DHT + gossip + adverts; the roles plug into it.
- `backends`: what runs a provider's jobs: `testcard`, `webui`, `comfyui` (`samplers`,
  `workflow`, `parse`, `offer`: pure; `scan`, `events`, `backend`) and `diffusers` (`samplers`,
  `scan`, `backend`); `provider`: the provider role, running jobs on a backend.
- `devnet`: a whole network on loopback (``sdcn devnet``).
- `testing`: test support for anyone: in-memory networks of hosts and peers (`network`), a fake
  AUTOMATIC1111 webui (`fakewebui`), a fake ComfyUI (`fakecomfyui`: `nodes`, `validator`,
  `execution`, `fake`, `server`), a tiny random Stable Diffusion (`tinysd`).
- `cli`: the ``sdcn`` command.
"""

import importlib as _importlib

from sdcn_p2p._version import __version__ as __version__

# Public name -> the module defining it. Loaded on first use (PEP 562), so that importing one
# module (the job schema, say) does not import the whole network stack.
_EXPORTS = {
    "sdcn_p2p.adverts": ("AdvertCache",),
    "sdcn_p2p.connection": ("Connection", "Stream"),
    "sdcn_p2p.dht": ("Dht", "DhtConfig", "LookupResult"),
    "sdcn_p2p.errors": (
        "ConfigError",
        "DialError",
        "HandshakeError",
        "JobError",
        "JobErrorCode",
        "MessageTooLarge",
        "MultiaddrError",
        "ProtocolError",
        "RecordError",
        "ResourceLimitExceeded",
        "SdcnError",
        "StreamReset",
        "UnsupportedProtocol",
    ),
    "sdcn_p2p.gossip": ("Gossip", "GossipConfig"),
    "sdcn_p2p.host": ("Host", "HostConfig", "open_host"),
    "sdcn_p2p.identity": ("Identity", "PeerId", "load_or_create_identity"),
    "sdcn_p2p.multiaddr": ("Multiaddr",),
    "sdcn_p2p.peer": ("Peer", "PeerConfig", "open_peer"),
    "sdcn_p2p.peerstore": ("PeerInfo", "PeerStore"),
    "sdcn_p2p.protocols.identify": ("IDENTIFY",),
    "sdcn_p2p.protocols.ping": ("PING",),
    "sdcn_p2p.records": (
        "Advert",
        "AdvertState",
        "Envelope",
        "LoraInfo",
        "ModelInfo",
        "PeerRecord",
        "Reachability",
        "Role",
    ),
    "sdcn_p2p.transport.memory": ("MemoryNetwork", "MemoryTransport"),
    "sdcn_p2p.transport.websocket": ("WebSocketTransport", "open_websocket_transport"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_MODULE_OF, "__version__"])


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
