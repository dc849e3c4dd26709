"""A tiny, randomly initialised Stable Diffusion 1.x, built offline: for tests and benchmarks.

It has the real SD 1.x architecture at toy sizes (UNet ``block_out_channels=(32, 64)``, a
4-level VAE with the real scale factor 8, a 5-layer CLIP text model of width 32 and a
byte-level tokenizer written here), so every code path of the diffusers backend runs on a CPU
in a fraction of a second. It draws noise-like pictures, not art. Nothing comes from a hub.

`write_tiny_models` lays out a models dir the way a user's looks: a diffusers folder, the same
weights as a single-file LDM checkpoint (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*`` keys, as A1111 saves them) and a LoRA file.

Needs torch, diffusers, transformers, peft and safetensors (the ``diffusers`` extra); they are
imported when a function is called, not with this module.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

__all__ = [
    "build_tiny_pipeline",
    "build_tiny_xl_pipeline",
    "to_ldm_checkpoint",
    "write_tiny_lora",
    "write_tiny_models",
]

#: The text model's and the UNet's cross-attention width.
_WIDTH = 32
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
#: The UNet's shape in both toys: two levels, attention in the lower one.
_UNET_SHAPE: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}
# Pairs merged by the toy tokenizer: enough to show that merges work, no more.
_MERGES = ("t h", "th e</w>", "a n", "i n", "o n</w>", "e r", "a t</w>")


def build_tiny_pipeline(seed: int = 0) -> Any:
    """A `StableDiffusionPipeline` of random weights drawn from `seed` (same seed, same weights).

    Built in memory with its tokenizer written to a temporary folder and read back.
    """
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        _write_tokenizer(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_UNET_SHAPE,
        cross_attention_dim=_WIDTH,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=_WIDTH,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            max_position_embeddings=77,
            projection_dim=_WIDTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Stable Diffusion 1.5's own scheduler settings.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_xl_pipeline(seed: int = 0) -> Any:
    """A `StableDiffusionXLPipeline` of random weights drawn from `seed`: the tiny SD 1.x
    parts, a second text encoder with projection, and a UNet with SDXL's size and crop
    conditioning."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    base = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        **_UNET_SHAPE,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # 6 size and crop numbers of 8 features each, and the pooled text embedding.
        projection_class_embeddings_input_dim=6 * 8 + _WIDTH,
        cross_attention_dim=2 * _WIDTH,  # both text encoders' hidden states, side by side
    )
    return StableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=CLIPTextModelWithProjection(base.text_encoder.config),
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(base.scheduler.config),
    )


def write_tiny_models(
    models_dir: Path,
    *,
    name: str = "tiny-sd",
    seed: int = 0,
    loras_dir: Path | None = None,
    xl: bool = False,
) -> Any:
    """Save a tiny pipeline in `models_dir` as the folder `name` and as ``name-single.safetensors``
    (the same weights); with `xl`, a tiny SDXL pipeline as the folder ``name-xl`` too.

    With `loras_dir`, writes a LoRA for the SD 1.x pipeline there twice, the same weights in
    diffusers' layout (``tiny-lora.safetensors``) and in Kohya's (``tiny-lora-kohya``).
    Returns the SD 1.x pipeline.
    """
    from safetensors.torch import save_file

    pipe = build_tiny_pipeline(seed)
    models_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(models_dir / name)
    save_file(to_ldm_checkpoint(pipe), models_dir / f"{name}-single.safetensors")
    if xl:
        build_tiny_xl_pipeline(seed).save_pretrained(models_dir / f"{name}-xl")
    if loras_dir is not None:
        write_tiny_lora(pipe, loras_dir / "tiny-lora.safetensors", seed=seed + 1)
        write_tiny_lora(pipe, loras_dir / "tiny-lora-kohya.safetensors", seed=seed + 1, kohya=True)
    return pipe


def write_tiny_lora(
    pipe: Any, path: Path, *, seed: int = 1, rank: int = 4, kohya: bool = False
) -> None:
    """Write a random LoRA for `pipe`'s UNet attention layers to `path`, in diffusers' layout
    or (`kohya`) in the Kohya / A1111 one; the same `seed` gives the same weights.

    `pipe` is left as it was.
    """
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,  # the default starts as a no-op
    )
    unet = copy.deepcopy(pipe.unet)  # deleting an adapter would leave peft wrappers behind
    unet.add_adapter(config, adapter_name="tiny")
    layers = get_peft_model_state_dict(unet, adapter_name="tiny")
    if not kohya:
        StableDiffusionPipeline.save_lora_weights(
            path.parent, unet_lora_layers=layers, weight_name=path.name
        )
        return
    # Kohya: lora_unet_<module path with _>.lora_down/.lora_up, and alpha (scale alpha / rank).
    state = {}
    for key, value in layers.items():
        module, _, part = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path)


def to_ldm_checkpoint(pipe: Any) -> dict[str, Any]:
    """`pipe`'s weights under the original (LDM) key names of a single-file SD 1.x checkpoint."""
    checkpoint: dict[str, Any] = {}
    unet = pipe.unet.state_dict()
    for key, ldm in _unet_key_map(pipe.unet.config, unet).items():
        checkpoint["model.diffusion_model." + ldm] = unet[key]
    vae = pipe.vae.state_dict()
    for key, ldm in _vae_key_map(pipe.vae.config, vae).items():
        checkpoint["first_stage_model." + ldm] = vae[key]
    for key, value in pipe.text_encoder.state_dict().items():
        full = key if key.startswith("text_model.") else "text_model." + key
        checkpoint["cond_stage_model.transformer." + full] = value
    return {k: v.contiguous() for k, v in checkpoint.items()}


# --- diffusers to LDM key names (the inverse of diffusers' single-file conversion) -------------

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _unet_key_map(config: Any, state: dict[str, Any]) -> dict[str, str]:
    per = config.layers_per_block + 1
    prefixes = dict(_UNET_TOP)
    for b in range(len(config.block_out_channels)):
        for j in range(config.layers_per_block):
            i = 1 + b * per + j
            prefixes[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            prefixes[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
        prefixes[f"down_blocks.{b}.downsamplers.0.conv"] = (
            f"input_blocks.{1 + b * per + per - 1}.0.op"
        )
        has_attention = any(k.startswith(f"up_blocks.{b}.attentions.") for k in state)
        for j in range(per):
            i = b * per + j
            prefixes[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            prefixes[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
        upsampler = f"output_blocks.{b * per + per - 1}.{2 if has_attention else 1}.conv"
        prefixes[f"up_blocks.{b}.upsamplers.0.conv"] = upsampler
    prefixes["mid_block.resnets.0"] = "middle_block.0"
    prefixes["mid_block.attentions.0"] = "middle_block.1"
    prefixes["mid_block.resnets.1"] = "middle_block.2"
    return {key: _rename(key, prefixes, _RESNET) for key in state}


def _vae_key_map(config: Any, state: dict[str, Any]) -> dict[str, str]:
    levels = len(config.block_out_channels)
    prefixes = {
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_norm_out": "decoder.norm_out",
    }
    for i in range(levels):
        prefixes[f"encoder.down_blocks.{i}.resnets"] = f"encoder.down.{i}.block"
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        up = levels - 1 - i
        prefixes[f"decoder.up_blocks.{i}.resnets"] = f"decoder.up.{up}.block"
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{up}.upsample"
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        prefixes[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        prefixes[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    renames = (("conv_shortcut", "nin_shortcut"), *_VAE_ATTENTION)
    return {key: _rename(key, prefixes, renames) for key in state}


def _rename(key: str, prefixes: dict[str, str], renames: tuple[tuple[str, str], ...]) -> str:
    """Swap the longest matching block prefix of `key`, then its layer names in resnets and
    attention blocks (UNet attention blocks keep theirs)."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        if key == prefix or key.startswith(prefix + "."):
            rest = key[len(prefix) :]
            if "resnets" in prefix or ("mid_block.attentions" in prefix and "coder." in prefix):
                for old, new in renames:
                    rest = rest.replace(f".{old}.", f".{new}.")
            return prefixes[prefix] + rest
    return key


# --- a tokenizer that needs no download ----------------------------------------------------------


def _byte_characters() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, as byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer: the 256 byte characters, each also with ``</w>``, a few merges."""
    tokens = _byte_characters()
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(pair.split()) for pair in _MERGES]
    tokens += [_BOS, _EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    config = {
        "model_max_length": 77,  # without it the pipeline pads prompts to a huge length
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _EOS,
        "pad_token": _EOS,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
