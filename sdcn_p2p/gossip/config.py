"""`GossipConfig`: the mesh degree, timers and limits of advert gossip."""

from __future__ import annotations

from dataclasses import dataclass

from sdcn_p2p.errors import ConfigError

__all__ = ["MIN_MESSAGE_SIZE", "GossipConfig"]

#: The smallest `max_message_size`: room for one advert of the largest size (64 KiB) and more.
MIN_MESSAGE_SIZE = 128 * 1024


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Mesh degree, timers (seconds) and limits of advert gossip."""

    degree: int = 4
    degree_low: int = 3
    #: Room above `degree` for grafts from peers behind NAT, who can graft only reachable
    #: peers: at 5, 15 % of a network with 40 % of its peers behind NAT were stuck below
    #: `degree_low` (benchmarks/netsim.py).
    degree_high: int = 8
    heartbeat: float = 1.0
    anti_entropy_interval: float = 30.0
    seen_size: int = 100_000
    max_message_size: int = 4 * 1024 * 1024
    #: Limit on each exchange: a push, a GRAFT, each message of a digest exchange.
    rpc_timeout: float = 5.0
    #: Adverts waiting to be pushed to one mesh peer; more are dropped (anti-entropy heals).
    queue_size: int = 256
    #: How long a peer that pruned us, refused us, or failed a push stays out of the mesh.
    prune_backoff: float = 60.0
    max_concurrent_syncs: int = 8
    #: Adverts one peer may push to us per second, and at once; digest exchanges we ask for
    #: are not counted. A mesh peer forwards nearly every advert: 1,000/s is a network of
    #: 60,000 providers each republishing every minute.
    push_rate: float = 1000.0
    push_burst: int = 1000

    def __post_init__(self) -> None:
        if self.degree_low < 1:
            raise ConfigError(f"gossip degree_low must be at least 1, not {self.degree_low}")
        if self.degree < self.degree_low:
            raise ConfigError(
                f"gossip degree ({self.degree}) must be at least degree_low ({self.degree_low})"
            )
        if self.degree_high < self.degree:
            raise ConfigError(
                f"gossip degree_high ({self.degree_high}) must be at least degree ({self.degree})"
            )
        for name in ("heartbeat", "anti_entropy_interval", "rpc_timeout", "push_rate"):
            value = getattr(self, name)
            if not value > 0:  # NaN too
                raise ConfigError(f"gossip {name} must be positive, not {value}")
        if not self.prune_backoff >= 0:
            raise ConfigError(f"gossip prune_backoff must not be negative: {self.prune_backoff}")
        for name in ("seen_size", "queue_size", "max_concurrent_syncs", "push_burst"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"gossip {name} must be at least 1, not {value}")
        if self.max_message_size < MIN_MESSAGE_SIZE:
            raise ConfigError(
                f"gossip max_message_size must be at least {MIN_MESSAGE_SIZE} to hold a 64 KiB "
                f"advert, not {self.max_message_size}"
            )
