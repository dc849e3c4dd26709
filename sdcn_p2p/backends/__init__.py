"""Backends: what runs a provider's jobs.

- this module: the `Backend` protocol, `Capabilities` (what a backend offers, advertised by
  the provider) and `JobOutput` (what a job returns).
- `testcard`: no GPU; a deterministic picture of the job's parameters, for demos and tests.
- `webui`: an AUTOMATIC1111 / Forge / SD.Next server driven over its HTTP API.
- `comfyui`: a ComfyUI server driven over its HTTP and WebSocket API, a workflow per image
  (`samplers`, `workflow`, `parse`, `offer`, `scan`, `events`, `backend`).
- `diffusers`: Stable Diffusion run in this process by Hugging Face diffusers (the optional
  ``diffusers`` extra); `sdcn_p2p.testing.tinysd` builds a tiny random pipeline for its tests
  and benchmarks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sdcn_p2p.errors import JobError, JobErrorCode
from sdcn_p2p.jobs import JobRequest, split_sampler
from sdcn_p2p.records import LoraInfo, ModelInfo, normalize_model_name

__all__ = ["Backend", "Capabilities", "JobOutput", "ResolvedJob", "resolve_or_rescan"]

_T = TypeVar("_T")
_Offer = TypeVar("_Offer")


@dataclass(frozen=True, slots=True)
class ResolvedJob:
    """A job's model, LoRAs and sampler as the backend names them."""

    model: ModelInfo
    loras: tuple[tuple[LoraInfo, float], ...]
    sampler: str
    #: A scheduler name from `Capabilities.schedulers`, when the job's sampler name ends with
    #: one ("DPM++ 2M Karras"); None leaves the choice to the backend.
    scheduler: str | None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can run now. `samplers` are base names, without a scheduler suffix."""

    backend: str
    models: tuple[ModelInfo, ...]
    loras: tuple[LoraInfo, ...]
    samplers: tuple[str, ...]
    vram_total_mb: int = 0
    vram_free_mb: int = 0
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    #: Scheduler names ("karras", "sgm_uniform") for sampler names like "DPM++ 2M Karras";
    #: empty for a webui older than 1.9, whose samplers carry the suffix themselves.
    schedulers: tuple[str, ...] = ()
    #: Iterations per second at 512x512 the backend expects to run, if it knows; the
    #: provider advertises it until it has measured jobs of its own.
    speed: float | None = None

    def resolve(self, job: JobRequest) -> ResolvedJob:
        """Match `job` against what is offered here (names compared case-insensitively).

        Raises JobError("unsupported") naming the model, LoRA, sampler, size or step count
        that is not offered.
        """
        model = _find(self.models, job.model, lambda m: (m.name, m.title))
        if model is None:
            raise JobError(JobErrorCode.UNSUPPORTED, f"model {job.model!r} is not offered here")
        loras = []
        for name, weight in job.loras:
            lora = _find(self.loras, name, lambda lo: (lo.name,))
            if lora is None:
                raise JobError(JobErrorCode.UNSUPPORTED, f"LoRA {name!r} is not offered here")
            loras.append((lora, weight))
        sampler, scheduler = self._resolve_sampler(job.sampler_name)
        if job.width * job.height > self.max_pixels:
            raise JobError(
                JobErrorCode.UNSUPPORTED,
                f"{job.width}x{job.height} is over {self.max_pixels} pixels",
            )
        if job.steps > self.max_steps:
            raise JobError(JobErrorCode.UNSUPPORTED, f"{job.steps} steps is over {self.max_steps}")
        return ResolvedJob(model, tuple(loras), sampler, scheduler)

    def _resolve_sampler(self, name: str) -> tuple[str, str | None]:
        whole = _find(self.samplers, name, lambda s: (s,))
        if whole is not None:
            return whole, None
        base, scheduler = split_sampler(name)
        sampler = _find(self.samplers, base, lambda s: (s,))
        if scheduler is not None and sampler is not None:
            known = _find(self.schedulers, scheduler, lambda s: (s,))
            if known is not None:
                return sampler, known
        raise JobError(JobErrorCode.UNSUPPORTED, f"sampler {name!r} is not offered here")


def _find(items: tuple[_T, ...], wanted: str, names: Callable[[_T], tuple[str, ...]]) -> _T | None:
    key = normalize_model_name(wanted)
    for item in items:
        if any(n and normalize_model_name(n) == key for n in names(item)):
            return item
    return None


async def resolve_or_rescan(
    known: _Offer | None, resolve: Callable[[_Offer], _T], rescan: Callable[[], Awaitable[_Offer]]
) -> _T:
    """`resolve` a job against what a backend is `known` to offer, or, when nothing is known
    yet or `resolve` refuses the job (JobError), against what `rescan` reads now: a model,
    LoRA or sampler may have been added to the backend since it was last read.

    Raises what `resolve` or `rescan` raise.
    """
    if known is not None:
        try:
            return resolve(known)
        except JobError:
            pass  # it may have been added since: look again
    return resolve(await rescan())


@dataclass(frozen=True, slots=True)
class JobOutput:
    """A finished job: PNG images, image i made with seed ``job.seed + i``, and backend extras
    for the result's info (``{"testcard": True}``)."""

    images: list[bytes]
    info: dict[str, Any]


class Backend(Protocol):
    """Something that runs jobs: a webui, diffusers, the test card."""

    #: Short kind name: "webui", "diffusers", "testcard".
    name: str

    async def capabilities(self) -> Capabilities:
        """Ask the backend what it offers now. Raises BackendUnavailable if it cannot answer."""
        ...

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        """Run `job` (its seed concrete, never -1), calling ``progress(step, total)`` on the way.

        Raises JobError "unsupported" for a model, LoRA or sampler not offered, and
        "backend_failed" for anything else that goes wrong. Cancelling stops the work.
        """
        ...
