"""Every `*Config` refuses a bad value where it is made, with a ConfigError naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from sdcn_p2p.backends.comfyui import ComfyuiConfig
from sdcn_p2p.backends.webui import WebuiConfig
from sdcn_p2p.dht.service import DhtConfig
from sdcn_p2p.errors import ConfigError
from sdcn_p2p.host import HostConfig
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import PeerConfig
from sdcn_p2p.provider import ProviderConfig

BAD = [
    (HostConfig, {"listen": ("/ip4/127.0.0.1/tcp/0/ws",)}, "listen"),
    (HostConfig, {"announce": [Multiaddr.parse("/ip4/127.0.0.1/tcp/1/ws")]}, "announce"),
    (HostConfig, {"max_connections": 0}, "max_connections"),
    (HostConfig, {"max_inbound_streams": 1.5}, "max_inbound_streams"),
    (HostConfig, {"max_pending_inbound": True}, "max_pending_inbound"),
    (HostConfig, {"dial_timeout": 0}, "dial_timeout"),
    (HostConfig, {"idle_timeout": float("inf")}, "idle_timeout"),
    (HostConfig, {"handshake_timeout": -1.0}, "handshake_timeout"),
    (HostConfig, {"roles": ("provider", "")}, "roles"),
    (HostConfig, {"agent_version": "x" * 129}, "agent_version"),
    (PeerConfig, {"bootstrap": ("/ip4/1.2.3.4/tcp/1/ws",)}, "bootstrap"),
    (PeerConfig, {"bootstrap_backoff": (5.0, 1.0)}, "bootstrap_backoff"),
    (PeerConfig, {"bootstrap_backoff": (0.0, 1.0)}, "bootstrap_backoff"),
    (DhtConfig, {"k": 0}, "k"),
    (DhtConfig, {"alpha": -3}, "alpha"),
    (DhtConfig, {"rpc_timeout": 0.0}, "rpc_timeout"),
    (DhtConfig, {"max_records": 0}, "max_records"),
    (DhtConfig, {"server": "yes"}, "server"),
    (DhtConfig, {"max_per_sender": 0}, "max_per_sender"),
    (ProviderConfig, {"slots": 0}, "slots"),
    (ProviderConfig, {"max_queue": -1}, "max_queue"),
    (ProviderConfig, {"advert_interval": 0}, "advert_interval"),
    (ProviderConfig, {"advert_ttl": 30.0}, "advert_ttl"),
    (ProviderConfig, {"initial_speed": -2.0}, "initial_speed"),
    (ProviderConfig, {"roles": ["provider"]}, "roles"),
    (WebuiConfig, {"progress_interval": 0}, "progress_interval"),
    (WebuiConfig, {"max_response_bytes": 0}, "max_response_bytes"),
    (ComfyuiConfig, {"timeout": 0}, "timeout"),
    (ComfyuiConfig, {"poll_interval": -1.0}, "poll_interval"),
    (ComfyuiConfig, {"quiet_poll_interval": float("nan")}, "quiet_poll_interval"),
    (ComfyuiConfig, {"max_response_bytes": 0}, "max_response_bytes"),
]


@pytest.mark.parametrize(("config", "kwargs", "field"), BAD)
def test_a_bad_value_is_a_config_error_naming_the_field(
    config: type, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{config.__name__}\.{field} "):
        config(**kwargs)


@pytest.mark.parametrize(
    "config", [HostConfig, PeerConfig, DhtConfig, ProviderConfig, WebuiConfig, ComfyuiConfig]
)
def test_the_defaults_are_valid(config: type) -> None:
    config()
