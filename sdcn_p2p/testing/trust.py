"""Backends that jitter or lie, for the trust tests and benchmark (test support only).

- `JitterBackend` wraps an honest backend and adds this "device's" jitter to each picture:
  per-pixel noise of up to `amplitude` levels and a smooth brightness drift of up to 2 levels,
  drawn from its `seed` and the picture. PyTorch promises no bit-exact results across devices
  and dtypes, so honest providers differ like this (measured on the tiny diffusers model:
  ``benchmarks/trust_distances.py``); the default is larger than what was measured.
- `LyingBackend` wraps a backend and returns wrong pictures, one `Lie` each. It takes the
  time its inner backend takes for what it does run, so it looks as fast as an honest one
  (the one running fewer steps looks faster, as it would).
"""

from __future__ import annotations

import enum
import hashlib
import io
import random
from collections.abc import Callable
from dataclasses import replace

from PIL import Image, ImageChops

from sdcn_p2p.backends import Backend, Capabilities, JobOutput
from sdcn_p2p.jobs import JobRequest

__all__ = ["JitterBackend", "Lie", "LyingBackend", "jitter", "noise_png"]


def noise_png(width: int, height: int, rng: random.Random) -> bytes:
    """A PNG of uniform random RGB noise."""
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)).save(
        out, "PNG", compress_level=1
    )
    return out.getvalue()


def jitter(png: bytes, seed: int, amplitude: int = 8) -> bytes:
    """`png` with a device's jitter: uniform noise of ±`amplitude` levels per pixel and
    channel, and a smooth drift of ±2 levels; the same (png, seed), the same bytes."""
    rng = random.Random(hashlib.sha256(seed.to_bytes(8, "big", signed=True) + png).digest())
    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
    size = rgb.size
    span = 2 * amplitude + 1
    noise = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    noise = noise.point([v * span // 256 for v in range(256)] * 3)
    drift = Image.frombytes("RGB", (4, 4), rng.randbytes(48))
    drift = drift.point([v * 5 // 256 for v in range(256)] * 3)
    drift = drift.resize(size, Image.Resampling.BILINEAR)
    out = ImageChops.add(ImageChops.add(rgb, noise, offset=-amplitude), drift, offset=-2)
    buffer = io.BytesIO()
    out.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


class JitterBackend:
    """An honest backend on another "device": its pictures carry `jitter` of `seed`."""

    def __init__(self, inner: Backend, seed: int, *, amplitude: int = 8) -> None:
        self.inner = inner
        self.seed = seed
        self.amplitude = amplitude
        self.name = getattr(inner, "name", "jitter")

    async def capabilities(self) -> Capabilities:
        return await self.inner.capabilities()

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        output = await self.inner.generate(job, progress)
        images = [jitter(image, self.seed, self.amplitude) for image in output.images]
        return JobOutput(images, output.info)


class Lie(enum.StrEnum):
    """How a `LyingBackend` lies."""

    NOISE = "noise"  # random noise
    FIXED = "fixed image"  # the first picture it drew, for every job
    FEWER_STEPS = "fewer steps"  # half the steps asked for
    OTHER_MODEL = "other model"  # a cheaper model than the one asked for
    IGNORES_SEED = "ignores seed"  # always seed 0
    SOMETIMES = "noise 20%"  # honest 80 % of the time, noise otherwise


class LyingBackend:
    """A backend returning wrong pictures (see `Lie`); `other_model` (which `inner` must
    offer) is what `Lie.OTHER_MODEL` runs instead; `seed` draws its noise and when
    `Lie.SOMETIMES` lies."""

    def __init__(
        self, inner: Backend, lie: Lie, *, seed: int = 0, other_model: str | None = None
    ) -> None:
        if lie is Lie.OTHER_MODEL and other_model is None:
            raise ValueError("a liar running another model needs other_model")
        self.inner = inner
        self.lie = lie
        self.other_model = other_model
        self.name = getattr(inner, "name", "liar")
        self.lies = 0  # jobs answered with a wrong picture
        self.lied_seeds: set[int] = set()  # the seeds of those jobs
        self._rng = random.Random(seed)
        self._fixed: bytes | None = None

    async def capabilities(self) -> Capabilities:
        return await self.inner.capabilities()

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        lie = self.lie
        if lie is Lie.FEWER_STEPS:
            ran = replace(job, steps=max(1, job.steps // 2))
        elif lie is Lie.OTHER_MODEL:
            assert self.other_model is not None
            ran = replace(job, model=self.other_model)
        elif lie is Lie.IGNORES_SEED:
            ran = job.with_seed(0)
        else:
            ran = job
        output = await self.inner.generate(ran, progress)
        images = list(output.images)
        if lie is Lie.NOISE or (lie is Lie.SOMETIMES and self._rng.random() < 0.2):
            images = [noise_png(job.width, job.height, self._rng) for _ in images]
        elif lie is Lie.FIXED:
            if self._fixed is None:  # its first picture is a true one
                self._fixed = images[0]
                return output
            images = [self._fixed] * len(images)
        elif lie is Lie.SOMETIMES:
            return output
        self.lies += 1
        self.lied_seeds.add(job.seed)
        return JobOutput(images, output.info)
