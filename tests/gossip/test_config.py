"""GossipConfig refuses bad values on construction, naming the field."""

from __future__ import annotations

import pytest

from sdcn_p2p.errors import ConfigError
from sdcn_p2p.gossip.config import GossipConfig


@pytest.mark.parametrize(
    "changes",
    [
        {"degree_low": 0},
        {"degree_low": 5},
        {"degree_high": 3},
        {"heartbeat": 0},
        {"rpc_timeout": -1},
        {"queue_size": 0},
        {"seen_size": 0},
        {"max_message_size": 1000},
        {"prune_backoff": -1},
    ],
)
def test_bad_config_is_refused(changes: dict) -> None:
    with pytest.raises(ConfigError):
        GossipConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"degree_low": 0}, "degree_low"),
        ({"degree": 2}, "degree"),
        ({"degree_high": 3}, "degree_high"),
        ({"heartbeat": 0}, "heartbeat"),
        ({"anti_entropy_interval": float("nan")}, "anti_entropy_interval"),
        ({"rpc_timeout": -1}, "rpc_timeout"),
        ({"prune_backoff": -1}, "prune_backoff"),
        ({"seen_size": 0}, "seen_size"),
        ({"queue_size": 0}, "queue_size"),
        ({"max_concurrent_syncs": 0}, "max_concurrent_syncs"),
        ({"max_message_size": 1000}, "max_message_size"),
        ({"push_rate": 0}, "push_rate"),
        ({"push_burst": 0}, "push_burst"),
    ],
)
def test_a_bad_config_error_names_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        GossipConfig(**changes)
