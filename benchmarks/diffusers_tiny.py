"""Time the diffusers backend on the tiny random SD 1.x pipeline (`sdcn_p2p.testing.tinysd`).

Builds the tiny models offline in a temporary models dir, opens the real backend and runs real
jobs through `DiffusersBackend.generate`, reporting:

- import: seconds to import torch and diffusers (the backend's opener does this);
- load: seconds to load a pipeline, from the diffusers folder and from the single-file
  checkpoint: a job's time on a fresh backend less the same job's time once loaded;
- per step at 64x64 and 256x256 (batch 1, Euler a): (time of a 25-step job - time of a 5-step
  job) / 20, so the text encoder and VAE decode are left out; the median of --repeats;
- a whole 20-step job at each size;
- peak memory: the process's peak RSS (MiB) and, on CUDA, torch's peak allocation per size.

Figures depend on the torch thread count (--threads) and on what else runs on the machine.

Usage: python benchmarks/diffusers_tiny.py [--device cpu|cuda|mps] [--dtype auto|float32|...]
       [--threads N] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from sdcn_p2p.backends.diffusers import DiffusersConfig, open_diffusers_backend
from sdcn_p2p.jobs import JobRequest


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def job(model: str, steps: int, side: int) -> JobRequest:
    return JobRequest(
        "txt2img", model, "a lighthouse at dusk", seed=1, steps=steps, width=side, height=side
    )


async def timed(backend, request: JobRequest) -> float:
    start = time.perf_counter()
    await backend.generate(request, lambda step, total: None)
    return time.perf_counter() - start


async def measure(args: argparse.Namespace, models: Path) -> dict:
    import torch

    results: dict = {}
    config = DiffusersConfig(
        models,
        device=args.device,
        dtype=args.dtype,
        hash_cache=models.parent / "hashes.json",
    )
    for model, key in (("tiny-sd", "load_folder_s"), ("tiny-sd-single", "load_single_file_s")):
        loads = []
        for _ in range(args.repeats):
            async with open_diffusers_backend(config) as backend:
                await backend.capabilities()
                first = await timed(backend, job(model, 1, 64))
                warm = await timed(backend, job(model, 1, 64))
                loads.append(first - warm)
        results[key] = statistics.median(loads)

    async with open_diffusers_backend(config) as backend:
        await backend.capabilities()
        results["device"] = backend.device
        results["dtype"] = backend.dtype
        await timed(backend, job("tiny-sd", 2, 64))  # load and warm up
        for side in (64, 256):
            if backend.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            per_step = []
            for _ in range(args.repeats):
                long = await timed(backend, job("tiny-sd", 25, side))
                short = await timed(backend, job("tiny-sd", 5, side))
                per_step.append((long - short) / 20)
            results[f"step_s_{side}"] = statistics.median(per_step)
            results[f"job20_s_{side}"] = statistics.median(
                [await timed(backend, job("tiny-sd", 20, side)) for _ in range(args.repeats)]
            )
            if backend.device == "cuda":
                results[f"cuda_peak_mb_{side}"] = torch.cuda.max_memory_allocated() / 2**20
        caps = await backend.capabilities()
        results["vram_total_mb"] = caps.vram_total_mb
        results["vram_free_mb"] = caps.vram_free_mb
    results["peak_rss_mb"] = rss_mb()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps", "auto"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    start = time.perf_counter()
    import diffusers  # noqa: F401
    import torch

    results: dict = {"import_s": time.perf_counter() - start}
    torch.set_num_threads(args.threads)
    results["threads"] = args.threads
    results["rss_after_import_mb"] = rss_mb()
    from sdcn_p2p.testing.tinysd import write_tiny_models

    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder) / "models"
        start = time.perf_counter()
        write_tiny_models(models)
        results["build_s"] = time.perf_counter() - start
        results.update(trio.run(measure, args, models))

    if args.json:
        print(json.dumps(results, sort_keys=True))
        return 0
    print(
        f"tiny SD 1.x pipeline on {results['device']} ({results['dtype']}), "
        f"{results['threads']} torch threads, median of {args.repeats}"
    )
    rows = [
        ("import torch + diffusers", f"{results['import_s']:.2f} s"),
        ("build and save the tiny models", f"{results['build_s']:.2f} s"),
        ("load from diffusers folder", f"{results['load_folder_s'] * 1000:.0f} ms"),
        ("load from single file", f"{results['load_single_file_s'] * 1000:.0f} ms"),
    ]
    for side in (64, 256):
        rows.append((f"one step at {side}x{side}", f"{results[f'step_s_{side}'] * 1000:.1f} ms"))
        rows.append((f"20-step job at {side}x{side}", f"{results[f'job20_s_{side}']:.3f} s"))
        if f"cuda_peak_mb_{side}" in results:
            rows.append(
                (f"CUDA peak at {side}x{side}", f"{results[f'cuda_peak_mb_{side}']:.0f} MiB")
            )
    rows.append(
        (
            "peak RSS (after import)",
            f"{results['peak_rss_mb']:.0f} MiB ({results['rss_after_import_mb']:.0f} MiB)",
        )
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
