"""A1111 sampler and scheduler names and the ComfyUI KSampler names they stand for (pure).

Samplers are advertised under A1111's names (`SAMPLERS`: "Euler a" is ComfyUI's
``euler_ancestral``), those whose ComfyUI sampler the server has; scheduler suffixes map to
ComfyUI schedulers (`SCHEDULERS`: "DDIM" is ``ddim_uniform``). A sampler name without one gets
the scheduler A1111's "Automatic" picks for it (`AUTOMATIC_SCHEDULERS`, else ``normal``).
"""

from __future__ import annotations

__all__ = [
    "AUTOMATIC_SCHEDULERS",
    "DEFAULT_SCHEDULER",
    "SAMPLERS",
    "SCHEDULERS",
    "scheduler_for",
]

#: A1111 sampler names and the ComfyUI sampler each is (``comfy.samplers.KSampler.SAMPLERS``).
#: A1111's Restart, DDIM CFG++ and PLMS have no ComfyUI twin.
SAMPLERS: dict[str, str] = {
    "Euler a": "euler_ancestral",
    "Euler": "euler",
    "LMS": "lms",
    "Heun": "heun",
    "DPM2": "dpm_2",
    "DPM2 a": "dpm_2_ancestral",
    "DPM++ 2S a": "dpmpp_2s_ancestral",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun",
    "DPM++ 3M SDE": "dpmpp_3m_sde",
    "DPM fast": "dpm_fast",
    "DPM adaptive": "dpm_adaptive",
    "DDIM": "ddim",
    "UniPC": "uni_pc",
    "LCM": "lcm",
}
#: A1111 scheduler names (as `split_sampler` gives them) and the ComfyUI scheduler each is
#: (``comfy.samplers.KSampler.SCHEDULERS``). A1111's uniform, polyexponential and
#: align_your_steps are separate nodes in ComfyUI, not KSampler schedulers.
SCHEDULERS: dict[str, str] = {
    "karras": "karras",
    "exponential": "exponential",
    "sgm_uniform": "sgm_uniform",
    "simple": "simple",
    "normal": "normal",
    "ddim": "ddim_uniform",
    "beta": "beta",
    "kl_optimal": "kl_optimal",
}
#: The ComfyUI scheduler for a sampler named without one: the one A1111 1.10's "Automatic"
#: picks for it; ``normal`` (A1111's default discretization) for the others.
AUTOMATIC_SCHEDULERS: dict[str, str] = {
    "DPM++ 2M": "karras",
    "DPM++ SDE": "karras",
    "DPM++ 2S a": "karras",
    "DPM++ 2M SDE": "exponential",
    "DPM++ 2M SDE Heun": "exponential",
    "DPM++ 3M SDE": "exponential",
    "DDIM": "ddim_uniform",
}
DEFAULT_SCHEDULER = "normal"


def scheduler_for(sampler: str, scheduler: str | None, offered: frozenset[str]) -> str:
    """The ComfyUI scheduler of A1111 `sampler` named with `scheduler` (a `SCHEDULERS` key, as
    `Capabilities.resolve` gives it) or without one (None), among the `offered` ones."""
    if scheduler is not None:
        return SCHEDULERS[scheduler]
    automatic = AUTOMATIC_SCHEDULERS.get(sampler, DEFAULT_SCHEDULER)
    return automatic if automatic in offered else DEFAULT_SCHEDULER
