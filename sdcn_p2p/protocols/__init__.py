"""Protocols every Host serves.

- `ping`: ``/sdcn/ping/1.0.0``, a 32-byte echo for liveness and round-trip time.
- `identify`: ``/sdcn/identify/1.0.0``, a peer's signed record, addresses, protocols and roles.
"""
