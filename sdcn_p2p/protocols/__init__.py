"""Protocols every Host serves.

- `ping`: ``/ipfs/ping/1.0.0`` (libp2p's), a 32-byte echo for liveness and round-trip time.
- `identify`: ``/sdcn/identify/2.0.0``, an SDCN peer's signed record, addresses, protocols,
  roles and extensions, exchanged on every connection we dial.
- `libp2p_identify`: ``/ipfs/id/1.0.0``, libp2p's identify, which any libp2p peer asks us, and
  we ask a peer that does not speak ours.
"""
