"""A job as ComfyUI workflows: one API-format workflow per image (pure).

`build_workflow` gives CheckpointLoaderSimple, a LoraLoader per LoRA, CLIPTextEncode twice,
EmptyLatentImage (batch 1) or, for img2img, LoadImage of the uploaded init image scaled to the
job's size and VAEEncoded, then KSampler, VAEDecode and PreviewImage (a temp file: nothing is
left in ComfyUI's output folder). One workflow per image, because a ComfyUI batch draws the
noise of all its images from the one seed (``comfy.sample.prepare_noise``: image *i* gets the
*i*-th draw of the seed's generator, not seed + *i*'s; ancestral and SDE samplers draw each
step's noise for the whole batch from one generator too), so no batch gives A1111's image *i*
= seed + *i*. One prompt per image gives image *i* exactly the picture a one-image job with
seed + *i* gives; ComfyUI's cache runs the loaders and text encoders once for them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdcn_p2p.jobs import JobRequest

__all__ = ["JOB_FIELDS", "OFFERED_INPUTS", "OUTPUT_NODE", "SAMPLER_NODE", "Plan", "build_workflow"]

# The workflow's node ids (ComfyUI's frontend numbers its nodes too).
_CHECKPOINT, _POSITIVE, _NEGATIVE, _LATENT = "1", "2", "3", "4"
_LOAD, _SCALE, _DECODE = "5", "6", "8"
_FIRST_LORA = 10
#: The KSampler, whose progress is the job's, and the PreviewImage, whose image is the result.
SAMPLER_NODE, OUTPUT_NODE = "7", "9"
#: Job fields by the (node class, input) that carries them, for ComfyUI's validation errors.
JOB_FIELDS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "model",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoader", "strength_model"): "loras",
    ("LoraLoader", "strength_clip"): "loras",
    ("CLIPTextEncode", "text"): "prompt",
    ("EmptyLatentImage", "width"): "width",
    ("EmptyLatentImage", "height"): "height",
    ("ImageScale", "width"): "width",
    ("ImageScale", "height"): "height",
    ("LoadImage", "image"): "init_image",
    ("KSampler", "seed"): "seed",
    ("KSampler", "steps"): "steps",
    ("KSampler", "cfg"): "cfg_scale",
    ("KSampler", "sampler_name"): "sampler_name",
    ("KSampler", "scheduler"): "sampler_name",
    ("KSampler", "denoise"): "denoising_strength",
}
#: Inputs naming something that may have left ComfyUI since its capabilities were read.
OFFERED_INPUTS = frozenset({"ckpt_name", "lora_name", "sampler_name", "scheduler"})


@dataclass(frozen=True, slots=True)
class Plan:
    """A job in ComfyUI's names: the checkpoint and LoRA files, sampler and scheduler."""

    checkpoint: str
    loras: tuple[tuple[str, float], ...]
    sampler: str
    scheduler: str


def build_workflow(job: JobRequest, plan: Plan, seed: int, init_image: str | None) -> dict:
    """The API-format workflow of one image of `job` with `seed`.

    `init_image` is the LoadImage name of the uploaded init image (img2img), scaled to the
    job's size before it is encoded, as A1111 resizes it.
    """
    prompt: dict[str, dict[str, Any]] = {
        _CHECKPOINT: _node("CheckpointLoaderSimple", ckpt_name=plan.checkpoint),
    }
    model, clip = [_CHECKPOINT, 0], [_CHECKPOINT, 1]
    for index, (name, weight) in enumerate(plan.loras):
        node = str(_FIRST_LORA + index)
        prompt[node] = _node(
            "LoraLoader",
            model=model,
            clip=clip,
            lora_name=name,
            strength_model=weight,
            strength_clip=weight,
        )
        model, clip = [node, 0], [node, 1]
    prompt[_POSITIVE] = _node("CLIPTextEncode", text=job.prompt, clip=clip)
    prompt[_NEGATIVE] = _node("CLIPTextEncode", text=job.negative_prompt, clip=clip)
    vae = [_CHECKPOINT, 2]
    if init_image is None:
        prompt[_LATENT] = _node(
            "EmptyLatentImage", width=job.width, height=job.height, batch_size=1
        )
        denoise = 1.0
    else:
        prompt[_LOAD] = _node("LoadImage", image=init_image)
        prompt[_SCALE] = _node(
            "ImageScale",
            image=[_LOAD, 0],
            upscale_method="lanczos",
            width=job.width,
            height=job.height,
            crop="disabled",
        )
        prompt[_LATENT] = _node("VAEEncode", pixels=[_SCALE, 0], vae=vae)
        denoise = job.denoising_strength
    prompt[SAMPLER_NODE] = _node(
        "KSampler",
        model=model,
        seed=seed,
        steps=job.steps,
        cfg=job.cfg_scale,
        sampler_name=plan.sampler,
        scheduler=plan.scheduler,
        positive=[_POSITIVE, 0],
        negative=[_NEGATIVE, 0],
        latent_image=[_LATENT, 0],
        denoise=denoise,
    )
    prompt[_DECODE] = _node("VAEDecode", samples=[SAMPLER_NODE, 0], vae=vae)
    prompt[OUTPUT_NODE] = _node("PreviewImage", images=[_DECODE, 0])
    return prompt


def _node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}
