"""The job schema and ``/sdcn/job/2.0.0``, shared by the provider and the gateway.

One stream per job. The client sends one message and never FIN: closing or resetting the
stream cancels the job. The provider answers with any number of ``queued`` and ``progress``
messages, then one ``result`` or ``error``::

    client    {"type": "job", "job": JobRequest.to_wire(), "deadline": seconds left}
    provider  {"type": "queued", "position": jobs ahead of this one}
              {"type": "progress", "step": i, "total": n}
              {"type": "result", "images": [png bytes, ...],
               "info": {"seed", "model", "provider", "queue_ms", "run_ms", "backend", ...}}
              {"type": "error", "code": JobError code, "message": str}

Job parameters are strict: an unknown, missing or mistyped field is refused with
``JobError("bad_request", "<field>: <what is wrong>")``, because a parameter silently ignored
gives the wrong picture. JSON and msgpack types are exact: bool is not a number, an int field
refuses floats (even ``512.0``), float fields take ints, null is never a default. Unknown keys
in a message envelope are ignored (room for metadata); unknown message types are refused.
Replies are decoded strictly and with bounds; anything malformed is a ProtocolError.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import trio
from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from sdcn_p2p.connection import Stream
from sdcn_p2p.errors import JobError, ProtocolError
from sdcn_p2p.host import Host
from sdcn_p2p.identity import PeerId
from sdcn_p2p.wire.messages import expect_map, pack

__all__ = [
    "JOB",
    "KINDS",
    "MAX_BATCH_SIZE",
    "MAX_IMAGE_SIDE",
    "MAX_INIT_IMAGE_BYTES",
    "MAX_JOB_MESSAGE",
    "MAX_LORAS",
    "MAX_PROMPT_CHARS",
    "MAX_RESULT_IMAGE_BYTES",
    "SCHEDULERS",
    "JobRequest",
    "JobResult",
    "Progress",
    "Queued",
    "check_result_images",
    "decode_reply",
    "error_message",
    "job_message",
    "parse_job_message",
    "progress_message",
    "queued_message",
    "request_job",
    "result_message",
    "split_sampler",
]

JOB = "/sdcn/job/2.0.0"
#: Cap on one message of the job protocol, in bytes.
MAX_JOB_MESSAGE = 64 * 1024 * 1024
#: Cap on an init image's encoded bytes (before base64).
MAX_INIT_IMAGE_BYTES = 50 * 1024 * 1024
#: Longest side of an init image, in pixels.
MAX_IMAGE_SIDE = 4096
#: Cap on one result image (PNG), in bytes.
MAX_RESULT_IMAGE_BYTES = 32 * 1024 * 1024
KINDS = ("txt2img", "img2img")
MAX_BATCH_SIZE = 4
MAX_LORAS = 8
MAX_PROMPT_CHARS = 8000
_MAX_NAME_CHARS = 256
_MAX_SAMPLER_CHARS = 64
_MAX_SEED = 2**32 - 1
_MAX_INFO_BYTES = 64 * 1024
_MAX_ERROR_CHARS = 2000
_MAX_QUEUE_POSITION = 2**31
_MAX_PROGRESS_TOTAL = 100_000
_MAX_DEADLINE = 86_400.0
_INFO_FIELDS: dict[str, type] = {
    "seed": int,
    "model": str,
    "provider": str,
    "queue_ms": int,
    "run_ms": int,
    "backend": str,
}

#: A1111 (1.9 and later) scheduler labels a sampler name may end with, and the scheduler name
#: each stands for in the webui API.
SCHEDULERS: dict[str, str] = {
    "Karras": "karras",
    "Exponential": "exponential",
    "Polyexponential": "polyexponential",
    "SGM Uniform": "sgm_uniform",
    "Simple": "simple",
    "Normal": "normal",
    "DDIM": "ddim",
    "Beta": "beta",
    "Uniform": "uniform",
    "KL Optimal": "kl_optimal",
    "Align Your Steps": "align_your_steps",
}
# Longest first, so that "SGM Uniform" wins over "Uniform".
_SCHEDULER_SUFFIXES = sorted(SCHEDULERS, key=len, reverse=True)


def split_sampler(name: str) -> tuple[str, str | None]:
    """Split an A1111 sampler name into (sampler, scheduler name or None).

    "DPM++ 2M Karras" gives ("DPM++ 2M", "karras"); "Euler a" and "DDIM" stay whole.
    """
    for label in _SCHEDULER_SUFFIXES:
        base = name.removesuffix(" " + label)
        if base != name and base.strip():
            return base, SCHEDULERS[label]
    return name, None


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One txt2img or img2img job, with the SDCN API's parameters.

    The constructor trusts its arguments; `from_api` and `from_wire` validate everything,
    including decoding the init image (CPU work: up to about a second for a large image, so
    async code should call them through ``trio.to_thread.run_sync``).
    """

    kind: str
    model: str
    prompt: str
    negative_prompt: str = ""
    loras: tuple[tuple[str, float], ...] = ()
    seed: int = -1
    sampler_name: str = "Euler a"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    init_image: bytes | None = field(default=None, repr=False)  # img2img: PNG, JPEG or WebP
    denoising_strength: float = 0.75  # img2img only

    @classmethod
    def from_api(cls, kind: str, data: Mapping[str, Any]) -> JobRequest:
        """Validate an SDCN API body (parsed JSON): `init_image` is base64, `data:` prefix allowed.

        Raises JobError("bad_request", "<field>: ...").
        """
        return _parse(kind, data, wire=False)

    @classmethod
    def from_wire(cls, obj: Any) -> JobRequest:
        """Validate a job as `to_wire` encodes it. Raises JobError("bad_request", ...)."""
        if not isinstance(obj, dict):
            raise _bad("job", f"must be a map, got {_type_name(obj)}")
        return _parse(obj.get("kind"), {k: v for k, v in obj.items() if k != "kind"}, wire=True)

    def to_wire(self) -> dict[str, Any]:
        """Return the job as plain data for msgpack; the init image stays raw bytes."""
        obj: dict[str, Any] = {
            "kind": self.kind,
            "model": self.model,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "loras": [[name, weight] for name, weight in self.loras],
            "seed": self.seed,
            "sampler_name": self.sampler_name,
            "steps": self.steps,
            "cfg_scale": self.cfg_scale,
            "width": self.width,
            "height": self.height,
            "batch_size": self.batch_size,
        }
        if self.kind == "img2img":
            obj["init_image"] = self.init_image
            obj["denoising_strength"] = self.denoising_strength
        return obj

    def with_seed(self, seed: int) -> JobRequest:
        """Return a copy with a concrete seed (0 to 2**32 - 1); ValueError otherwise."""
        if type(seed) is not int or not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to {_MAX_SEED}, got {seed!r}")
        return replace(self, seed=seed)

    @property
    def pixels(self) -> int:
        """Pixels in one image of the job."""
        return self.width * self.height

    @property
    def cost(self) -> float:
        """Work in 512x512 steps: steps * batch_size * width * height / 512**2."""
        return self.steps * self.batch_size * self.pixels / (512 * 512)


# --- validation --------------------------------------------------------------------------------

_COMMON_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "negative_prompt",
        "loras",
        "seed",
        "sampler_name",
        "steps",
        "cfg_scale",
        "width",
        "height",
        "batch_size",
    }
)
_IMG2IMG_FIELDS = frozenset({"init_image", "denoising_strength"})
_FIELDS = {"txt2img": _COMMON_FIELDS, "img2img": _COMMON_FIELDS | _IMG2IMG_FIELDS}
_DATA_URL = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
# Base64 of the largest init image accepted; longer text is refused before decoding.
_MAX_BASE64_CHARS = (MAX_INIT_IMAGE_BYTES + 2) // 3 * 4
_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in JobRequest.__dataclass_fields__.values() if f.name != "kind"
}


def _bad(name: str, problem: str) -> JobError:
    return JobError("bad_request", f"{name}: {problem}")


_TYPE_NAMES = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    bytes: "bytes",
    list: "an array",
    tuple: "an array",
    dict: "an object",
}


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _parse(kind: object, data: Mapping[Any, Any], *, wire: bool) -> JobRequest:
    if not isinstance(kind, str) or kind not in KINDS:
        raise _bad("kind", f"must be 'txt2img' or 'img2img', got {kind!r:.40}")
    if not isinstance(data, Mapping):
        raise _bad("request", f"must be an object, got {_type_name(data)}")
    allowed = _FIELDS[kind]
    unknown = sorted(str(key) for key in data if key not in allowed)
    for name in unknown:
        if name in _IMG2IMG_FIELDS:
            raise _bad(name, "only allowed for img2img")
    if unknown:
        listed = ", ".join(name[:40] for name in unknown[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise _bad(listed + more, "unknown field" + ("s" if len(unknown) > 1 else ""))
    for name in ("model", "prompt") + (("init_image",) if kind == "img2img" else ()):
        if name not in data:
            raise _bad(name, "is required")

    def get(name: str) -> Any:
        return data.get(name, _DEFAULTS[name])

    request = JobRequest(
        kind=kind,
        model=_text("model", data["model"], _MAX_NAME_CHARS, non_empty=True),
        prompt=_text("prompt", data["prompt"], MAX_PROMPT_CHARS),
        negative_prompt=_text("negative_prompt", get("negative_prompt"), MAX_PROMPT_CHARS),
        loras=_loras(get("loras")),
        seed=_integer("seed", get("seed"), -1, _MAX_SEED),
        sampler_name=_text("sampler_name", get("sampler_name"), _MAX_SAMPLER_CHARS, non_empty=True),
        steps=_integer("steps", get("steps"), 1, 150),
        cfg_scale=_number("cfg_scale", get("cfg_scale"), 0, 30),
        width=_integer("width", get("width"), 64, 2048, multiple=8),
        height=_integer("height", get("height"), 64, 2048, multiple=8),
        batch_size=_integer("batch_size", get("batch_size"), 1, MAX_BATCH_SIZE),
        denoising_strength=_number("denoising_strength", get("denoising_strength"), 0, 1),
    )
    if kind == "txt2img":
        return request
    # Last, so that a cheap mistake is reported without decoding an image first.
    raw = data["init_image"]
    image = _image_bytes(raw) if wire else _decode_base64(raw)
    _check_image(image)
    return replace(request, init_image=image)


def _text(name: str, value: object, max_chars: int, *, non_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _bad(name, f"must be a string, got {_type_name(value)}")
    if non_empty and not value.strip():
        raise _bad(name, "must not be empty")
    if len(value) > max_chars:
        raise _bad(name, f"must be at most {max_chars} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: JSON allows "\ud800", UTF-8 does not
        raise _bad(name, "is not valid Unicode text") from None
    return value


def _integer(name: str, value: object, low: int, high: int, *, multiple: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {_type_name(value)}")
    if not low <= value <= high or value % multiple:
        every = f"a multiple of {multiple} " if multiple > 1 else ""
        raise _bad(name, f"must be {every}from {low} to {high}, got {value}")
    return value


def _number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"must be a number, got {_type_name(value)}")
    if not low <= value <= high:  # also refuses NaN
        raise _bad(name, f"must be from {low} to {high}, got {value!r:.20}")
    return float(value)


def _loras(value: object) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, list | tuple):
        raise _bad("loras", f"must be an array of [name, weight] pairs, got {_type_name(value)}")
    if len(value) > MAX_LORAS:
        raise _bad("loras", f"at most {MAX_LORAS} are allowed, got {len(value)}")
    loras: dict[str, float] = {}
    for index, item in enumerate(value):
        where = f"loras[{index}]"
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise _bad(where, "must be a [name, weight] pair")
        name = _text(where + " name", item[0], _MAX_NAME_CHARS, non_empty=True)
        # The webui takes LoRAs as <lora:name:weight> tags: these would break out of one.
        if any(c in name for c in "<>:"):
            raise _bad(where + " name", "must not contain '<', '>' or ':'")
        if name in loras:
            raise _bad(where, f"{name!r:.60} is listed twice")
        loras[name] = _number(where + " weight", item[1], -5, 5)
    return tuple(loras.items())


def _image_bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise _bad("init_image", f"must be bytes, got {_type_name(value)}")
    return value


def _decode_base64(value: object) -> bytes:
    if not isinstance(value, str):
        raise _bad("init_image", f"must be a base64 string, got {_type_name(value)}")
    if prefix := _DATA_URL.match(value):
        value = value[prefix.end() :]
    if len(value) > _MAX_BASE64_CHARS:
        raise _bad("init_image", f"is over {MAX_INIT_IMAGE_BYTES // 2**20} MiB")
    try:
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            # Some encoders wrap lines: whitespace is tolerated, nothing else.
            return base64.b64decode("".join(value.split()), validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise _bad("init_image", "is not valid base64") from None


# What Pillow raises for corrupt or truncated data, whichever decoder it is in.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    struct.error,
    Image.DecompressionBombError,
)


def _check_image(data: bytes) -> None:
    """Refuse `data` unless it is a PNG, JPEG or WebP image of at most 4096² that decodes.

    The size comes from the header, checked before any pixel (or canvas) is allocated.
    """
    if len(data) > MAX_INIT_IMAGE_BYTES:
        raise _bad("init_image", f"is over {MAX_INIT_IMAGE_BYTES // 2**20} MiB")
    opener: Callable[[io.BytesIO], Image.Image]
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        opener = PngImagePlugin.PngImageFile
    elif data.startswith(b"\xff\xd8\xff"):
        opener = JpegImagePlugin.JpegImageFile
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        # Pillow's WebP decoder allocates its canvas as it opens: check the header first.
        _check_size(_webp_size(data))
        opener = WebPImagePlugin.WebPImageFile
    else:
        raise _bad("init_image", "must be a PNG, JPEG or WebP image")
    try:
        with opener(io.BytesIO(data)) as image:
            _check_size(image.size)
            image.load()
    except _DECODE_ERRORS as exc:
        raise _bad("init_image", f"cannot be decoded: {exc}") from None


def _check_size(size: tuple[int, int]) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise _bad("init_image", "declares no size")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        limit = f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}"
        raise _bad("init_image", f"must be at most {limit} pixels, got {width}x{height}")


def _webp_size(data: bytes) -> tuple[int, int]:
    """The canvas size a WebP header declares (RFC 9649); (0, 0) if it declares none."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return 0, 0


# --- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobResult:
    """A finished job: PNG images (one per batch item) and the provider's info."""

    images: list[bytes] = field(repr=False)
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Progress:
    """The provider finished `step` of `total` sampling steps."""

    step: int
    total: int


@dataclass(frozen=True, slots=True)
class Queued:
    """The job waits for a slot behind `position` others."""

    position: int


def job_message(job: JobRequest, deadline: float) -> dict[str, Any]:
    """The client's request: `job` to finish within `deadline` seconds (at most a day)."""
    return {"type": "job", "job": job.to_wire(), "deadline": min(float(deadline), _MAX_DEADLINE)}


def parse_job_message(obj: Any) -> tuple[JobRequest, float]:
    """Return the job and its deadline (seconds from now) from a client's request.

    Raises JobError("bad_request", ...). Decodes the init image: see `JobRequest`.
    """
    if not isinstance(obj, dict) or obj.get("type") != "job":
        raise _bad("type", "the request must be a map of type 'job'")
    deadline = _number("deadline", obj.get("deadline"), 0, _MAX_DEADLINE)
    return JobRequest.from_wire(obj.get("job")), deadline


def queued_message(position: int) -> dict[str, Any]:
    """Tell the client its job waits behind `position` others."""
    return {"type": "queued", "position": min(max(position, 0), _MAX_QUEUE_POSITION)}


def progress_message(step: int, total: int) -> dict[str, Any]:
    """Report `step` of `total` done; both are clamped into range, so odd reports are safe."""
    total = min(max(total, 1), _MAX_PROGRESS_TOTAL)
    return {"type": "progress", "step": min(max(step, 0), total), "total": total}


def result_message(images: list[bytes], info: Mapping[str, Any]) -> dict[str, Any]:
    """The final reply: PNG `images` and `info` (seed, model, provider, queue_ms, run_ms,
    backend, plus any extras).

    Raises JobError("backend_failed") if the images are not 1 to 4 PNGs that fit the limits,
    ValueError if `info` lacks a field or is over 64 KiB (a bug in the caller).
    """
    _check_info(info, ValueError)
    if not 1 <= len(images) <= MAX_BATCH_SIZE:
        raise JobError("backend_failed", f"the backend returned {len(images)} images")
    for image in images:
        if not image.startswith(_PNG_SIGNATURE) or len(image) > MAX_RESULT_IMAGE_BYTES:
            raise JobError("backend_failed", "the backend returned an image that is not a PNG")
    if sum(map(len, images)) + _MAX_INFO_BYTES + 1024 > MAX_JOB_MESSAGE:
        raise JobError("backend_failed", "the images are too large to send")
    return {"type": "result", "images": list(images), "info": dict(info)}


def error_message(code: str, message: str) -> dict[str, Any]:
    """The final reply for a failed job; a long `message` is cut short."""
    if code not in JobError.CODES:
        raise ValueError(f"unknown job error code {code!r}")
    return {"type": "error", "code": code, "message": message[:_MAX_ERROR_CHARS]}


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_info(info: object, error: Callable[[str], Exception]) -> dict[str, Any]:
    if not isinstance(info, Mapping):
        raise error("info must be a map")
    for name, kind in _INFO_FIELDS.items():
        value = info.get(name)
        if type(value) is not kind or (kind is int and value < 0):
            raise error(f"info field {name!r} must be a non-negative {kind.__name__}")
    if any(type(key) is not str for key in info):
        raise error("info keys must be strings")
    try:
        size = len(pack(dict(info)))
    except (TypeError, ValueError, OverflowError) as exc:
        raise error(f"info cannot be encoded: {exc}") from None
    if size > _MAX_INFO_BYTES:
        raise error(f"info is {size} bytes, over the cap of {_MAX_INFO_BYTES}")
    return dict(info)


def decode_reply(obj: Any) -> Queued | Progress | JobResult | JobError:
    """Decode a provider's reply; an error reply comes back as the JobError it reports.

    Raises ProtocolError for anything malformed, out of bounds or of an unknown type.
    """
    kind = expect_map(obj, {"type": str})["type"]
    if kind == "progress":
        expect_map(obj, {"step": int, "total": int})
        step, total = obj["step"], obj["total"]
        if not 0 <= step <= total <= _MAX_PROGRESS_TOTAL or total < 1:
            raise ProtocolError(f"bad progress {step}/{total}")
        return Progress(step, total)
    if kind == "queued":
        position = expect_map(obj, {"position": int})["position"]
        if not 0 <= position <= _MAX_QUEUE_POSITION:
            raise ProtocolError(f"bad queue position {position}")
        return Queued(position)
    if kind == "result":
        expect_map(obj, {"images": list, "info": dict})
        images = obj["images"]
        if not 1 <= len(images) <= MAX_BATCH_SIZE:
            raise ProtocolError(f"a result must hold 1 to {MAX_BATCH_SIZE} images")
        for image in images:
            if type(image) is not bytes or not image.startswith(_PNG_SIGNATURE):
                raise ProtocolError("result images must be PNG bytes")
            if len(image) > MAX_RESULT_IMAGE_BYTES:
                raise ProtocolError(f"a result image is over {MAX_RESULT_IMAGE_BYTES} bytes")
        return JobResult(images, _check_info(obj["info"], ProtocolError))
    if kind == "error":
        expect_map(obj, {"code": str, "message": str})
        code, message = obj["code"], obj["message"]
        if code not in JobError.CODES:
            raise ProtocolError(f"unknown job error code {code!r:.40}")
        if len(message) > _MAX_ERROR_CHARS:
            raise ProtocolError(f"error message over {_MAX_ERROR_CHARS} characters")
        return JobError(code, message)
    raise ProtocolError(f"unknown job reply type {kind!r:.40}")


# --- client ------------------------------------------------------------------------------------


async def request_job(
    host: Host,
    peer: PeerId,
    job: JobRequest,
    *,
    deadline: float,
    on_progress: Callable[[int, int], None] | None = None,
) -> JobResult:
    """Run `job` on provider `peer` and return its images, within `deadline` seconds from now.

    `on_progress(step, total)` is called for each progress reply; queued replies are checked
    and dropped. Raises JobError with the provider's code for an error reply, or with "timeout"
    when the deadline passes; ProtocolError for a malformed reply or a stream that ends
    without a result; DialError, UnsupportedProtocol and StreamReset (a
    trio.BrokenResourceError) as the host raises them. Cancelling, or any failure, resets the
    stream, which cancels the job on the provider.
    """
    start = trio.current_time()
    try:
        with trio.fail_after(max(deadline, 0)):
            stream = await host.new_stream(peer, JOB, max_message_size=MAX_JOB_MESSAGE)
            async with stream:
                try:
                    left = deadline - (trio.current_time() - start)
                    result = await _exchange(stream, job_message(job, left), on_progress)
                except BaseException:
                    stream.reset()
                    raise
    except trio.TooSlowError:
        raise JobError("timeout", f"no result within {deadline:g} s") from None
    if len(result.images) != job.batch_size:
        raise ProtocolError(f"asked for {job.batch_size} images, got {len(result.images)}")
    if sum(map(len, result.images)) > _THREAD_IMAGE_BYTES:
        await trio.to_thread.run_sync(check_result_images, result.images)
    else:
        check_result_images(result.images)
    return result


# Result images above this many bytes (all together) are checked in a worker thread.
_THREAD_IMAGE_BYTES = 1024 * 1024


def check_result_images(images: list[bytes]) -> None:
    """Check that each of a provider's result `images` is a whole PNG of at most 4096².

    Reads the header and every chunk's CRC without decoding pixels (a few ms per MB: run
    it in a thread for large results). Raises ProtocolError naming the first bad image, so a
    provider that sends garbage behind a PNG signature is caught before a client sees it.
    """
    for index, image in enumerate(images):
        if not image.startswith(_PNG_SIGNATURE):
            raise ProtocolError(f"result image {index} is not a PNG")
        try:
            with PngImagePlugin.PngImageFile(io.BytesIO(image)) as png:
                width, height = png.size
                if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
                    raise ProtocolError(f"result image {index} is {width}x{height} pixels")
                png.verify()
        except _DECODE_ERRORS as exc:
            raise ProtocolError(f"result image {index} is not a valid PNG: {exc}") from None


async def _exchange(
    stream: Stream, request: dict[str, Any], on_progress: Callable[[int, int], None] | None
) -> JobResult:
    await stream.send_message(request)
    # No send_eof: to the provider, FIN means "stop".
    while True:
        try:
            reply = decode_reply(await stream.receive_message())
        except trio.EndOfChannel:
            raise ProtocolError("the provider closed the stream without a result") from None
        if isinstance(reply, JobResult):
            return reply
        if isinstance(reply, JobError):
            raise reply
        if isinstance(reply, Progress) and on_progress is not None:
            on_progress(reply.step, reply.total)
