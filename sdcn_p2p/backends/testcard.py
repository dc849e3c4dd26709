"""The test card: a backend that needs no GPU, for demos, tests and benchmarks.

Its picture is drawn from a SHA-256 of the job's parameters (prompt, negative prompt, seed,
model, sampler, steps, cfg, LoRAs and weights, size): the same job gives the same PNG bytes,
and a change to any of them gives a visibly different picture, so a job routed to the wrong
model shows. The card names itself ("SDCN TEST CARD") and prints the parameters; its adverts
say backend "testcard" and its results carry ``{"testcard": True}``.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from PIL import Image, ImageDraw, ImageFont

from sdcn_p2p.backends import Capabilities, JobOutput, ResolvedJob
from sdcn_p2p.errors import ConfigError, JobError, JobErrorCode
from sdcn_p2p.jobs import SCHEDULERS, JobRequest
from sdcn_p2p.records import LoraInfo, ModelInfo

__all__ = [
    "SAMPLERS",
    "TestcardBackend",
    "TestcardConfig",
    "open_testcard_backend",
    "render_card",
]

#: AUTOMATIC1111's samplers (1.10), without scheduler suffixes.
SAMPLERS = (
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 2S a",
    "DPM++ 3M SDE",
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM fast",
    "DPM adaptive",
    "Restart",
    "DDIM",
    "DDIM CFG++",
    "PLMS",
    "UniPC",
    "LCM",
)
#: The speed an instant test card advertises (it/s at 512x512).
INSTANT_SPEED = 1000.0
# Jobs up to this many pixels (all images together) are drawn without a worker thread.
_INLINE_PIXELS = 256 * 256
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True, slots=True)
class TestcardConfig:
    """The models, LoRAs and samplers the card offers, and how fast it pretends to be.

    With `speed` (iterations per second at 512x512) a job takes ``job.cost / speed`` seconds
    of trio time, reporting each step; None draws at once.
    """

    __test__ = False  # not a pytest test class, despite its name

    models: tuple[str, ...] = ("testcard-v1",)
    loras: tuple[str, ...] = ()
    samplers: tuple[str, ...] = SAMPLERS
    speed: float | None = None

    def __post_init__(self) -> None:
        for kind, names in (("model", self.models), ("LoRA", self.loras)):
            for name in names:
                if not isinstance(name, str) or not name.strip() or len(name) > 256:
                    raise ConfigError(f"test card {kind} names must be 1 to 256 characters")
        if not self.models:
            raise ConfigError("the test card needs at least one model")
        if not self.samplers or not all(
            isinstance(s, str) and 0 < len(s) <= 64 for s in self.samplers
        ):
            raise ConfigError("the test card needs samplers, each named in 1 to 64 characters")
        if self.speed is not None and not 0 < self.speed <= 1e4:
            raise ConfigError(f"test card speed must be in (0, 10000] it/s, got {self.speed}")


class TestcardBackend:
    """The test card as a `Backend`. Holds no resources: one can be made directly."""

    __test__ = False

    name = "testcard"

    def __init__(self, config: TestcardConfig = TestcardConfig()) -> None:
        self.config = config
        self._capabilities = Capabilities(
            backend=self.name,
            models=tuple(
                ModelInfo(m, f"{m} (SDCN test card)", _short_hash(m), "testcard")
                for m in config.models
            ),
            loras=tuple(LoraInfo(lo, _short_hash(lo)) for lo in config.loras),
            samplers=tuple(config.samplers),
            schedulers=tuple(SCHEDULERS.values()),
            speed=config.speed if config.speed is not None else INSTANT_SPEED,
        )

    async def capabilities(self) -> Capabilities:
        await trio.lowlevel.checkpoint()
        return self._capabilities

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        """Draw one card per batch item, after ``job.cost / speed`` seconds when `speed` is set."""
        resolved = self._capabilities.resolve(job)
        if self.config.speed is None:
            await trio.lowlevel.checkpoint()
        else:
            start, duration = trio.current_time(), job.cost / self.config.speed
            for step in range(1, job.steps + 1):
                await trio.sleep_until(start + duration * step / job.steps)
                progress(step, job.steps)
        seeds = [job.seed + i for i in range(job.batch_size)]
        if job.pixels * job.batch_size <= _INLINE_PIXELS:
            images = _render_job(job, resolved, seeds)
        else:
            images = await trio.to_thread.run_sync(_render_job, job, resolved, seeds)
        if self.config.speed is None:
            progress(job.steps, job.steps)
        return JobOutput(images, {"testcard": True, "seeds": seeds})


@asynccontextmanager
async def open_testcard_backend(
    config: TestcardConfig = TestcardConfig(),
) -> AsyncIterator[TestcardBackend]:
    """A `TestcardBackend`, opened like the backends that hold resources."""
    yield TestcardBackend(config)


def _render_job(job: JobRequest, resolved: ResolvedJob, seeds: list[int]) -> list[bytes]:
    loras = ", ".join(f"{lora.name}:{weight!r}" for lora, weight in resolved.loras)
    images = []
    for seed in seeds:
        params = {
            "model": resolved.model.name,
            "sampler": job.sampler_name,
            "seed": seed,
            "steps": job.steps,
            "cfg": job.cfg_scale,
            "loras": loras or "none",
            "prompt": job.prompt,
            "negative": job.negative_prompt,
        }
        try:
            images.append(
                render_card(
                    params,
                    job.width,
                    job.height,
                    init_image=job.init_image if job.kind == "img2img" else None,
                    denoising_strength=job.denoising_strength,
                )
            )
        except _IMAGE_ERRORS as exc:
            raise JobError(
                JobErrorCode.BACKEND_FAILED, f"cannot decode the init image: {exc}"
            ) from exc
    return images


def render_card(
    params: Mapping[str, Any],
    width: int,
    height: int,
    *,
    title: str = "SDCN TEST CARD",
    init_image: bytes | None = None,
    denoising_strength: float = 1.0,
) -> bytes:
    """Draw the card of `params` (JSON-able values) as PNG bytes; same arguments, same bytes.

    Colours and shapes come from a SHA-256 of `params` and the size; the title and the
    ``key: value`` lines are printed on it. With `init_image` (PNG, JPEG or WebP bytes) the
    card is blended over the image resized to the card: `denoising_strength` 0 gives the
    image, 1 the card. Raises what Pillow raises for an image it cannot decode. CPU work: a
    few milliseconds at 512x512, tens at 2048x2048.
    """
    canonical = json.dumps([dict(params), width, height], sort_keys=True, default=str)
    digest = hashlib.sha256(canonical.encode()).digest()
    card = _draw(digest, width, height, [title, *(f"{k}: {v}" for k, v in params.items())])
    if init_image is not None:
        with Image.open(io.BytesIO(init_image)) as source:
            base = source.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        card = Image.blend(base, card, denoising_strength)
    out = io.BytesIO()
    card.save(out, "PNG", compress_level=1)
    return out.getvalue()


# Colour bars of a broadcast test card, drawn along the top of every card.
_BARS = (
    (192, 192, 192),
    (192, 192, 0),
    (0, 192, 192),
    (0, 192, 0),
    (192, 0, 192),
    (192, 0, 0),
    (0, 0, 192),
    (16, 16, 16),
)


def _draw(digest: bytes, width: int, height: int, lines: list[str]) -> Image.Image:
    rng = random.Random(digest)

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    mask = Image.linear_gradient("L").transpose(rng.choice(list(Image.Transpose)))
    card = Image.composite(
        Image.new("RGB", (width, height), colour()),
        Image.new("RGB", (width, height), colour()),
        mask.resize((width, height), Image.Resampling.BILINEAR),
    )
    draw = ImageDraw.Draw(card, "RGBA")
    unit = min(width, height)
    for _ in range(14):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(unit // 12 + 1, unit // 3 + 2)
        box = (x - r, y - r, x + r, y + r)
        fill = (*colour(), rng.randrange(140, 256))
        shape = rng.randrange(4)
        if shape == 0:
            draw.ellipse(box, fill=fill)
        elif shape == 1:
            draw.rectangle(box, fill=fill)
        elif shape == 2:
            draw.regular_polygon((x, y, r), rng.randrange(3, 8), rng.randrange(360), fill=fill)
        else:
            draw.pieslice(box, rng.randrange(360), rng.randrange(360), fill=fill)
    bar = width / len(_BARS)
    for i, rgb in enumerate(_BARS):
        draw.rectangle((round(i * bar), 0, round((i + 1) * bar), height // 16), fill=rgb)

    size = max(8, unit // 40)
    font = ImageFont.load_default(size=size)
    max_chars = max(8, int(width / (size * 0.6)))
    shown = [line if len(line) <= max_chars else line[: max_chars - 1] + "…" for line in lines]
    pitch = size + size // 3
    top = height - pitch * len(shown) - size // 2
    draw.rectangle((0, top - size // 3, width, height), fill=(0, 0, 0, 170))
    for i, line in enumerate(shown):
        ink = (255, 220, 0) if i == 0 else (255, 255, 255)
        draw.text((size // 2, top + i * pitch), line, font=font, fill=ink)
    return card


def _short_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:10]
