"""The catalog: what the network offers, as this gateway's adverts show it (no I/O).

Both HTTP APIs serve it: the SDCN API's ``GET /v1/models`` and ``/v1/providers``, and the
A1111 API's ``sd-models``, ``loras``, ``samplers`` and ``schedulers`` in the webui's shapes.
The functions are pure, over any adverts; `Catalog` binds them to a gateway's AdvertCache,
the RTTs its host measured, its directory's load and bans, and its wall clock.

Lists name what online providers offer (`Advert.is_online_provider`), once each, as the first
provider to offer it spells it. A model is found (`find_model`) among providers in any state,
as it is for telling 404 from 503.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from gateway.directory import ProviderDirectory
from gateway.trust import TrustLedger
from sdcn_p2p.adverts import AdvertCache
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs import SCHEDULERS
from sdcn_p2p.records import Advert, ModelInfo, Role, normalize_model_name

__all__ = [
    "Catalog",
    "find_model",
    "lora_list",
    "model_title",
    "sampler_list",
    "scheduler_list",
    "sd_model_list",
]

# " [6ce0161689]" at the end of a webui checkpoint title.
_TITLE_HASH = re.compile(r"\s*\[(?P<hash>[0-9a-fA-F]+)\]\s*$")
_EXTENSION = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|gguf|sft)$", re.IGNORECASE)


class Catalog:
    """The catalog of one gateway: the views the HTTP APIs serve, from what it knows now."""

    def __init__(
        self,
        adverts: AdvertCache,
        directory: ProviderDirectory,
        *,
        rtt: Callable[[PeerId], float | None],
        wall_clock: Callable[[], float],
        trust: TrustLedger | None = None,
    ) -> None:
        """`rtt(peer)`: the measured round trip in seconds, None if unknown;
        `wall_clock()`: Unix seconds, to tell when adverts and bans end; `trust`: the
        providers' records of spot checks, and exclusions.
        """
        self.adverts = adverts
        self._directory = directory
        self._rtt = rtt
        self._wall_clock = wall_clock
        self._trust = trust

    def online_providers(self) -> list[Advert]:
        """The adverts of providers that take jobs now."""
        return [advert for advert in self.adverts if advert.is_online_provider]

    def find_model(self, name: str) -> ModelInfo | None:
        """See `find_model`."""
        return find_model(name, self.adverts)

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: each model online providers offer (name, title, architecture),
        how many offer it, and the LoRAs at least one of them offers; sorted by name.
        """
        first: dict[str, ModelInfo] = {}  # as the first provider to offer it describes it
        for advert in self.online_providers():
            for model in advert.models:
                first.setdefault(normalize_model_name(model.name), model)
        entries = []
        for key, summary in sorted(self.adverts.models().items()):
            model = first.get(key, ModelInfo(summary.name))
            entries.append(
                {
                    "name": summary.name,
                    "title": model.title or summary.name,
                    "architecture": model.architecture,
                    "providers": summary.providers,
                    "loras": list(summary.loras),
                }
            )
        return entries

    def providers(self) -> list[dict[str, Any]]:
        """``GET /v1/providers``: every provider's advert (any state), with the RTT measured
        to it (ms), this gateway's jobs in flight there, the jobs it sent there and how many
        completed, the speed it observed, whether the provider is proven, the end of its ban
        if banned, and its record of spot checks: checked jobs and strikes in its window,
        and, if it is excluded, until when and why.
        """
        now = self._wall_clock()
        return [self._provider(a, now) for a in self.adverts if Role.PROVIDER in a.roles]

    def _provider(self, advert: Advert, now: float) -> dict[str, Any]:
        peer = advert.peer_id
        rtt = self._rtt(peer)
        directory = self._directory
        sent, done = directory.jobs_sent(peer)
        return {
            "peer_id": str(peer),
            "state": str(advert.state),
            "roles": [str(role) for role in advert.roles],
            "reachability": str(advert.reachability),
            "backend": advert.backend,
            "models": [
                {"name": m.name, "title": m.title, "hash": m.hash, "architecture": m.architecture}
                for m in advert.models
            ],
            "loras": [lora.name for lora in advert.loras],
            "samplers": list(advert.samplers),
            "slots": advert.slots,
            "queue": advert.queue,
            "max_queue": advert.max_queue,
            "speed": advert.speed,
            "max_pixels": advert.max_pixels,
            "max_steps": advert.max_steps,
            "vram_total_mb": advert.vram_total_mb,
            "vram_free_mb": advert.vram_free_mb,
            "addrs": [str(addr) for addr in advert.addrs],
            "expires_in": max(advert.expires_at - now, 0.0),
            "rtt_ms": None if rtt is None else rtt * 1000,
            "in_flight": directory.in_flight(peer),
            "jobs_sent": sent,
            "jobs_done": done,
            "observed_speed": directory.observed_speed(peer),
            "proven": directory.is_proven(peer),
            "banned_until": directory.banned_until(peer)
            if directory.is_banned(peer, now)
            else None,
            **self._standing(peer, now),
        }

    def _standing(self, peer: PeerId, now: float) -> dict[str, Any]:
        if self._trust is None:
            return {"checks": 0, "strikes": 0, "excluded_until": None, "excluded_reason": None}
        standing = self._trust.standing(peer, now)
        exclusion = standing.exclusion
        return {
            "checks": standing.checks,
            "strikes": standing.strikes,
            "excluded_until": None if exclusion is None else exclusion.until,
            "excluded_reason": None if exclusion is None else exclusion.reason,
        }

    def sd_models(self) -> list[dict[str, Any]]:
        return sd_model_list(self.adverts)

    def loras(self) -> list[dict[str, Any]]:
        return lora_list(self.adverts)

    def samplers(self) -> list[dict[str, Any]]:
        return sampler_list(self.adverts)


def find_model(name: str, adverts: Iterable[Advert]) -> ModelInfo | None:
    """The advertised model `name` means: a model name, a webui title (``"x.safetensors
    [hash]"``, with or without the hash), a file name, or a short hash; None if none matches.

    Adverts of providers in any state count, as they do for 404 versus 503.
    """
    models = [m for a in adverts if Role.PROVIDER in a.roles for m in a.models]
    wanted = normalize_model_name(name)
    bare = normalize_model_name(_TITLE_HASH.sub("", name))
    stem = normalize_model_name(_EXTENSION.sub("", bare))
    tagged = _TITLE_HASH.search(name)
    tries: list[Callable[[ModelInfo], bool]] = [
        lambda m: normalize_model_name(m.name) == wanted,
        lambda m: bool(m.title) and normalize_model_name(m.title) == wanted,
        lambda m: normalize_model_name(_TITLE_HASH.sub("", m.title or m.name)) == bare,
        lambda m: normalize_model_name(m.name) == stem,
        lambda m: bool(m.hash) and m.hash.lower() == (tagged["hash"] if tagged else name).lower(),
    ]
    for matches in tries:
        for model in models:
            if matches(model):
                return model
    return None


def model_title(model: ModelInfo) -> str:
    """The model's webui title (``"x.safetensors [hash]"``), or its name if it has none."""
    return model.title or model.name


def _online(adverts: Iterable[Advert]) -> Iterable[Advert]:
    return (advert for advert in adverts if advert.is_online_provider)


def sd_model_list(adverts: Iterable[Advert]) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/sd-models``: each model online providers offer, once."""
    seen: dict[str, ModelInfo] = {}
    for advert in _online(adverts):
        for model in advert.models:
            seen.setdefault(normalize_model_name(model.name), model)
    return [
        {
            "title": model_title(model),
            "model_name": model.name,
            "hash": model.hash or None,
            "sha256": None,
            "filename": _TITLE_HASH.sub("", model_title(model)),
            "config": None,
        }
        for model in seen.values()
    ]


def lora_list(adverts: Iterable[Advert]) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/loras``: each LoRA online providers offer, once."""
    names: dict[str, str] = {}
    for advert in _online(adverts):
        for lora in advert.loras:
            names.setdefault(normalize_model_name(lora.name), lora.name)
    return [{"name": n, "alias": n, "path": n, "metadata": {}} for n in names.values()]


def sampler_list(adverts: Iterable[Advert]) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: each sampler online providers offer, once."""
    names: dict[str, str] = {}
    for advert in _online(adverts):
        for sampler in advert.samplers:
            names.setdefault(normalize_model_name(sampler), sampler)
    return [{"name": n, "aliases": [], "options": {}} for n in names.values()]


# name: (default_rho, need_inner_model, aliases), as the webui 1.10 lists them.
_SCHEDULER_DETAILS: dict[str, tuple[float, bool, list[str] | None]] = {
    "uniform": (-1.0, True, None),
    "karras": (7.0, False, None),
    "exponential": (-1.0, False, None),
    "polyexponential": (1.0, False, None),
    "sgm_uniform": (-1.0, True, ["SGMUniform"]),
    "kl_optimal": (-1.0, False, None),
    "align_your_steps": (-1.0, False, None),
    "simple": (-1.0, True, None),
    "normal": (-1.0, True, None),
    "ddim": (-1.0, True, None),
    "beta": (-1.0, True, None),
}


def scheduler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers``: "Automatic" (the sampler's own) and each scheduler a
    sampler name may end with.
    """
    entries = [
        {
            "name": "automatic",
            "label": "Automatic",
            "aliases": None,
            "default_rho": -1.0,
            "need_inner_model": False,
        }
    ]
    for label, name in SCHEDULERS.items():
        rho, inner, aliases = _SCHEDULER_DETAILS.get(name, (-1.0, False, None))
        entries.append(
            {
                "name": name,
                "label": label,
                "aliases": aliases,
                "default_rho": rho,
                "need_inner_model": inner,
            }
        )
    return entries
