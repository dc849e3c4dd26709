"""How far apart honest pictures and lies are, as the spot checks compare them (`gateway.compare`).

Runs real jobs through the diffusers backend on the tiny random SD 1.x pipeline
(`sdcn_p2p.testing.tinysd`, built offline) and compares each job's picture, as the gateway's
spot checks do, with:

- honest pairs, the same job and seed on another "device": float32 with 1 torch thread against
  float32 with 2 threads, against bfloat16 (1 thread), and bfloat16 1 against 2 threads;
- each kind of lie, against the honest float32 picture: random noise; one fixed image (another
  job's picture); fewer steps than asked (half, and 5 fewer); another model (the same
  architecture, other weights); another seed (a provider that ignores the seed). The liar that
  is honest 80 % of the time and sends noise otherwise lies like the noise one.

For each measure (pHash bits out of 64, the 32x32 thumbnail's mean absolute difference, and a
64-bit dHash for comparison) it prints the distribution of each kind of pair, and the margin:
the nearest lie against the farthest honest pair. `gateway.compare.Thresholds` are chosen in
that margin. CUDA float16 needs a GPU and is not measured here.

Usage: python benchmarks/trust_distances.py [--jobs 16] [--size 128] [--steps 20] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from PIL import Image

from gateway.compare import (
    Distance,
    Fingerprint,
    Thresholds,
    fingerprint,
    hash_distance,
    pixel_distance,
)
from sdcn_p2p.backends.diffusers import DiffusersConfig, open_diffusers_backend
from sdcn_p2p.jobs import JobRequest

PROMPTS = (
    "a lighthouse at dusk",
    "a red fox in the snow",
    "portrait of an old sailor",
    "a bowl of fruit, still life",
    "city street at night, rain",
    "mountains over a lake",
    "a cat on a windowsill",
    "an astronaut riding a horse",
)
SAMPLERS = ("Euler a", "DPM++ 2M Karras", "DDIM", "Euler", "UniPC", "PLMS")
HONEST = ("f32 1t / f32 2t", "f32 1t / bf16 1t", "bf16 1t / bf16 2t", "f32 2t / bf16 2t")
LIES = ("noise", "fixed image", "half the steps", "5 steps fewer", "another model", "another seed")


def dhash(png: bytes) -> int:
    """A 64-bit difference hash (9x8 greyscale, each pixel against its right neighbour)."""
    with Image.open(io.BytesIO(png)) as image:
        grey = image.convert("L").resize((9, 8), Image.Resampling.BOX).tobytes()
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (grey[row * 9 + col] > grey[row * 9 + col + 1])
    return bits


def noise_png(side: int, rng: random.Random) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(out, "PNG")
    return out.getvalue()


def jobs(count: int, size: int, steps: int) -> list[JobRequest]:
    return [
        JobRequest(
            "txt2img",
            "tiny-sd",
            PROMPTS[i % len(PROMPTS)],
            seed=1000 + i,
            sampler_name=SAMPLERS[i % len(SAMPLERS)],
            steps=steps,
            width=size,
            height=size,
            cfg_scale=7.0,
        )
        for i in range(count)
    ]


async def render(backend, job: JobRequest, threads: int) -> bytes:  # type: ignore[no-untyped-def]
    import torch

    torch.set_num_threads(threads)
    output = await backend.generate(job, lambda step, total: None)
    return output.images[0]


async def run_jobs(args: argparse.Namespace, models: Path) -> dict[str, list[tuple]]:
    from dataclasses import replace

    rng = random.Random(args.seed)
    pairs: dict[str, list[tuple]] = {name: [] for name in HONEST + LIES}
    for sampler in SAMPLERS:
        pairs[f"f32 / bf16, {sampler}"] = []

    def add(name: str, a: bytes, b: bytes) -> None:
        fa, fb = fingerprint(a), fingerprint(b)
        pairs[name].append(_distances(fa, fb, dhash(a), dhash(b)))

    f32 = DiffusersConfig(models, device="cpu", dtype="float32", hash_cache=models / "h.json")
    bf16 = replace(f32, dtype="bfloat16")
    work = jobs(args.jobs, args.size, args.steps)
    async with (
        open_diffusers_backend(f32) as full,
        open_diffusers_backend(bf16) as half,
    ):
        await full.capabilities()
        await half.capabilities()
        honest: list[bytes] = []
        for index, job in enumerate(work):
            a1 = await render(full, job, 1)
            a2 = await render(full, job, 2)
            b1 = await render(half, job, 1)
            b2 = await render(half, job, 2)
            honest.append(a1)
            add(HONEST[0], a1, a2)
            add(HONEST[1], a1, b1)
            add(f"f32 / bf16, {job.sampler_name}", a1, b1)
            add(HONEST[2], b1, b2)
            add(HONEST[3], a2, b2)
            add("noise", a1, noise_png(args.size, rng))
            add("half the steps", a1, await render(full, replace(job, steps=job.steps // 2), 1))
            add("5 steps fewer", a1, await render(full, replace(job, steps=job.steps - 5), 1))
            add("another model", a1, await render(full, replace(job, model="tiny-sd-b"), 1))
            add("another seed", a1, await render(full, replace(job, seed=job.seed + 1), 1))
            if index:
                add("fixed image", a1, honest[0])
            print(f"  job {index + 1}/{len(work)} done", file=sys.stderr)
    return pairs


def _distances(a: Fingerprint, b: Fingerprint, da: int, db: int) -> tuple[int, float, int]:
    return hash_distance(a, b), pixel_distance(a, b), (da ^ db).bit_count()


MEASURES = ("phash_bits", "pixel", "dhash_bits")


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def report(pairs: dict[str, list[tuple]]) -> dict[str, object]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, rows in pairs.items():
        if rows:
            table[name] = {m: summary([row[i] for row in rows]) for i, m in enumerate(MEASURES)}
    # What the default thresholds make of each pair: the fraction judged the same picture.
    thresholds = Thresholds()
    same = {
        name: sum(thresholds.same(Distance(row[0], row[1])) for row in rows) / len(rows)
        for name, rows in pairs.items()
        if rows
    }
    margins = {}
    for measure in MEASURES:
        honest_max = max(table[name][measure]["max"] for name in HONEST)
        nearest = min(LIES, key=lambda name: table[name][measure]["min"])
        margins[measure] = {
            "honest_max": honest_max,
            "nearest_lie": nearest,
            "lie_min": table[nearest][measure]["min"],
        }
    return {
        "pairs": table,
        "judged_same": same,
        "margins": margins,
        "thresholds": {"max_bits": thresholds.max_bits, "max_pixel": thresholds.max_pixel},
        "count": {k: len(v) for k, v in pairs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="width and height (multiple of 8)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import torch

    from sdcn_p2p.testing.tinysd import write_tiny_models

    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder) / "models"
        write_tiny_models(models, name="tiny-sd", seed=0)
        write_tiny_models(models, name="tiny-sd-b", seed=1)
        pairs = trio.run(run_jobs, args, models)
    result = report(pairs)
    result.update(
        jobs=args.jobs,
        size=args.size,
        steps=args.steps,
        torch=torch.__version__,
        real_seconds=round(time.perf_counter() - started, 1),
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"tiny SD 1.x, {args.jobs} jobs of {args.steps} steps at {args.size}x{args.size}, "
        f"torch {torch.__version__} on CPU; distances min / median / p95 / max"
    )
    print(
        f"{'pair':26}{'pHash bits (of 64)':>20}{'thumbnail MAD':>32}{'dHash bits':>20}"
        f"{'judged same':>13}"
    )
    for name, row in result["pairs"].items():  # type: ignore[attr-defined]
        cells = []
        for measure in MEASURES:
            s = row[measure]
            fmt = "{:.3f}" if measure == "pixel" else "{:.0f}"
            cells.append(" / ".join(fmt.format(s[k]) for k in ("min", "median", "p95", "max")))
        judged = result["judged_same"][name]  # type: ignore[index]
        print(f"{name:26}{cells[0]:>20}{cells[1]:>32}{cells[2]:>20}{judged:>13.0%}")
    for name, margin in result["margins"].items():  # type: ignore[attr-defined]
        print(
            f"{name:12} farthest honest {margin['honest_max']:.3f}, nearest lie "
            f"{margin['lie_min']:.3f} ({margin['nearest_lie']})"
        )
    print(f"judged the same: within {Thresholds()}; real time {result['real_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
