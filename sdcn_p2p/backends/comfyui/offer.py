"""What a ComfyUI offers, under the names we advertise, and a job in its names (pure).

Capabilities come from ``/object_info/CheckpointLoaderSimple`` (checkpoints),
``/object_info/LoraLoader`` (LoRAs), ``/object_info/KSampler`` (sampler and scheduler names,
advertised under A1111's: see `samplers`) and ``/system_stats`` (VRAM of the first device). A
model or LoRA is advertised by its file name without folder or extension
(``SDXL/juggernaut.safetensors`` is "juggernaut"; the first of two with one name wins), with
the hash and architecture `scan` found for its file, if any. `Offer.plan` turns a job back
into ComfyUI's names, refusing with "unsupported" anything ComfyUI lacks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from sdcn_p2p.backends import Capabilities
from sdcn_p2p.backends.comfyui.parse import ComfyError
from sdcn_p2p.backends.comfyui.samplers import SAMPLERS, SCHEDULERS, scheduler_for
from sdcn_p2p.backends.comfyui.workflow import Plan
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.records import Advert, LoraInfo, ModelInfo

__all__ = ["Offer", "combo_choices", "make_offer", "parse_devices"]

log = logging.getLogger(__name__)

_MIB = 2**20
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


@dataclass(frozen=True, slots=True)
class Offer:
    """What ComfyUI offers: the advertised capabilities and the files behind their names."""

    capabilities: Capabilities
    checkpoints: dict[str, str]  # advertised model name -> ComfyUI ckpt_name
    loras: dict[str, str]  # advertised LoRA name -> ComfyUI lora_name
    samplers: frozenset[str]  # ComfyUI's
    schedulers: frozenset[str]  # ComfyUI's

    def plan(self, job: JobRequest) -> Plan:
        """Raises JobError("unsupported") for what is not offered."""
        resolved = self.capabilities.resolve(job)
        return Plan(
            checkpoint=self.checkpoints[resolved.model.name],
            loras=tuple((self.loras[lora.name], weight) for lora, weight in resolved.loras),
            sampler=SAMPLERS[resolved.sampler],
            scheduler=scheduler_for(resolved.sampler, resolved.scheduler, self.schedulers),
        )


def make_offer(
    backend: str,
    *,
    checkpoints: list[str],
    loras: list[str],
    samplers: frozenset[str],
    schedulers: frozenset[str],
    vram: tuple[int, int],
    files: dict[tuple[str, str], dict[str, str]],
) -> Offer:
    """The offer of a ComfyUI with these checkpoint and LoRA files, KSampler samplers and
    schedulers, (total, free) VRAM in MiB, and `files`: {(folder, ComfyUI name): {"hash",
    "architecture"}} of the files `scan` could read."""
    models = _named(checkpoints, "checkpoint", Advert.MAX_MODELS)
    lora_names = _named(loras, "LoRA", Advert.MAX_LORAS)
    capabilities = Capabilities(
        backend=backend,
        models=tuple(
            _model_info(name, file, files.get(("checkpoints", file), {}))
            for name, file in models.items()
        ),
        loras=tuple(
            LoraInfo(name, files.get(("loras", file), {}).get("hash", ""))
            for name, file in lora_names.items()
        ),
        samplers=tuple(a1111 for a1111, comfy in SAMPLERS.items() if comfy in samplers),
        schedulers=tuple(a1111 for a1111, comfy in SCHEDULERS.items() if comfy in schedulers),
        vram_total_mb=vram[0],
        vram_free_mb=vram[1],
    )
    return Offer(capabilities, models, lora_names, samplers, schedulers)


def combo_choices(info: dict[str, Any], node: str, name: str) -> list[str]:
    """The choices of input `name` of `node`, whose ``/object_info`` is `info`:
    ``[[choice, ...], {...}]`` or ``["COMBO", {"options"}]``. Raises ComfyError if none."""
    inputs = info.get("input")
    spec = None
    if isinstance(inputs, dict):
        for group in ("required", "optional"):
            section = inputs.get(group)
            if isinstance(section, dict) and name in section:
                spec = section[name]
                break
    found = None
    if isinstance(spec, list) and spec:
        if isinstance(spec[0], list):
            found = spec[0]
        elif spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
            found = spec[1].get("options")
    if not isinstance(found, list) or not all(isinstance(c, str) for c in found):
        raise ComfyError(f"/object_info/{node} has no list of {name}")
    return found


def parse_devices(stats: Any) -> tuple[int, int]:
    """(total, free) VRAM in MiB of the first device of /system_stats; (0, 0) for a CPU."""
    devices = stats.get("devices") if isinstance(stats, dict) else None
    if not isinstance(devices, list) or not devices or not isinstance(devices[0], dict):
        return 0, 0
    device = devices[0]
    total, free = device.get("vram_total"), device.get("vram_free")
    if device.get("type") == "cpu" or not all(type(v) is int and v >= 0 for v in (total, free)):
        return 0, 0
    return min(total // _MIB, 10**7), min(free // _MIB, 10**7)


def _stem(file: str) -> str:
    """The advertised name of a ComfyUI file name: no folder, no model extension."""
    base = PurePosixPath(file.replace("\\", "/")).name
    for suffix in _MODEL_SUFFIXES:
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def _named(files: list[str], what: str, cap: int) -> dict[str, str]:
    """{advertised name: ComfyUI name}, the first of each name, at most `cap`."""
    named: dict[str, str] = {}
    seen: set[str] = set()
    for file in files:
        name = _stem(file)
        if not name.strip() or len(name) > 256 or len(file) > 512:
            log.warning("not advertising %s %.80r: its name is too long or empty", what, file)
            continue
        if name.casefold() in seen:
            log.warning("not advertising %s %r: another is named %r", what, file, name)
            continue
        seen.add(name.casefold())
        named[name] = file
    if len(named) > cap:
        log.warning("ComfyUI has %d %ss; advertising the first %d", len(named), what, cap)
    return dict(list(named.items())[:cap])


def _model_info(name: str, file: str, info: dict[str, str]) -> ModelInfo:
    digest = info.get("hash", "")
    title = f"{file} [{digest}]" if digest else file
    return ModelInfo(name, title, digest, info.get("architecture", ""))
