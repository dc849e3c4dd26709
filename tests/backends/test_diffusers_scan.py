"""The diffusers backend's parts that need no torch: samplers, scanning, hashes, configuration."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sdcn_p2p.backends.diffusers import (
    SAMPLERS,
    DiffusersConfig,
    HashCache,
    checkpoint_architecture,
    folder_architecture,
    require_diffusers,
    scan_loras,
    scan_models,
    scheduler_for,
)
from sdcn_p2p.cli import build_parser, main, open_backend_from_args
from sdcn_p2p.errors import ConfigError, JobError

SD1_KEYS = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "first_stage_model.encoder.conv_in.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
)
SD2_KEYS = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
)
SDXL_KEYS = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
)


def write_safetensors(path: Path, keys: tuple[str, ...]) -> None:
    """A valid safetensors file of one-float tensors named `keys`, written without torch."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for i, key in enumerate(keys):
        header[key] = {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4 * len(keys))


def write_folder(path: Path, pipeline: str, cross_attention_dim: int) -> None:
    (path / "unet").mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    unet = {"cross_attention_dim": cross_attention_dim}
    (path / "unet" / "config.json").write_text(json.dumps(unet))


def test_a1111_samplers_map_to_diffusers_schedulers() -> None:
    assert scheduler_for("Euler a", None) == ("EulerAncestralDiscreteScheduler", {})
    assert scheduler_for("DPM++ 2M", "karras") == (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    )
    assert scheduler_for("DPM++ SDE", "karras") == (
        "DPMSolverSDEScheduler",
        {"use_karras_sigmas": True},
    )
    for name in ("Euler", "DDIM", "LMS", "Heun", "UniPC"):
        assert scheduler_for(name, None)[0] in {cls for cls, _ in SAMPLERS.values()}


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [("Restart", None), ("euler", None), ("Euler a", "karras"), ("DDIM", "beta")],
)
def test_samplers_not_offered_are_unsupported(sampler: str, scheduler: str | None) -> None:
    with pytest.raises(JobError) as caught:
        scheduler_for(sampler, scheduler)
    assert caught.value.code == "unsupported"


@pytest.mark.parametrize(
    ("keys", "expected"), [(SD1_KEYS, "sd1"), (SD2_KEYS, "sd2"), (SDXL_KEYS, "sdxl")]
)
def test_checkpoint_architecture_from_key_names(
    tmp_path: Path, keys: tuple[str, ...], expected: str
) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, keys)
    assert checkpoint_architecture(path) == expected


def test_folder_architecture_from_configs(tmp_path: Path) -> None:
    write_folder(tmp_path / "a", "StableDiffusionPipeline", 768)
    write_folder(tmp_path / "b", "StableDiffusionPipeline", 1024)
    write_folder(tmp_path / "c", "StableDiffusionXLPipeline", 2048)
    write_folder(tmp_path / "d", "FluxPipeline", 4096)
    assert [folder_architecture(tmp_path / n) for n in "abcd"] == ["sd1", "sd2", "sdxl", ""]


def test_scan_names_hashes_and_skips(tmp_path: Path, caplog) -> None:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    write_safetensors(models / "dream.safetensors", SD1_KEYS)
    write_safetensors(models / "xl.SAFETENSORS", SDXL_KEYS)
    write_safetensors(models / "vae.safetensors", ("encoder.conv_in.weight",))  # not a model
    write_safetensors(models / ".hidden.safetensors", SD1_KEYS)
    write_folder(models / "dream", "StableDiffusionPipeline", 768)  # same name as the file
    write_folder(models / "sd21", "StableDiffusionPipeline", 1024)
    (models / "notes.txt").write_text("not a model")
    (models / "broken.safetensors").write_bytes(b"\xff" * 4)
    write_safetensors(loras / "pixel.safetensors", ("lora_unet_down.alpha",))
    (loras / "readme.md").write_text("")

    cache = HashCache(tmp_path / "cache.json")
    found = scan_models(models, cache)
    assert [(m.info.name, m.info.architecture, m.single_file) for m in found] == [
        ("dream", "sd1", False),
        ("sd21", "sd2", False),
        ("xl", "sdxl", True),
    ]
    xl = (models / "xl.SAFETENSORS").read_bytes()
    assert found[2].info.hash == hashlib.sha256(xl).hexdigest()[:10]
    assert found[2].info.title == f"xl.SAFETENSORS [{found[2].info.hash}]"
    assert "a model named 'dream' is already offered" in caplog.text
    assert "vae.safetensors: not a Stable Diffusion" in caplog.text
    assert "broken.safetensors" in caplog.text

    [(info, path)] = scan_loras(loras, cache).values()
    assert info.name == "pixel" and path == loras / "pixel.safetensors"
    assert info.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_the_hash_cache_survives_reopening_and_notices_changes(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    write_safetensors(model, SD1_KEYS)
    stamp = (model.stat().st_size, model.stat().st_mtime_ns)
    calls = []

    def compute() -> dict[str, str]:
        calls.append(1)
        return {"sha256": "ab" * 32}

    cache = HashCache(tmp_path / "sub" / "cache.json")
    assert cache.get(model, stamp, compute)["sha256"] == "ab" * 32
    cache.save()
    again = HashCache(tmp_path / "sub" / "cache.json")
    assert again.get(model, stamp, compute)["sha256"] == "ab" * 32
    assert len(calls) == 1 and again.computed == 0
    again.get(model, (stamp[0] + 1, stamp[1]), compute)
    assert len(calls) == 2 and again.computed == 1

    (tmp_path / "bad.json").write_text("{not json")
    assert HashCache(tmp_path / "bad.json").get(model, stamp, compute)  # starts empty


def test_config_is_checked(tmp_path: Path) -> None:
    DiffusersConfig(tmp_path)
    with pytest.raises(ConfigError, match="not a directory"):
        DiffusersConfig(tmp_path / "missing")
    with pytest.raises(ConfigError, match="LoRAs dir"):
        DiffusersConfig(tmp_path, loras_dir=tmp_path / "missing")
    with pytest.raises(ConfigError, match="device"):
        DiffusersConfig(tmp_path, device="tpu")
    with pytest.raises(ConfigError, match="dtype"):
        DiffusersConfig(tmp_path, dtype="int8")
    with pytest.raises(ConfigError, match="VRAM budget"):
        DiffusersConfig(tmp_path, vram_budget_mb=0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"models_dir": "missing"}, "models_dir"),
        ({"loras_dir": "missing"}, "loras_dir"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"vram_budget_mb": 0}, "vram_budget_mb"),
        ({"max_pixels": 63 * 64}, "max_pixels"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, changes: dict, field: str) -> None:
    values = {"models_dir": tmp_path, **changes}
    for name in ("models_dir", "loras_dir"):
        if values.get(name) == "missing":
            values[name] = tmp_path / "missing"
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        DiffusersConfig(**values)


def test_missing_packages_give_the_install_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name in ("torch", "peft") else real(name, *args),
    )
    with pytest.raises(ConfigError) as caught:
        require_diffusers()
    message = str(caught.value)
    assert "torch" in message and "peft" in message
    assert "pip install 'sdcn-p2p[diffusers]'" in message


def test_the_cli_imports_neither_torch_nor_diffusers() -> None:
    # The CLI imports this backend: everything heavy waits for open_diffusers_backend.
    code = "import sys, sdcn_p2p.cli; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_cli_diffusers_options(tmp_path: Path, monkeypatch, capsys) -> None:
    def node_args(*extra: str):
        return build_parser().parse_args(["node", "--backend", "diffusers", *extra])

    with pytest.raises(ConfigError, match="--models-dir"):
        open_backend_from_args(node_args())
    args = node_args(
        "--models-dir", str(tmp_path), "--device", "cpu", "--dtype", "float32",
        "--vram-budget-mb", "4096",
    )  # fmt: skip
    assert (args.models_dir, args.device, args.vram_budget_mb) == (tmp_path, "cpu", 4096)
    if importlib.util.find_spec("torch") is not None:
        open_backend_from_args(args)  # checks only: opening it would import torch

    node = ["node", "--backend", "diffusers", "--models-dir", str(tmp_path)]
    node += ["--key", str(tmp_path / "key")]
    assert main([*node, "--slots", "2"]) == 1
    assert "one job at a time" in capsys.readouterr().err

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "diffusers" else real(name, *args),
    )
    assert main(node) == 1
    err = capsys.readouterr().err
    assert "pip install 'sdcn-p2p[diffusers]'" in err and "Traceback" not in err
