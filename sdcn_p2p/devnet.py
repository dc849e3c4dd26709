"""``sdcn devnet``: a whole SDCN network in one process on loopback.

A bootstrap peer, N test-card providers with different models, LoRAs and speeds (the last
one outbound-only, as a provider behind NAT would be), and a gateway serving the HTTP API,
all over real WebSockets on 127.0.0.1. With `demo`, it sends ``examples/params-txt2img.json``
through the gateway's HTTP API, writes the image(s) and stops.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from bootstrap.node import open_bootstrap
from gateway.jobservice import JobsConfig
from gateway.node import Gateway, open_gateway
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.errors import ConfigError
from sdcn_p2p.host import HostConfig
from sdcn_p2p.identity import Identity
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import Peer, PeerConfig, open_peer
from sdcn_p2p.provider import Provider, ProviderConfig, open_provider
from sdcn_p2p.records import AdvertState, normalize_model_name

__all__ = ["DEMO_PARAMS", "Devnet", "demo_params", "open_devnet", "provider_cards", "run_demo"]

log = logging.getLogger(__name__)

LOOPBACK = Multiaddr.parse("/ip4/127.0.0.1/tcp/0/ws")
#: What the devnet's providers offer, in turn: (models, LoRAs, speed in it/s at 512x512).
_CARDS = (
    (("sd-v1-5", "sdxl-base"), ("pixel-art",), 12.0),
    (("sd-v1-5",), ("watercolor", "pixel-art"), 6.0),
    (("dreamshaper-8", "sd-v1-5"), ("watercolor",), 3.0),
)
#: Where ``examples/params-txt2img.json`` is looked for: the working directory, then the
#: source checkout this package runs from.
DEMO_PARAMS = Path("examples") / "params-txt2img.json"


def provider_cards(count: int) -> list[TestcardConfig]:
    """Test cards for `count` providers: models, LoRAs and speeds vary, sd-v1-5 is everywhere."""
    cards = []
    for index in range(count):
        models, loras, speed = _CARDS[index % len(_CARDS)]
        cards.append(TestcardConfig(models=models, loras=loras, speed=speed * (1 + index // 3)))
    return cards


@dataclass
class Devnet:
    bootstrap: Peer
    gateway: Gateway
    providers: list[Provider] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.gateway.urls[0]


@asynccontextmanager
async def open_devnet(
    *, providers: int = 3, http: str = "127.0.0.1:8080", jobs: JobsConfig | None = None
) -> AsyncIterator[Devnet]:
    """Start the devnet; returns once the gateway sees every provider's advert. Its gateway
    keeps jobs as `jobs` says (default: in a temporary dir, deleted on exit)."""
    if not 1 <= providers <= 32:
        raise ConfigError("--providers must be from 1 to 32")
    async with AsyncExitStack() as stack:
        listen = PeerConfig(host=HostConfig(listen=(LOOPBACK,)))
        boot = await stack.enter_async_context(open_bootstrap(Identity.generate(), listen))
        seed = boot.peer.host.listen_addrs[0].with_peer_id(boot.peer.peer_id)
        joined = PeerConfig(host=HostConfig(listen=(LOOPBACK,)), bootstrap=(seed,))
        gateway_peer = await stack.enter_async_context(open_peer(Identity.generate(), joined))
        gateway = await stack.enter_async_context(
            open_gateway(
                gateway_peer, http=http, default_model="sd-v1-5", jobs=jobs or JobsConfig()
            )
        )
        devnet = Devnet(boot.peer, gateway)
        for index, card in enumerate(provider_cards(providers)):
            # The last provider is outbound-only, as one behind NAT would be.
            outbound_only = providers > 1 and index == providers - 1
            config = PeerConfig(
                host=HostConfig(listen=() if outbound_only else (LOOPBACK,)),
                bootstrap=(seed,),
            )
            peer = await stack.enter_async_context(open_peer(Identity.generate(), config))
            provider = await stack.enter_async_context(
                open_provider(peer, TestcardBackend(card), ProviderConfig(slots=1, max_queue=8))
            )
            devnet.providers.append(provider)
        await _wait_for_providers(gateway_peer, [p.peer.peer_id for p in devnet.providers])
        yield devnet


async def _wait_for_providers(peer: Peer, providers: list) -> None:  # type: ignore[type-arg]
    arrived = trio.lowlevel.ParkingLot()
    with peer.adverts.subscribe(lambda advert: arrived.unpark_all()), trio.fail_after(30):
        while any(
            (advert := peer.adverts.get(p)) is None or advert.state is not AdvertState.ONLINE
            for p in providers
        ):
            await arrived.park()


def demo_params() -> dict[str, Any]:
    """The parameters of ``examples/params-txt2img.json``."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = base / DEMO_PARAMS
        if path.is_file():
            return json.loads(path.read_text())
    raise ConfigError(f"cannot find {DEMO_PARAMS} (run from the source checkout)")


async def run_demo(url: str, out: Path, params: dict[str, Any]) -> list[Path]:
    """POST `params` to the gateway's /txt2img; write OUT.png, OUT-1.png, ...; return them."""
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(f"{url}/txt2img", json=params)
    body = response.json()
    if response.status_code != 200:
        raise ConfigError(f"the gateway answered {response.status_code}: {body.get('msg')}")
    paths = [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, 99)]
    written = []
    for path, image in zip(paths, body["images"], strict=False):
        path.write_bytes(base64.b64decode(image))
        written.append(path)
    info = body["info"]
    log.info(
        "demo: %s by %s (model %s, seed %s, %s ms, %s attempt(s))",
        ", ".join(map(str, written)),
        info.get("provider"),
        info.get("model"),
        info.get("seed"),
        info.get("run_ms"),
        info.get("attempts"),
    )
    return written


def describe(devnet: Devnet) -> str:
    """What to tell the user: the gateway URL and commands to try."""
    url = devnet.url
    models = sorted(
        {normalize_model_name(m.name) for p in devnet.providers for m in p.capabilities.models}
        if all(p.capabilities for p in devnet.providers)
        else set()
    )
    return "\n".join(
        [
            f"SDCN devnet: {len(devnet.providers)} test-card providers, gateway at {url}",
            f"  models: {', '.join(models)}",
            f"open {url}/ in a browser to generate images, {url}/network to watch the network",
            "or try:",
            f"  curl -s {url}/v1/models",
            f"  python examples/sdcn_run.py --gateway {url} txt2img "
            "examples/params-txt2img.json out.png",
            f"  open {url}/docs",
            "Ctrl-C stops it.",
        ]
    )
