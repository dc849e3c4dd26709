"""The job schema: what a txt2img or img2img job asks for, validated field by field.

Job parameters are strict: an unknown, missing or mistyped field is refused with
``JobError("bad_request", "<field>: <what is wrong>")``, because a parameter silently ignored
gives the wrong picture. JSON and msgpack types are exact: bool is not a number, an int field
refuses floats (even ``512.0``), float fields take ints, null is never a default.

Also what a job gives back (`JobResult`) and reports on its way (`Queued`, `Progress`), and
the sampler names jobs use: A1111's, which may end with a scheduler label
("DPM++ 2M Karras"). No I/O here: a backend imports this without importing the network.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sdcn_p2p.errors import JobError
from sdcn_p2p.jobs.images import check_init_image

__all__ = [
    "JOB_ID_CHARS",
    "KINDS",
    "MAX_BATCH_SIZE",
    "MAX_JOB_ID_CHARS",
    "MAX_LORAS",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "SCHEDULERS",
    "JobRequest",
    "JobResult",
    "Progress",
    "Queued",
    "check_job_id",
    "check_number",
    "new_job_id",
    "split_sampler",
    "type_name",
]

KINDS = ("txt2img", "img2img")
#: What a job id may hold (at most MAX_JOB_ID_CHARS of them): enough for a UUID, a ULID or a
#: gateway's own ids with a part number, nothing that needs escaping in a log line.
JOB_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")
MAX_JOB_ID_CHARS = 64
MAX_BATCH_SIZE = 4
MAX_LORAS = 8
MAX_PROMPT_CHARS = 8000
#: Largest seed; a job's seed is -1 (draw one) or 0 to MAX_SEED.
MAX_SEED = 2**32 - 1
_MAX_NAME_CHARS = 256
_MAX_SAMPLER_CHARS = 64

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

    The constructor trusts its arguments; `from_fields` and `from_wire` validate everything,
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
    def from_fields(
        cls,
        kind: object,
        data: Mapping[Any, Any],
        *,
        init_image: Callable[[object], bytes] | None = None,
    ) -> JobRequest:
        """Validate a job of `kind` from its fields (the SDCN API's names and defaults).

        `init_image` turns the ``init_image`` field into the image's bytes (the gateway's
        decodes base64), raising JobError("bad_request", "init_image: ..."); by default the
        field must be bytes already. It is called last, so that a cheap mistake is reported
        without decoding an image first. Raises JobError("bad_request", "<field>: ...").
        """
        return _parse(kind, data, init_image or _image_bytes)

    @classmethod
    def from_wire(cls, obj: Any) -> JobRequest:
        """Validate a job as `to_wire` encodes it. Raises JobError("bad_request", ...)."""
        if not isinstance(obj, dict):
            raise _bad("job", f"must be a map, got {type_name(obj)}")
        rest = {k: v for k, v in obj.items() if k != "kind"}
        return _parse(obj.get("kind"), rest, _image_bytes)

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
        """Return a copy with a concrete seed (0 to MAX_SEED); ValueError otherwise."""
        if type(seed) is not int or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
        return replace(self, seed=seed)

    @property
    def pixels(self) -> int:
        """Pixels in one image of the job."""
        return self.width * self.height

    @property
    def cost(self) -> float:
        """Work in 512x512 steps: steps * batch_size * width * height / 512**2."""
        return self.steps * self.batch_size * self.pixels / (512 * 512)

    @property
    def megapixel_steps(self) -> float:
        """Work in megapixel-steps (AI Horde's unit): steps * batch_size * pixels / 10**6."""
        return self.steps * self.batch_size * self.pixels / 1e6


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
_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in JobRequest.__dataclass_fields__.values() if f.name != "kind"
}
_bad = JobError.bad_request

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


def type_name(value: object) -> str:
    """How an error message names the type of `value` ("an integer", "null", ...)."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _parse(
    kind: object, data: Mapping[Any, Any], init_image: Callable[[object], bytes]
) -> JobRequest:
    if not isinstance(kind, str) or kind not in KINDS:
        raise _bad("kind", f"must be 'txt2img' or 'img2img', got {kind!r:.40}")
    if not isinstance(data, Mapping):
        raise _bad("request", f"must be an object, got {type_name(data)}")
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
        seed=_integer("seed", get("seed"), -1, MAX_SEED),
        sampler_name=_text("sampler_name", get("sampler_name"), _MAX_SAMPLER_CHARS, non_empty=True),
        steps=_integer("steps", get("steps"), 1, 150),
        cfg_scale=check_number("cfg_scale", get("cfg_scale"), 0, 30),
        width=_integer("width", get("width"), 64, 2048, multiple=8),
        height=_integer("height", get("height"), 64, 2048, multiple=8),
        batch_size=_integer("batch_size", get("batch_size"), 1, MAX_BATCH_SIZE),
        denoising_strength=check_number("denoising_strength", get("denoising_strength"), 0, 1),
    )
    if kind == "txt2img":
        return request
    # Last, so that a cheap mistake is reported without decoding an image first.
    image = init_image(data["init_image"])
    check_init_image(image)
    return replace(request, init_image=image)


def _text(name: str, value: object, max_chars: int, *, non_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _bad(name, f"must be a string, got {type_name(value)}")
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
        raise _bad(name, f"must be an integer, got {type_name(value)}")
    if not low <= value <= high or value % multiple:
        every = f"a multiple of {multiple} " if multiple > 1 else ""
        raise _bad(name, f"must be {every}from {low} to {high}, got {value}")
    return value


def check_job_id(value: object) -> str:
    """`value` if it is a job id: 1 to MAX_JOB_ID_CHARS of JOB_ID_CHARS.

    Raises JobError("bad_request", "job_id: ...").
    """
    if type(value) is not str:
        raise _bad("job_id", f"must be a string, got {type_name(value)}")
    if not 1 <= len(value) <= MAX_JOB_ID_CHARS or not JOB_ID_CHARS.issuperset(value):
        raise _bad(
            "job_id",
            f"must be 1 to {MAX_JOB_ID_CHARS} letters, digits or '._:-', got {value!r:.80}",
        )
    return value


def new_job_id(rng: random.Random | None = None) -> str:
    """A fresh job id: 16 hex digits drawn from `rng` (by default the system's randomness)."""
    return f"{(rng or _SYSTEM_RANDOM).getrandbits(64):016x}"


_SYSTEM_RANDOM = random.SystemRandom()


def check_number(name: str, value: object, low: float, high: float) -> float:
    """`value` as a float if it is a number (not a bool) from `low` to `high`.

    Raises JobError("bad_request", "<name>: ...").
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"must be a number, got {type_name(value)}")
    if not low <= value <= high:  # also refuses NaN
        raise _bad(name, f"must be from {low} to {high}, got {value!r:.20}")
    return float(value)


def _loras(value: object) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, list | tuple):
        raise _bad("loras", f"must be an array of [name, weight] pairs, got {type_name(value)}")
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
        loras[name] = check_number(where + " weight", item[1], -5, 5)
    return tuple(loras.items())


def _image_bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise _bad("init_image", f"must be bytes, got {type_name(value)}")
    return value
