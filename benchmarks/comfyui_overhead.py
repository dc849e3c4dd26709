"""ComfyUI backend overhead: the CPU the backend adds per image over ComfyUI's raw API calls.

The fake ComfyUI runs in a process of its own, answering every prompt at once (KSampler's
--steps steps send their progress and preview messages, then a fixed 512x512 noise PNG of
~400 KB), so its CPU is not counted. In this process, for one 512x512 image:

- (a) raw: what any ComfyUI client must do: open ``/ws?clientId=``, ``POST /prompt`` a
  prebuilt workflow, read the websocket until the prompt has ended, ``GET /history/{id}``
  and ``GET /view``; with httpx and trio-websocket, as the backend uses;
- (b) backend: ``ComfyuiBackend.generate`` of the same job: resolving names, building the
  workflow, the same calls, progress reporting, checking the PNG.

(a) and (b) alternate job by job (each with a new seed: an identical prompt would come from
ComfyUI's cache). The CPU time of this process (user + system) per image is measured around
each call; added_cpu_ms is the median of b minus the median of a. A batch of --batch images
(one prompt each) is measured too, per image. Aim: added <= 10 ms of CPU per 512x512 image.

Usage: python benchmarks/comfyui_overhead.py [--jobs 200] [--batch 4] [--steps 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import trio
import trio_websocket
from _processes import free_port, spawn, wait_http

from sdcn_p2p.backends.comfyui import ComfyuiBackend, Plan, build_workflow, open_comfyui_backend
from sdcn_p2p.jobs import JobRequest

MODEL = "sd-v1-5"


def serve_fake(bind: str) -> None:
    """The fake ComfyUI process: one checkpoint, a fixed ~400 KB noise PNG per image."""
    from sdcn_p2p.testing.fakecomfyui import FakeComfyui, open_fake_comfyui
    from sdcn_p2p.testing.fakewebui import noise_png

    async def run() -> None:
        fake = FakeComfyui(checkpoints=(f"{MODEL}.safetensors",), png=noise_png())
        async with open_fake_comfyui(fake, bind):
            await trio.sleep_forever()

    trio.run(run)


def job(seed: int, steps: int, batch: int = 1) -> JobRequest:
    return JobRequest(
        kind="txt2img",
        model=MODEL,
        prompt="a lighthouse at dusk",
        seed=seed,
        steps=steps,
        width=512,
        height=512,
        batch_size=batch,
    )


async def raw_image(client: httpx.AsyncClient, url: str, workflow: dict[str, Any]) -> bytes:
    """One image through ComfyUI's API with nothing but the calls it needs."""
    client_id = uuid.uuid4().hex
    ws_url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    async with trio_websocket.open_websocket_url(ws_url, max_message_size=2**26) as ws:
        await ws.get_message()  # status: ComfyUI knows our client id
        body = json.dumps({"prompt": workflow, "client_id": client_id})
        answer = await client.post(
            "/prompt", content=body, headers={"Content-Type": "application/json"}
        )
        prompt_id = answer.json()["prompt_id"]
        while True:
            message = await ws.get_message()
            if isinstance(message, str):
                data = json.loads(message)["data"]
                if "node" in data and data["node"] is None and data["prompt_id"] == prompt_id:
                    break
    entry = (await client.get(f"/history/{prompt_id}")).json()[prompt_id]
    image = entry["outputs"]["9"]["images"][0]
    return (await client.get("/view", params=image)).content


async def cpu_ms(call: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """(CPU ms, wall ms) of `call`."""
    cpu, wall = time.process_time(), time.perf_counter()
    await call()
    return (time.process_time() - cpu) * 1000, (time.perf_counter() - wall) * 1000


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan(f"{MODEL}.safetensors", (), "euler_ancestral", "normal")
    raw_cpu, raw_wall, ours_cpu, ours_wall, batch_cpu = [], [], [], [], []
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as client,
        open_comfyui_backend(url) as backend,
    ):
        await backend.capabilities()
        seed = 0

        async def raw() -> None:
            nonlocal seed
            seed += 1
            await raw_image(client, url, build_workflow(job(seed, args.steps), plan, seed, None))

        async def ours(backend: ComfyuiBackend = backend, batch: int = 1) -> None:
            nonlocal seed
            seed += batch
            output = await backend.generate(job(seed, args.steps, batch), _ignore)
            assert len(output.images) == batch

        for _ in range(5):  # warm up connections and caches
            await raw()
            await ours()
        for _ in range(args.jobs):
            cpu, wall = await cpu_ms(raw)
            raw_cpu.append(cpu)
            raw_wall.append(wall)
            cpu, wall = await cpu_ms(ours)
            ours_cpu.append(cpu)
            ours_wall.append(wall)
        for _ in range(max(1, args.jobs // args.batch)):
            cpu, _ = await cpu_ms(lambda: ours(batch=args.batch))
            batch_cpu.append(cpu / args.batch)
        capabilities_cpu = [(await cpu_ms(backend.capabilities))[0] for _ in range(20)]
    median = statistics.median
    return {
        "raw_cpu_ms": round(median(raw_cpu), 2),
        "backend_cpu_ms": round(median(ours_cpu), 2),
        "added_cpu_ms": round(median(ours_cpu) - median(raw_cpu), 2),
        "added_cpu_ms_mean": round(statistics.fmean(ours_cpu) - statistics.fmean(raw_cpu), 2),
        "raw_wall_ms": round(median(raw_wall), 2),
        "backend_wall_ms": round(median(ours_wall), 2),
        f"batch{args.batch}_cpu_ms_per_image": round(median(batch_cpu), 2),
        "capabilities_cpu_ms": round(median(capabilities_cpu), 2),
        "jobs": args.jobs,
        "steps": args.steps,
    }


def _ignore(step: int, total: int) -> None:
    pass


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sdcn-comfyui-") as tmp, ExitStack() as stack:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        fake = spawn(
            stack,
            [sys.executable, __file__, "--serve-fake", f"127.0.0.1:{port}"],
            Path(tmp) / "log",
        )
        wait_http(f"{url}/system_stats", fake)
        return trio.run(measure, url, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="one-image jobs per path")
    parser.add_argument("--batch", type=int, default=4, help="images in the batch jobs")
    parser.add_argument("--steps", type=int, default=20, help="KSampler steps (progress messages)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve-fake", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake:
        serve_fake(args.serve_fake)
        return 0
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"CPU per 512x512 image, raw ComfyUI calls: {result['raw_cpu_ms']} ms (median)")
    print(f"CPU per 512x512 image, ComfyUI backend:   {result['backend_cpu_ms']} ms (median)")
    print(f"added by the backend: {result['added_cpu_ms']} ms (mean {result['added_cpu_ms_mean']})")
    batched = result[f"batch{args.batch}_cpu_ms_per_image"]
    print(f"  per image in batches of {args.batch}: {batched} ms")
    print(f"wall per image: raw {result['raw_wall_ms']} ms, backend {result['backend_wall_ms']} ms")
    print(f"capabilities(): {result['capabilities_cpu_ms']} ms of CPU (every 30 s)")
    python = sys.version.split()[0]
    print(f"aim: added <= 10 ms ({os.cpu_count()} cores, python {python})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
