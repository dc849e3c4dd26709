"""The bootstrap role: a DHT server peer that relays gossip; the network's well-known door.

- `node`: `open_bootstrap` and `run_bootstrap`, what ``sdcn bootstrap`` runs.
- `http`: the optional status API, ``GET /v1/network``.
"""

from bootstrap.node import Bootstrap, open_bootstrap, run_bootstrap

__all__ = ["Bootstrap", "open_bootstrap", "run_bootstrap"]
