import pytest

from sdcn_p2p.backends import Capabilities
from sdcn_p2p.errors import JobError
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.records import LoraInfo, ModelInfo

SD15 = ModelInfo("sd-v1-5", "sd-v1-5.safetensors [6ce0161689]", "6ce0161689")
CAPS = Capabilities(
    backend="webui",
    models=(SD15,),
    loras=(LoraInfo("Pixel Art"),),
    samplers=("Euler a", "DPM++ 2M"),
    schedulers=("karras", "sgm_uniform"),
    max_pixels=1024 * 1024,
    max_steps=50,
)


def job(**fields) -> JobRequest:
    return JobRequest(**{"kind": "txt2img", "model": "sd-v1-5", "prompt": "x", **fields})


def test_resolve_names_things_as_the_backend_does() -> None:
    resolved = CAPS.resolve(
        job(model="SD-V1-5", loras=(("pixel  art", 0.3),), sampler_name="euler A")
    )
    assert resolved.model == SD15
    assert resolved.loras == ((LoraInfo("Pixel Art"), 0.3),)
    assert (resolved.sampler, resolved.scheduler) == ("Euler a", None)
    assert CAPS.resolve(job(model=SD15.title)).model == SD15


@pytest.mark.parametrize(
    ("name", "sampler", "scheduler"),
    [("DPM++ 2M Karras", "DPM++ 2M", "karras"), ("Euler a SGM Uniform", "Euler a", "sgm_uniform")],
)
def test_a_scheduler_suffix_becomes_a_scheduler(name: str, sampler: str, scheduler: str) -> None:
    resolved = CAPS.resolve(job(sampler_name=name))
    assert (resolved.sampler, resolved.scheduler) == (sampler, scheduler)


def test_an_old_webui_lists_suffixed_samplers_whole() -> None:
    old = Capabilities("webui", (SD15,), (), ("DPM++ 2M", "DPM++ 2M Karras"))
    resolved = old.resolve(job(sampler_name="DPM++ 2M Karras"))
    assert (resolved.sampler, resolved.scheduler) == ("DPM++ 2M Karras", None)
    with pytest.raises(JobError, match="DPM\\+\\+ 2M Exponential"):
        old.resolve(job(sampler_name="DPM++ 2M Exponential"))


@pytest.mark.parametrize(
    "fields",
    [
        {"model": "sdxl"},
        {"loras": (("Pixel Art", 1.0), ("anime", 1.0))},
        {"sampler_name": "DDIM"},
        {"sampler_name": "DPM++ 2M Exponential"},
        {"sampler_name": "DDIM Karras"},
        {"width": 1024, "height": 1032},
        {"steps": 51},
    ],
)
def test_anything_not_offered_is_unsupported(fields: dict) -> None:
    with pytest.raises(JobError) as caught:
        CAPS.resolve(job(**fields))
    assert caught.value.code == "unsupported"
