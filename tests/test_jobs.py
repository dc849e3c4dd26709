from __future__ import annotations

import base64
import functools
import io
import random
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, WebPImagePlugin

from sdcn_p2p.connection import Stream
from sdcn_p2p.errors import JobError, ProtocolError, StreamReset, UnsupportedProtocol
from sdcn_p2p.host import Host
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs import (
    JOB,
    MAX_INIT_IMAGE_BYTES,
    MAX_JOB_MESSAGE,
    JobRequest,
    JobResult,
    Progress,
    Queued,
    decode_reply,
    error_message,
    job_message,
    parse_job_message,
    progress_message,
    queued_message,
    request_job,
    result_message,
    split_sampler,
)
from sdcn_p2p.testing import open_memory_hosts
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
    job = JobRequest.from_api("txt2img", TXT2IMG)
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
    refused("loras[1]", lambda: JobRequest.from_api("txt2img", TXT2IMG_EXAMPLE))


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,", "DATA:image/jpeg;base64,"])
def test_the_seed_img2img_example_with_a_base64_png(prefix: str) -> None:
    job = JobRequest.from_api("img2img", img2img(init_image=prefix + b64(image())))
    assert job.kind == "img2img"
    assert job.init_image == image()
    assert job.denoising_strength == 0.55


def test_line_wrapped_base64_is_accepted() -> None:
    wrapped = base64.encodebytes(image()).decode()
    assert "\n" in wrapped
    assert JobRequest.from_api("img2img", img2img(init_image=wrapped)).init_image == image()


def test_only_model_and_prompt_are_required() -> None:
    job = JobRequest.from_api("txt2img", {"model": "m", "prompt": ""})
    assert job == JobRequest(kind="txt2img", model="m", prompt="")
    job = JobRequest.from_api("img2img", {"model": "m", "prompt": "", "init_image": b64(image())})
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
        JobRequest.from_api("txt2img", body)
    JobRequest.from_api("img2img", img2img(denoising_strength=0))
    JobRequest.from_api("img2img", img2img(denoising_strength=1))


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
    refused(field, lambda: JobRequest.from_api(kind, body))
    # The same mistake on the wire gets the same answer (images are bytes there).
    if "init_image" not in changes:
        wire = body | {"kind": kind}
        if kind == "img2img":
            wire["init_image"] = image()
        refused(field, lambda: JobRequest.from_wire(wire))


def test_an_unknown_kind_or_a_body_that_is_not_an_object_is_refused() -> None:
    refused("kind", lambda: JobRequest.from_api("upscale", TXT2IMG))
    refused("request", lambda: JobRequest.from_api("txt2img", [TXT2IMG]))  # type: ignore[arg-type]
    refused("job", lambda: JobRequest.from_wire([TXT2IMG]))
    refused("kind", lambda: JobRequest.from_wire(TXT2IMG))


def test_cheap_mistakes_are_reported_before_the_image_is_decoded(no_decoding: None) -> None:
    refused("steps", lambda: JobRequest.from_api("img2img", img2img(steps=0)))


# --- init images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_init_images_are_accepted(fmt: str) -> None:
    data = image(fmt, (96, 80))
    assert JobRequest.from_api("img2img", img2img(init_image=b64(data))).init_image == data


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
    refused("init_image", lambda: JobRequest.from_api("img2img", img2img(init_image=b64(data))))


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
    error = refused(
        "init_image", lambda: JobRequest.from_api("img2img", img2img(init_image=b64(bomb)))
    )
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
    job = JobRequest.from_api("img2img", img2img(init_image=b64(data)))
    assert job.init_image == data
    assert JobRequest.from_wire(unpack(pack(job.to_wire()), max_size=MAX_JOB_MESSAGE)) == job


def test_a_60_mb_init_image_is_refused_by_size_before_decoding(no_decoding: None) -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(60 * 2**20)
    error = refused(
        "init_image", lambda: JobRequest.from_wire(txt2img(kind="img2img", init_image=data))
    )
    assert "50 MiB" in error.message
    text = "A" * (len(data) * 4 // 3)
    refused("init_image", lambda: JobRequest.from_api("img2img", img2img(init_image=text)))
    # Just over the cap, in base64 that decodes.
    just_over = b64(bytes(MAX_INIT_IMAGE_BYTES + 1))
    refused("init_image", lambda: JobRequest.from_api("img2img", img2img(init_image=just_over)))


# --- the wire form and helpers ------------------------------------------------------------------


def test_to_wire_and_from_wire_round_trip_through_msgpack() -> None:
    for job in (
        JobRequest.from_api("txt2img", TXT2IMG),
        JobRequest.from_api("img2img", img2img(init_image=b64(image("JPEG")))),
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
    job = JobRequest.from_api("img2img", img2img(width=1024, height=512, steps=30, batch_size=2))
    assert job.with_seed(42).seed == 42
    assert job.with_seed(42).init_image is job.init_image
    for bad in (-1, 2**32, True):
        with pytest.raises(ValueError, match="seed"):
            job.with_seed(bad)
    assert job.pixels == 1024 * 512
    assert job.cost == 30 * 2 * 2
    assert "init_image" not in repr(job) and len(repr(job)) < 500


# --- messages ------------------------------------------------------------------------------------

INFO = {
    "seed": 7,
    "model": "m",
    "provider": "12D3KooWtest",
    "queue_ms": 0,
    "run_ms": 1500,
    "backend": "testcard",
}


def over_the_wire(message: dict[str, Any]) -> Any:
    return unpack(pack(message), max_size=MAX_JOB_MESSAGE)


def test_parse_job_message_returns_the_job_and_its_deadline() -> None:
    job = JobRequest.from_api("img2img", img2img())
    assert parse_job_message(over_the_wire(job_message(job, 12.5))) == (job, 12.5)
    assert job_message(job, 10**9)["deadline"] == 86_400


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("type", ["job"]),
        ("type", {"type": "jobs", "job": {}, "deadline": 1.0}),
        ("deadline", {"type": "job", "job": TXT2IMG | {"kind": "txt2img"}}),
        ("deadline", {"type": "job", "job": TXT2IMG | {"kind": "txt2img"}, "deadline": -1}),
        ("deadline", {"type": "job", "job": TXT2IMG | {"kind": "txt2img"}, "deadline": True}),
        ("deadline", {"type": "job", "job": TXT2IMG | {"kind": "txt2img"}, "deadline": 1e9}),
        ("job", {"type": "job", "deadline": 1.0}),
        ("width", {"type": "job", "job": txt2img(kind="txt2img", width=7), "deadline": 1.0}),
    ],
)
def test_parse_job_message_refuses_bad_requests(field: str, message: Any) -> None:
    refused(field, lambda: parse_job_message(message))


def test_replies_built_by_the_provider_decode_on_the_client() -> None:
    png = image()
    assert decode_reply(over_the_wire(queued_message(3))) == Queued(3)
    assert decode_reply(over_the_wire(progress_message(5, 20))) == Progress(5, 20)
    result = decode_reply(over_the_wire(result_message([png, png], INFO | {"testcard": True})))
    assert result == JobResult([png, png], INFO | {"testcard": True})
    error = decode_reply(over_the_wire(error_message("busy", "queue full")))
    assert isinstance(error, JobError)
    assert (error.code, error.message) == ("busy", "queue full")


def test_reply_builders_keep_within_the_limits() -> None:
    assert progress_message(30, 20) == {"type": "progress", "step": 20, "total": 20}
    assert progress_message(-1, 0) == {"type": "progress", "step": 0, "total": 1}
    assert queued_message(-5)["position"] == 0
    assert len(error_message("backend_failed", "x" * 10_000)["message"]) == 2000
    with pytest.raises(ValueError, match="code"):
        error_message("oops", "")
    for images in ([], [image()] * 5, [image("JPEG")]):
        with pytest.raises(JobError) as info:
            result_message(images, INFO)
        assert info.value.code == "backend_failed"
    for info in ({k: v for k, v in INFO.items() if k != "seed"}, INFO | {"run_ms": -1}):
        with pytest.raises(ValueError, match="info"):
            result_message([image()], info)
    with pytest.raises(ValueError, match="info"):
        result_message([image()], INFO | {"extra": "x" * 100_000})


PNG = image()
MALFORMED_REPLIES = [
    ["progress"],
    {"kind": "progress"},
    {"type": "done"},
    {"type": "progress", "step": 3, "total": 2},
    {"type": "progress", "step": -1, "total": 2},
    {"type": "progress", "step": 0, "total": 0},
    {"type": "progress", "step": True, "total": 2},
    {"type": "progress", "step": 1.0, "total": 2},
    {"type": "queued", "position": -1},
    {"type": "queued"},
    {"type": "result", "images": [], "info": INFO},
    {"type": "result", "images": [PNG] * 5, "info": INFO},
    {"type": "result", "images": [b"GIF89a"], "info": INFO},
    {"type": "result", "images": ["iVBORw0KGgo="], "info": INFO},
    {"type": "result", "images": PNG, "info": INFO},
    {"type": "result", "images": [PNG]},
    {"type": "result", "images": [PNG], "info": INFO | {"seed": "7"}},
    {"type": "result", "images": [PNG], "info": INFO | {"queue_ms": -1}},
    {"type": "result", "images": [PNG], "info": INFO | {"x": b"x" * 100_000}},
    {"type": "result", "images": [PNG], "info": {**INFO, b"bin": 1}},
    {"type": "error", "code": "exploded", "message": "boom"},
    {"type": "error", "code": "busy"},
    {"type": "error", "code": "busy", "message": "x" * 2001},
]


@pytest.mark.parametrize("reply", MALFORMED_REPLIES)
def test_malformed_replies_are_protocol_errors(reply: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(reply)


# --- request_job ---------------------------------------------------------------------------------

Handler = Callable[[Stream], Awaitable[None]]
JOB_REQUEST = JobRequest(kind="txt2img", model="m", prompt="a dog", steps=2)


@asynccontextmanager
async def provider(handler: Handler | None) -> AsyncIterator[tuple[Host, PeerId]]:
    async with open_memory_hosts(2) as (client, server):
        if handler is not None:
            server.set_handler(JOB, handler, max_message_size=MAX_JOB_MESSAGE)
        client.peerstore.add_addrs(server.peer_id, server.listen_addrs)
        yield client, server.peer_id


async def test_request_job_returns_the_result_and_reports_progress(autojump_clock: Any) -> None:
    seen: dict[str, Any] = {}

    async def handler(stream: Stream) -> None:
        job, deadline = parse_job_message(await stream.receive_message())
        seen.update(job=job, deadline=deadline)
        with trio.move_on_after(1):
            seen["client sent"] = await stream.receive_some()  # no FIN: it would cancel
        await stream.send_message(queued_message(0))
        for step in (1, 2):
            await stream.send_message(progress_message(step, job.steps))
        await stream.send_message(result_message([PNG], INFO))

    progress: list[tuple[int, int]] = []
    async with provider(handler) as (client, peer):
        result = await request_job(
            client, peer, JOB_REQUEST, deadline=30, on_progress=lambda *p: progress.append(p)
        )
    assert result == JobResult([PNG], INFO)
    assert progress == [(1, 2), (2, 2)]
    assert seen["job"] == JOB_REQUEST
    assert 29 < seen["deadline"] <= 30
    assert "client sent" not in seen


async def test_an_error_reply_raises_the_providers_code(autojump_clock: Any) -> None:
    async def handler(stream: Stream) -> None:
        await stream.receive_message()
        await stream.send_message(error_message("busy", "queue full"))

    async with provider(handler) as (client, peer):
        with pytest.raises(JobError) as info:
            await request_job(client, peer, JOB_REQUEST, deadline=30)
    assert (info.value.code, info.value.message) == ("busy", "queue full")


async def test_a_provider_refuses_an_invalid_job_naming_the_field(autojump_clock: Any) -> None:
    async def handler(stream: Stream) -> None:
        try:
            parse_job_message(await stream.receive_message())
        except JobError as exc:
            await stream.send_message(error_message(exc.code, exc.message))

    async with provider(handler) as (client, peer):
        with pytest.raises(JobError) as info:
            bad = JobRequest(kind="txt2img", model="m", prompt="", width=500)
            await request_job(client, peer, bad, deadline=30)
    assert info.value.code == "bad_request"
    assert info.value.message.startswith("width:")


def stalling_handler(ended: list[BaseException], done: trio.Event) -> Handler:
    """A provider that sends one progress message, then waits for the client to go away."""

    async def handler(stream: Stream) -> None:
        await stream.receive_message()
        await stream.send_message(progress_message(1, 2))
        try:
            await stream.receive_some()
        except BaseException as exc:
            ended.append(exc)
            raise
        finally:
            done.set()

    return handler


async def test_the_deadline_raises_timeout_and_resets_the_stream(autojump_clock: Any) -> None:
    ended: list[BaseException] = []
    done = trio.Event()
    async with provider(stalling_handler(ended, done)) as (client, peer):
        start = trio.current_time()
        with pytest.raises(JobError) as info:
            await request_job(client, peer, JOB_REQUEST, deadline=5)
        assert info.value.code == "timeout"
        assert trio.current_time() - start == pytest.approx(5)
        await done.wait()
    assert len(ended) == 1 and isinstance(ended[0], StreamReset)


async def test_a_deadline_already_past_times_out_at_once(autojump_clock: Any) -> None:
    async with provider(None) as (client, peer):
        with pytest.raises(JobError) as info:
            await request_job(client, peer, JOB_REQUEST, deadline=-1)
    assert info.value.code == "timeout"


async def test_cancelling_the_caller_resets_the_stream(autojump_clock: Any) -> None:
    ended: list[BaseException] = []
    done = trio.Event()
    async with provider(stalling_handler(ended, done)) as (client, peer):
        with trio.CancelScope() as scope:
            await request_job(
                client, peer, JOB_REQUEST, deadline=30, on_progress=lambda *_: scope.cancel()
            )
        assert scope.cancelled_caught
        await done.wait()
    assert len(ended) == 1 and isinstance(ended[0], StreamReset)


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(progress_message(1, 2) | {"step": 3}, id="bad-progress"),
        pytest.param(result_message([PNG, PNG], INFO), id="wrong-image-count"),
        pytest.param(None, id="closed-without-result"),
    ],
)
async def test_a_misbehaving_provider_is_a_protocol_error(
    reply: dict[str, Any] | None, autojump_clock: Any
) -> None:
    async def handler(stream: Stream) -> None:
        await stream.receive_message()
        if reply is not None:
            await stream.send_message(reply)

    async with provider(handler) as (client, peer):
        with pytest.raises(ProtocolError):
            await request_job(client, peer, JOB_REQUEST, deadline=30)


async def test_a_peer_without_the_job_protocol_says_so(autojump_clock: Any) -> None:
    async with provider(None) as (client, peer):
        with pytest.raises(UnsupportedProtocol):
            await request_job(client, peer, JOB_REQUEST, deadline=30)


async def test_a_10_mb_img2img_job_crosses_the_wire() -> None:
    size = (1900, 1900)
    picture = Image.frombytes("RGB", size, random.Random(2).randbytes(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", compress_level=0)
    job = JobRequest(kind="img2img", model="m", prompt="", init_image=buffer.getvalue())

    async def handler(stream: Stream) -> None:
        message = await stream.receive_message()
        received, _ = await trio.to_thread.run_sync(parse_job_message, message)
        assert received == job
        await stream.send_message(result_message([PNG], INFO))

    async with provider(handler) as (client, peer):
        result = await request_job(client, peer, job, deadline=60)
    assert result.images == [PNG]
