"""The job schema (sdcn_p2p.jobs.schema) and its init-image checks (sdcn_p2p.jobs.images).

Jobs are written here as SDCN API bodies, the JSON form the seed document gives, made into
jobs by the gateway's `parse_request` (base64 init images, a `data:` prefix allowed); the
wire form (`from_wire`) must give the same answers.
"""

from __future__ import annotations

import base64
import functools
import io
import random
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, WebPImagePlugin

from gateway.sdcn import parse_request
from sdcn_p2p.errors import JobError
from sdcn_p2p.jobs import MAX_INIT_IMAGE_BYTES, JobRequest, split_sampler
from sdcn_p2p.jobs.protocol import MAX_JOB_MESSAGE
from sdcn_p2p.wire.messages import pack, unpack

MISSING = object()

# The examples of the SDCN seed document, verbatim.
TXT2IMG_EXAMPLE = {
    "prompt": "A dog",
    "loras": [["XXXXXXXX", 0.5], ["XXXXXXXX", 0.6]],
    "seed": -1,
    "sampler_name": "DDIM",
    "steps": 20,
    "cfg_scale": 7,
    "width": 512,
    "height": 512,
    "negative_prompt": "",
    "model": "XXXXXXXX",
}
# The seed lists one LoRA twice, which we refuse; the valid bodies below use two names.
TXT2IMG = TXT2IMG_EXAMPLE | {"loras": [["XXXXXXXX", 0.5], ["YYYYYYYY", 0.6]]}


@functools.cache
def image(fmt: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    rng = random.Random(f"{fmt}{size}")
    picture = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def img2img(**changes: Any) -> dict[str, Any]:
    return with_changes(TXT2IMG | {"init_image": b64(image()), "denoising_strength": 0.55}, changes)


def txt2img(**changes: Any) -> dict[str, Any]:
    return with_changes(TXT2IMG, changes)


def with_changes(body: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    body = body | changes
    return {key: value for key, value in body.items() if value is not MISSING}


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares `width` x `height` RGB pixels: a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(bytes(1_000_000), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pixel data is decoded."""

    def refuse(self: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "load", refuse)
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "_open", refuse)


def refused(field: str, call: Callable[[], object]) -> JobError:
    with pytest.raises(JobError) as info:
        call()
    assert info.value.code == "bad_request"
    assert info.value.message.startswith(field + ":"), info.value.message
    return info.value


# --- the schema ----------------------------------------------------------------------------------


def test_the_seed_txt2img_example_gives_a_job_with_its_values() -> None:
    job = parse_request("txt2img", TXT2IMG)
    assert job == JobRequest(
        kind="txt2img",
        model="XXXXXXXX",
        prompt="A dog",
        loras=(("XXXXXXXX", 0.5), ("YYYYYYYY", 0.6)),
        seed=-1,
        sampler_name="DDIM",
        steps=20,
        cfg_scale=7.0,
    )
    assert isinstance(job.cfg_scale, float)
    assert job.init_image is None


def test_a_lora_listed_twice_is_refused() -> None:
    refused("loras[1]", lambda: parse_request("txt2img", TXT2IMG_EXAMPLE))


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,", "DATA:image/jpeg;base64,"])
def test_the_seed_img2img_example_with_a_base64_png(prefix: str) -> None:
    job = parse_request("img2img", img2img(init_image=prefix + b64(image())))
    assert job.kind == "img2img"
    assert job.init_image == image()
    assert job.denoising_strength == 0.55


def test_line_wrapped_base64_is_accepted() -> None:
    wrapped = base64.encodebytes(image()).decode()
    assert "\n" in wrapped
    assert parse_request("img2img", img2img(init_image=wrapped)).init_image == image()


def test_only_model_and_prompt_are_required() -> None:
    job = parse_request("txt2img", {"model": "m", "prompt": ""})
    assert job == JobRequest(kind="txt2img", model="m", prompt="")
    job = parse_request("img2img", {"model": "m", "prompt": "", "init_image": b64(image())})
    assert job.denoising_strength == 0.75


def test_boundary_values_are_accepted() -> None:
    low = txt2img(seed=0, steps=1, cfg_scale=0, width=64, height=64, batch_size=1, loras=[])
    high = txt2img(
        seed=2**32 - 1,
        steps=150,
        cfg_scale=30.0,
        width=2048,
        height=2048,
        batch_size=4,
        prompt="p" * 8000,
        negative_prompt="n" * 8000,
        loras=[[f"lora{i}", 5 if i % 2 else -5.0] for i in range(8)],
    )
    for body in (low, high):
        parse_request("txt2img", body)
    parse_request("img2img", img2img(denoising_strength=0))
    parse_request("img2img", img2img(denoising_strength=1))


INVALID = [
    # (kind, field named in the message, changes to a valid body)
    ("txt2img", "model", {"model": MISSING}),
    ("txt2img", "model", {"model": ""}),
    ("txt2img", "model", {"model": "  "}),
    ("txt2img", "model", {"model": 5}),
    ("txt2img", "model", {"model": None}),
    ("txt2img", "model", {"model": "m" * 257}),
    ("txt2img", "prompt", {"prompt": MISSING}),
    ("txt2img", "prompt", {"prompt": "p" * 8001}),
    ("txt2img", "prompt", {"prompt": ["a dog"]}),
    ("txt2img", "negative_prompt", {"negative_prompt": "n" * 8001}),
    ("txt2img", "negative_prompt", {"negative_prompt": None}),
    ("txt2img", "loras", {"loras": "XXXXXXXX"}),
    ("txt2img", "loras", {"loras": {"XXXXXXXX": 0.5}}),
    ("txt2img", "loras", {"loras": [[f"l{i}", 1] for i in range(9)]}),
    ("txt2img", "loras[0]", {"loras": [["a"]]}),
    ("txt2img", "loras[0]", {"loras": [["a", 1, 2]]}),
    ("txt2img", "loras[0]", {"loras": [{"name": "a", "weight": 1}]}),
    ("txt2img", "loras[0] name", {"loras": [["", 1]]}),
    ("txt2img", "loras[0] name", {"loras": [[7, 1]]}),
    ("txt2img", "loras[0] name", {"loras": [["l" * 257, 1]]}),
    ("txt2img", "loras[0] name", {"loras": [["a:1> <lora:b", 1]]}),
    ("txt2img", "loras[1] weight", {"loras": [["a", 1], ["b", 5.5]]}),
    ("txt2img", "loras[0] weight", {"loras": [["a", -6]]}),
    ("txt2img", "loras[0] weight", {"loras": [["a", "1"]]}),
    ("txt2img", "loras[0] weight", {"loras": [["a", True]]}),
    ("txt2img", "loras[0] weight", {"loras": [["a", float("nan")]]}),
    ("txt2img", "seed", {"seed": -2}),
    ("txt2img", "seed", {"seed": 2**32}),
    ("txt2img", "seed", {"seed": 10**100}),
    ("txt2img", "seed", {"seed": 1.5}),
    ("txt2img", "seed", {"seed": 5.0}),
    ("txt2img", "seed", {"seed": True}),
    ("txt2img", "seed", {"seed": "1"}),
    ("txt2img", "sampler_name", {"sampler_name": ""}),
    ("txt2img", "sampler_name", {"sampler_name": "s" * 65}),
    ("txt2img", "sampler_name", {"sampler_name": None}),
    ("txt2img", "steps", {"steps": 0}),
    ("txt2img", "steps", {"steps": 151}),
    ("txt2img", "steps", {"steps": 20.0}),
    ("txt2img", "steps", {"steps": False}),
    ("txt2img", "cfg_scale", {"cfg_scale": -0.5}),
    ("txt2img", "cfg_scale", {"cfg_scale": 30.5}),
    ("txt2img", "cfg_scale", {"cfg_scale": "7"}),
    ("txt2img", "cfg_scale", {"cfg_scale": True}),
    ("txt2img", "cfg_scale", {"cfg_scale": float("nan")}),
    ("txt2img", "cfg_scale", {"cfg_scale": float("inf")}),
    ("txt2img", "width", {"width": 500}),
    ("txt2img", "width", {"width": 56}),
    ("txt2img", "width", {"width": 2056}),
    ("txt2img", "width", {"width": 512.0}),
    ("txt2img", "height", {"height": 100}),
    ("txt2img", "height", {"height": 4096}),
    ("txt2img", "height", {"height": True}),
    ("txt2img", "batch_size", {"batch_size": 0}),
    ("txt2img", "batch_size", {"batch_size": 5}),
    ("txt2img", "batch_size", {"batch_size": True}),
    ("txt2img", "sampler", {"sampler": "DDIM"}),
    ("txt2img", "Prompt", {"Prompt": "a dog"}),
    ("txt2img", "hires, n_iter", {"n_iter": 2, "hires": True}),
    ("txt2img", "init_image", {"init_image": b64(image())}),
    ("txt2img", "denoising_strength", {"denoising_strength": 0.5}),
    ("img2img", "init_image", {"init_image": MISSING}),
    ("img2img", "init_image", {"init_image": None}),
    ("img2img", "init_image", {"init_image": ["aGk="]}),
    ("img2img", "init_image", {"init_image": "not base64!"}),
    ("img2img", "init_image", {"init_image": "Zm9v\u00e9"}),
    ("img2img", "init_image", {"init_image": b64(b"hello, not an image")}),
    ("img2img", "init_image", {"init_image": b64(image("GIF"))}),
    ("img2img", "init_image", {"init_image": "data:text/plain;base64," + b64(image())}),
    ("img2img", "denoising_strength", {"denoising_strength": 1.5}),
    ("img2img", "denoising_strength", {"denoising_strength": -0.1}),
    ("img2img", "denoising_strength", {"denoising_strength": "0.5"}),
    ("img2img", "denoising_strength", {"denoising_strength": None}),
]


@pytest.mark.parametrize(
    ("kind", "field", "changes"),
    [pytest.param(*case, id=f"{case[0]}-{case[1]}-{i}") for i, case in enumerate(INVALID)],
)
def test_each_invalid_parameter_is_refused_naming_it(
    kind: str, field: str, changes: dict[str, Any]
) -> None:
    body = (txt2img if kind == "txt2img" else img2img)(**changes)
    refused(field, lambda: parse_request(kind, body))
    # The same mistake on the wire gets the same answer (images are bytes there).
    if "init_image" not in changes:
        wire = body | {"kind": kind}
        if kind == "img2img":
            wire["init_image"] = image()
        refused(field, lambda: JobRequest.from_wire(wire))


def test_an_unknown_kind_or_a_body_that_is_not_an_object_is_refused() -> None:
    refused("kind", lambda: parse_request("upscale", TXT2IMG))
    refused("request", lambda: parse_request("txt2img", [TXT2IMG]))  # type: ignore[arg-type]
    refused("job", lambda: JobRequest.from_wire([TXT2IMG]))
    refused("kind", lambda: JobRequest.from_wire(TXT2IMG))


def test_cheap_mistakes_are_reported_before_the_image_is_decoded(no_decoding: None) -> None:
    refused("steps", lambda: parse_request("img2img", img2img(steps=0)))


# --- init images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_init_images_are_accepted(fmt: str) -> None:
    data = image(fmt, (96, 80))
    assert parse_request("img2img", img2img(init_image=b64(data))).init_image == data


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(image("GIF"), id="gif"),
        pytest.param(image("BMP"), id="bmp"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(100), id="png-signature-then-zeros"),
        pytest.param(image("PNG")[: len(image("PNG")) // 2], id="truncated-png"),
        pytest.param(image("JPEG")[:300], id="truncated-jpeg"),
        pytest.param(image("WEBP")[:60], id="truncated-webp"),
        pytest.param(image("PNG")[:8] + bytes(reversed(image("PNG")[8:])), id="scrambled-png"),
    ],
)
def test_garbage_and_truncated_init_images_are_refused(data: bytes) -> None:
    refused("init_image", lambda: parse_request("img2img", img2img(init_image=b64(data))))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("size", [(5000, 10), (10, 5000)])
def test_a_side_over_4096_is_refused_without_decoding_pixels(
    fmt: str, size: tuple[int, int], no_decoding: None
) -> None:
    error = refused(
        "init_image",
        lambda: JobRequest.from_wire(txt2img(kind="img2img", init_image=image(fmt, size))),
    )
    assert "4096" in error.message


def test_a_decompression_bomb_is_refused_from_its_header(no_decoding: None) -> None:
    bomb = png_declaring(20_000, 20_000)
    assert len(bomb) < 10_000
    error = refused("init_image", lambda: parse_request("img2img", img2img(init_image=b64(bomb))))
    assert "20000x20000" in error.message


def test_a_webp_declaring_a_huge_canvas_is_refused_before_the_decoder_opens(
    no_decoding: None,
) -> None:
    # Pillow's WebP decoder allocates the canvas when it opens: 12000 x 12000 is 576 MB.
    simple = image("WEBP", (16, 16))
    assert simple[12:16] == b"VP8 "
    extended = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (11999).to_bytes(3, "little") * 2
    chunks = extended + simple[12:]
    webp = b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks
    job = txt2img(kind="img2img", init_image=webp)
    error = refused("init_image", lambda: JobRequest.from_wire(job))
    assert "12000x12000" in error.message


def test_a_10_mb_init_image_is_accepted() -> None:
    size = (1900, 1900)
    picture = Image.frombytes("RGB", size, random.Random(1).randbytes(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", compress_level=0)
    data = buffer.getvalue()
    assert len(data) > 10_000_000
    job = parse_request("img2img", img2img(init_image=b64(data)))
    assert job.init_image == data
    assert JobRequest.from_wire(unpack(pack(job.to_wire()), max_size=MAX_JOB_MESSAGE)) == job


def test_a_60_mb_init_image_is_refused_by_size_before_decoding(no_decoding: None) -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(60 * 2**20)
    error = refused(
        "init_image", lambda: JobRequest.from_wire(txt2img(kind="img2img", init_image=data))
    )
    assert "50 MiB" in error.message
    text = "A" * (len(data) * 4 // 3)
    refused("init_image", lambda: parse_request("img2img", img2img(init_image=text)))
    # Just over the cap, in base64 that decodes.
    just_over = b64(bytes(MAX_INIT_IMAGE_BYTES + 1))
    refused("init_image", lambda: parse_request("img2img", img2img(init_image=just_over)))


# --- the wire form and helpers ------------------------------------------------------------------


def test_to_wire_and_from_wire_round_trip_through_msgpack() -> None:
    for job in (
        parse_request("txt2img", TXT2IMG),
        parse_request("img2img", img2img(init_image=b64(image("JPEG")))),
    ):
        wire = job.to_wire()
        if job.kind == "img2img":
            assert wire["init_image"] == image("JPEG")  # raw bytes, never base64
        else:
            assert "init_image" not in wire and "denoising_strength" not in wire
        assert JobRequest.from_wire(unpack(pack(wire), max_size=MAX_JOB_MESSAGE)) == job


names = st.text(
    st.characters(blacklist_characters="<>:", blacklist_categories=("Cs",)), min_size=1, max_size=30
).filter(str.strip)


@settings(max_examples=200, deadline=None)
@given(
    model=names,
    prompt=st.text(max_size=200),
    loras=st.lists(st.tuples(names, st.floats(-5, 5)), max_size=8, unique_by=lambda lora: lora[0]),
    seed=st.integers(-1, 2**32 - 1),
    sampler=names.filter(lambda s: len(s) <= 64),
    steps=st.integers(1, 150),
    cfg=st.floats(0, 30),
    width=st.integers(8, 256).map(lambda n: n * 8),
    height=st.integers(8, 256).map(lambda n: n * 8),
    batch=st.integers(1, 4),
)
def test_valid_jobs_round_trip_the_wire(
    model: str,
    prompt: str,
    loras: list[tuple[str, float]],
    seed: int,
    sampler: str,
    steps: int,
    cfg: float,
    width: int,
    height: int,
    batch: int,
) -> None:
    job = JobRequest(
        "txt2img", model, prompt, "", tuple(loras), seed, sampler, steps, cfg, width, height, batch
    )
    assert JobRequest.from_wire(unpack(pack(job.to_wire()), max_size=MAX_JOB_MESSAGE)) == job


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("Euler a", ("Euler a", None)),
        ("DDIM", ("DDIM", None)),
        ("DPM++ 2M Karras", ("DPM++ 2M", "karras")),
        ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "exponential")),
        ("DPM++ 2M SGM Uniform", ("DPM++ 2M", "sgm_uniform")),
        ("Euler Uniform", ("Euler", "uniform")),
        ("DPM++ 3M SDE Polyexponential", ("DPM++ 3M SDE", "polyexponential")),
        ("Euler Align Your Steps", ("Euler", "align_your_steps")),
        ("Euler KL Optimal", ("Euler", "kl_optimal")),
        ("UniPC Simple", ("UniPC", "simple")),
        ("LMS Normal", ("LMS", "normal")),
        ("Euler DDIM", ("Euler", "ddim")),
        ("Heun Beta", ("Heun", "beta")),
        ("Karras", ("Karras", None)),
        ("DPM++ 2Mkarras", ("DPM++ 2Mkarras", None)),
    ],
)
def test_split_sampler_knows_the_scheduler_suffixes(
    name: str, split: tuple[str, str | None]
) -> None:
    assert split_sampler(name) == split


def test_with_seed_pixels_cost_and_repr() -> None:
    job = parse_request("img2img", img2img(width=1024, height=512, steps=30, batch_size=2))
    assert job.with_seed(42).seed == 42
    assert job.with_seed(42).init_image is job.init_image
    for bad in (-1, 2**32, True):
        with pytest.raises(ValueError, match="seed"):
            job.with_seed(bad)
    assert job.pixels == 1024 * 512
    assert job.cost == 30 * 2 * 2
    assert "init_image" not in repr(job) and len(repr(job)) < 500


# --- the package ---------------------------------------------------------------------------------


def test_the_schema_imports_without_the_network() -> None:
    """A backend imports the schema; the job protocol, and the Host with it, stay unloaded."""
    code = (
        "import sys\n"
        "from sdcn_p2p.jobs import JobRequest, JobResult, Progress, Queued, split_sampler\n"
        "print(sorted(m for m in sys.modules if m.startswith('sdcn_p2p')))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for module in ("sdcn_p2p.host", "sdcn_p2p.connection", "sdcn_p2p.jobs.protocol"):
        assert f"'{module}'" not in loaded, loaded
    assert "'sdcn_p2p.jobs.schema'" in loaded
