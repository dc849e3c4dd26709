"""The nodes the fake ComfyUI runs, as ComfyUI declares them, and their ``/object_info``.

`NODES` holds the core nodes a txt2img or img2img workflow needs, with their inputs, outputs
and category as ComfyUI declares them; `object_info` describes one as ``GET
/object_info/{node}`` does, its choice lists filled in from the fake's files and names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KSAMPLER_NAMES",
    "MAX_RESOLUTION",
    "NODES",
    "SCHEDULER_NAMES",
    "NodeSpec",
    "object_info",
]

#: ComfyUI's ``comfy.samplers.KSAMPLER_NAMES`` (2025) and the three it adds for KSampler.
KSAMPLER_NAMES = (
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)
#: ComfyUI's ``comfy.samplers.SCHEDULER_NAMES``.
SCHEDULER_NAMES = (
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
)
MAX_RESOLUTION = 16384
_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A node class as ``/object_info`` describes it; choices None are the fake's lists."""

    inputs: dict[str, Any]
    returns: tuple[str, ...]
    category: str
    output_node: bool = False
    #: Inputs its VALIDATE_INPUTS checks itself (no combo check for them).
    validates: tuple[str, ...] = ()


def _int(default: int, low: int, high: int, step: int = 1) -> list[Any]:
    return ["INT", {"default": default, "min": low, "max": high, "step": step}]


def _float(default: float, low: float, high: float, step: float = 0.01) -> list[Any]:
    return ["FLOAT", {"default": default, "min": low, "max": high, "step": step}]


#: The core nodes the fake runs, with their inputs as ComfyUI declares them. A choice list of
#: None is filled from the fake's checkpoints, LoRAs, samplers, schedulers or input images.
NODES: dict[str, NodeSpec] = {
    "CheckpointLoaderSimple": NodeSpec(
        {"required": {"ckpt_name": [None, {"tooltip": "The name of the checkpoint."}]}},
        ("MODEL", "CLIP", "VAE"),
        "loaders",
    ),
    "LoraLoader": NodeSpec(
        {
            "required": {
                "model": ["MODEL", {}],
                "clip": ["CLIP", {}],
                "lora_name": [None, {}],
                "strength_model": _float(1.0, -100.0, 100.0),
                "strength_clip": _float(1.0, -100.0, 100.0),
            }
        },
        ("MODEL", "CLIP"),
        "loaders",
    ),
    "CLIPTextEncode": NodeSpec(
        {
            "required": {
                "text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
                "clip": ["CLIP", {}],
            }
        },
        ("CONDITIONING",),
        "conditioning",
    ),
    "EmptyLatentImage": NodeSpec(
        {
            "required": {
                "width": _int(1024, 16, MAX_RESOLUTION, 8),
                "height": _int(1024, 16, MAX_RESOLUTION, 8),
                "batch_size": _int(1, 1, 4096),
            }
        },
        ("LATENT",),
        "latent",
    ),
    "LoadImage": NodeSpec(
        {"required": {"image": [None, {"image_upload": True}]}},
        ("IMAGE", "MASK"),
        "image",
        validates=("image",),
    ),
    "ImageScale": NodeSpec(
        {
            "required": {
                "image": ["IMAGE", {}],
                "upscale_method": [_UPSCALE_METHODS, {}],
                "width": _int(512, 0, MAX_RESOLUTION),
                "height": _int(512, 0, MAX_RESOLUTION),
                "crop": [["disabled", "center"], {}],
            }
        },
        ("IMAGE",),
        "image/upscaling",
    ),
    "VAEEncode": NodeSpec(
        {"required": {"pixels": ["IMAGE", {}], "vae": ["VAE", {}]}}, ("LATENT",), "latent"
    ),
    "KSampler": NodeSpec(
        {
            "required": {
                "model": ["MODEL", {}],
                "seed": _int(0, 0, 0xFFFFFFFFFFFFFFFF),
                "steps": _int(20, 1, 10000),
                "cfg": _float(8.0, 0.0, 100.0, 0.1),
                "sampler_name": [None, {}],
                "scheduler": [None, {}],
                "positive": ["CONDITIONING", {}],
                "negative": ["CONDITIONING", {}],
                "latent_image": ["LATENT", {}],
                "denoise": _float(1.0, 0.0, 1.0),
            }
        },
        ("LATENT",),
        "sampling",
    ),
    "VAEDecode": NodeSpec(
        {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}}, ("IMAGE",), "latent"
    ),
    "PreviewImage": NodeSpec(
        {"required": {"images": ["IMAGE", {}]}, "hidden": _HIDDEN}, (), "image", output_node=True
    ),
    "SaveImage": NodeSpec(
        {
            "required": {
                "images": ["IMAGE", {}],
                "filename_prefix": ["STRING", {"default": "ComfyUI"}],
            },
            "hidden": _HIDDEN,
        },
        (),
        "image",
        output_node=True,
    ),
}


def object_info(node: str, choices: Callable[[str, str], list[str]]) -> dict[str, Any]:
    """``GET /object_info/{node}``: {} for a node the fake lacks. ``choices(node, input)`` gives
    the choice lists that `NODES` leaves None."""
    spec = NODES.get(node)
    if spec is None:
        return {}
    inputs: dict[str, Any] = {}
    for group, section in spec.inputs.items():
        if group == "hidden":
            inputs[group] = dict(section)
            continue
        inputs[group] = {
            name: [choices(node, name) if value[0] is None else value[0], value[1]]
            for name, value in section.items()
        }
    return {
        node: {
            "input": inputs,
            "input_order": {g: list(s) for g, s in inputs.items() if g != "hidden"},
            "is_input_list": False,
            "output": list(spec.returns),
            "output_is_list": [False] * len(spec.returns),
            "output_name": list(spec.returns),
            "name": node,
            "display_name": node,
            "description": "",
            "python_module": "nodes",
            "category": spec.category,
            "output_node": spec.output_node,
            "has_intermediate_output": False,
            "search_aliases": [],
        }
    }
