"""``GET /v1/network``: what a bootstrap peer sees of the network."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from sdcn_p2p._version import __version__
from sdcn_p2p.peer import Peer

__all__ = ["NetworkStatus", "create_app"]


class NetworkStatus(BaseModel):
    peer_id: str
    listen_addrs: list[str]
    connected_peers: list[str]
    routing_table_size: int
    adverts_held: int
    dht_records: int
    agent_version: str


def network_status(peer: Peer) -> NetworkStatus:
    host = peer.host
    return NetworkStatus(
        peer_id=str(peer.peer_id),
        listen_addrs=[str(a.with_peer_id(peer.peer_id)) for a in host.listen_addrs],
        connected_peers=[str(p) for p in host.connected_peers],
        routing_table_size=len(peer.dht.routing_table),
        adverts_held=len(peer.adverts),
        dht_records=len(peer.dht.store),
        agent_version=host.config.agent_version,
    )


def create_app(peer: Peer) -> FastAPI:
    """The bootstrap's HTTP API, bound to `peer`."""
    app = FastAPI(title="SDCN bootstrap peer", version=__version__)

    @app.get("/v1/network", response_model=NetworkStatus)
    async def network() -> NetworkStatus:
        """Peer id, listen addresses, connected peers, routing-table size, adverts held."""
        return network_status(peer)

    return app
