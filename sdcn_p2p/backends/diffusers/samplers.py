"""A1111 sampler and scheduler names, and the diffusers schedulers they stand for. Pure.

A job's sampler is an A1111 name mapped to a diffusers scheduler (`SAMPLERS`), with an optional
scheduler suffix ("DPM++ 2M Karras") that adds settings (`SCHEDULER_TYPES`); `scheduler_for`
combines them and refuses what is not offered.
"""

from __future__ import annotations

from typing import Any

from sdcn_p2p.errors import JobError, JobErrorCode

__all__ = ["SAMPLERS", "SCHEDULER_TYPES", "SEEDED_SCHEDULERS", "scheduler_for"]

#: A1111 sampler names and the diffusers scheduler class (with settings) that each stands for.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
}
#: Scheduler names (as in "DPM++ 2M Karras") and the scheduler settings each stands for.
SCHEDULER_TYPES: dict[str, dict[str, Any]] = {
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}
# The samplers whose schedulers take a sigma schedule (karras, exponential).
_SIGMA_SAMPLERS = frozenset(
    {"Euler", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "DPM2", "DPM2 a", "LMS", "Heun", "UniPC"}
)
#: Schedulers that draw their own noise from a seed rather than from the job's generators.
SEEDED_SCHEDULERS = frozenset({"DPMSolverSDEScheduler"})


def scheduler_for(sampler: str, scheduler: str | None) -> tuple[str, dict[str, Any]]:
    """The diffusers scheduler class name and settings for an A1111 sampler and scheduler name.

    Raises JobError("unsupported") for a sampler or combination not in `SAMPLERS`.
    """
    try:
        class_name, settings = SAMPLERS[sampler]
    except KeyError:
        raise JobError(
            JobErrorCode.UNSUPPORTED, f"sampler {sampler!r} is not offered here"
        ) from None
    settings = dict(settings)
    if scheduler is not None:
        extra = SCHEDULER_TYPES.get(scheduler)
        sigmas = scheduler in ("karras", "exponential")
        if extra is None or (sigmas and sampler not in _SIGMA_SAMPLERS):
            raise JobError(
                "unsupported", f"sampler {sampler!r} with scheduler {scheduler!r} is not offered"
            )
        settings.update(extra)
    return class_name, settings
