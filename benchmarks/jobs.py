"""The job service: event lag, submit time, memory with a long queue, restart time.

- event_lag_ms_p50 / _p99: from a provider's backend reporting a step (the progress frame
  leaves the provider right after) to an SSE client of the gateway reading that step's
  ``progress`` event. One process, loopback: the gateway serves HTTP on 127.0.0.1 and the
  provider dials it over a real WebSocket; the client is httpx, streaming. --lag-jobs jobs of
  --steps steps, one step every 25 ms, one job at a time.
- sync_job_cpu_ms: the CPU (this process's, the store's thread included) the job service
  spends on a sync job beside what the dispatcher does: its record, its events, a 400 KB
  result PNG written behind. In-process, with a stand-in for the dispatcher that answers at
  once; the mean over 500 jobs.
- submit_ms_p50 / _p99: ``POST /v1/jobs`` answered 202, timed by a client in this process
  against an ``sdcn gateway`` process, over the --jobs submissions below.
- gateway_rss_growth_mb_queued: that gateway's RSS once --jobs (10,000, its limit) async
  jobs wait in its queue, less its RSS after the first 50 of them (a warm-up). Its one
  provider (an ``sdcn node`` process, one slot, no queue) takes ages over a job, so all but
  one of them wait.
- restart_s: the gateway is killed with SIGKILL and started again on the same data dir; the
  time from starting the process to its answering GET /v1/jobs/{id} for the last job
  submitted (queued again, with the 10,000 others); the median of --restarts (3) runs.
  start_empty_s is the same for a gateway on an empty data dir: what the process takes to
  start at all.

Usage: python benchmarks/jobs.py [--jobs 10000] [--lag-jobs 20] [--steps 20] [--restarts 3]
       [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, aclosing
from pathlib import Path
from typing import Any

import httpx
import trio
from _processes import free_port, keygen, percentile, rss_mb, sdcn, spawn, wait_http

from gateway.directory import ProviderDirectory
from gateway.dispatch import DispatchResult, JobAssigned, JobProgress
from gateway.jobservice import JobsConfig, open_job_service
from gateway.node import open_gateway
from sdcn_p2p.adverts import AdvertCache
from sdcn_p2p.backends import JobOutput
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.identity import Identity
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.testing import open_loopback_providers

STEP_S = 0.025
WARM_UP = 50
QUEUE_MODEL = "queue-card"


# --- event lag ------------------------------------------------------------------------------------


class StampedBackend(TestcardBackend):
    """A test card that takes a step every STEP_S seconds and notes when it reports each."""

    def __init__(self) -> None:
        super().__init__(TestcardConfig(models=("lag-card",)))
        self.stamps: dict[tuple[int, int], float] = {}

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        for step in range(1, job.steps + 1):
            await trio.sleep(STEP_S)
            self.stamps[(job.seed, step)] = time.perf_counter()
            progress(step, job.steps)
        return await super().generate(job, lambda step, total: None)


async def event_lag(jobs: int, steps: int, data_dir: Path) -> dict[str, float]:
    backend = StampedBackend()
    lags: list[float] = []
    async with (
        open_loopback_providers(backend) as (peer, _),
        open_gateway(peer, http="127.0.0.1:0", jobs=JobsConfig(data_dir=data_dir)) as gateway,
        httpx.AsyncClient(base_url=gateway.urls[0], timeout=60) as http,
    ):
        for index in range(jobs):
            body = {
                "kind": "txt2img",
                "model": "lag-card",
                "prompt": "lag",
                "seed": index,
                "steps": steps,
                "width": 64,
                "height": 64,
            }
            job_id = (await http.post("/v1/jobs", json=body)).json()["id"]
            async with (
                http.stream("GET", f"/v1/jobs/{job_id}/events") as response,
                aclosing(response.aiter_lines()) as lines,
            ):
                name = ""
                async for line in lines:
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: ") and name == "progress":
                        read = time.perf_counter()
                        step = json.loads(line[6:])["step"]
                        lags.append(read - backend.stamps[(index, step)])
    lags_ms = [lag * 1000 for lag in lags]
    return {
        "event_lag_ms_p50": round(percentile(lags_ms, 0.5), 2),
        "event_lag_ms_p99": round(percentile(lags_ms, 0.99), 2),
        "event_lag_samples": len(lags_ms),
        "event_lag_expected": jobs * steps,
    }


# --- what a sync job costs the job service --------------------------------------------------------


class InstantDispatcher:
    """Answers every job at once with a 400 KB PNG, reporting one attempt and one step."""

    def __init__(self) -> None:
        self.png = b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(400_000)
        self.provider = Identity.generate().peer_id

    async def run_batch(
        self,
        jobs: Any,
        *,
        deadline: float | None = None,
        on_event: Any = None,
        verify: bool = False,
        job_id: str | None = None,
    ) -> list[DispatchResult]:
        await trio.lowlevel.checkpoint()
        on_event(JobAssigned(self.provider, 1))
        on_event(JobProgress(jobs[0].steps, jobs[0].steps))
        info = {"seed": 1, "model": "m", "provider": str(self.provider), "run_ms": 1}
        return [DispatchResult([self.png], info)]

    async def check_offered(self, job: JobRequest) -> None:
        await trio.lowlevel.checkpoint()


async def sync_job_cpu(data_dir: Path, jobs: int = 500) -> dict[str, float]:
    directory = ProviderDirectory(AdvertCache(wall_clock=time.time), lambda peer: None)
    config = JobsConfig(data_dir=data_dir)
    async with open_job_service(
        InstantDispatcher(), directory, config, wall_clock=time.time
    ) as service:
        job = JobRequest("txt2img", "m", "a cat", seed=1)
        for _ in range(20):  # warm-up
            await service.run([job], api="sdcn", client="bench")
        start = time.process_time()
        for _ in range(jobs):
            await service.run([job], api="sdcn", client="bench")
        await service._store.wait_flushed()
        spent = time.process_time() - start
    return {"sync_job_cpu_ms": round(spent / jobs * 1000, 3)}


# --- a gateway process with a long queue ----------------------------------------------------------


def queued(workdir: Path, jobs: int, restarts: int) -> dict[str, float]:
    key = workdir / "gateway.key"
    gateway_id = keygen(key)
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}/ws"
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    data = workdir / "data"
    gateway_args = _gateway_args(key, listen, http_port, data)
    provider_args = sdcn(
        "node",
        "--key",
        str(workdir / "provider.key"),
        "--backend",
        "testcard",
        "--testcard-models",
        QUEUE_MODEL,
        "--testcard-speed",
        "0.001",
        "--max-queue",
        "0",
        "--bootstrap",
        f"{listen}/p2p/{gateway_id}",
    )
    body = {"kind": "txt2img", "model": QUEUE_MODEL, "prompt": "wait", "steps": 150}
    result: dict[str, float] = {}
    with ExitStack() as stack:
        gateway = spawn(stack, gateway_args, workdir / "gateway.log")
        spawn(stack, provider_args, workdir / "provider.log")
        wait_http(f"{url}/v1/models", gateway, check=lambda models: bool(models))
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(WARM_UP):  # imports, caches, the first jobs
                assert client.post("/v1/jobs", json=body).status_code == 202
            settle = 2.0 if jobs >= 1000 else 0.2  # the first jobs settle, then the last
            time.sleep(settle)
            before = rss_mb(gateway.pid)
            took = []
            last = ""
            for _ in range(jobs - WARM_UP):
                start = time.perf_counter()
                response = client.post("/v1/jobs", json=body)
                took.append((time.perf_counter() - start) * 1000)
                assert response.status_code == 202, response.text
                last = response.json()["id"]
            time.sleep(settle)
            after = rss_mb(gateway.pid)
            state = client.get(f"/v1/jobs/{last}").json()
        result.update(
            submit_ms_p50=round(percentile(took, 0.5), 2),
            submit_ms_p99=round(percentile(took, 0.99), 2),
            gateway_rss_before_mb=round(before, 1),
            gateway_rss_after_mb=round(after, 1),
            gateway_rss_growth_mb_queued=round(after - before, 1),
            queued_jobs=jobs,
            last_position=state["queue_position"],
        )
        restart_times = []
        for _ in range(restarts):
            gateway.kill()
            gateway.wait()
            took, gateway = time_to_serve(stack, gateway_args, f"{url}/v1/jobs/{last}")
            restart_times.append(took)
        with httpx.Client(timeout=60) as client:
            state = client.get(f"{url}/v1/jobs/{last}").json()
        result["restart_s"] = round(percentile(restart_times, 0.5), 2)
        result["queued_after_restart"] = state["status"] == "queued"
    starts = []
    for _ in range(restarts):
        listen = f"/ip4/127.0.0.1/tcp/{free_port()}/ws"
        empty_args = _gateway_args(key, listen, http_port, Path(tempfile.mkdtemp(dir=workdir)))
        with ExitStack() as stack:
            starts.append(time_to_serve(stack, empty_args, f"{url}/healthz")[0])
    result["start_empty_s"] = round(percentile(starts, 0.5), 2)
    return result


def _gateway_args(key: Path, listen: str, port: int, data: Path) -> list[str]:
    return sdcn(
        "gateway",
        "--key",
        str(key),
        "--listen",
        listen,
        "--http",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data),
        "--no-limits",  # one client submitting 10,000 jobs
    )


def time_to_serve(
    stack: ExitStack, args: list[str], url: str
) -> tuple[float, subprocess.Popen[bytes]]:
    """Start `args`; return the seconds until `url` answered 200, and the process."""
    start = time.perf_counter()
    process = spawn(stack, args, Path(tempfile.mkdtemp()) / "gateway.log")
    wait_http(url, process, poll=0.01)  # polled finely: the time is the figure
    return time.perf_counter() - start, process


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sdcn-jobs-bench-") as tmp:
        workdir = Path(tmp)
        result: dict[str, Any] = trio.run(event_lag, args.lag_jobs, args.steps, workdir / "lag")
        result.update(trio.run(sync_job_cpu, workdir / "sync"))
        result.update(queued(workdir, args.jobs, args.restarts))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="async jobs queued")
    parser.add_argument("--lag-jobs", type=int, default=20, help="jobs timed for event lag")
    parser.add_argument("--steps", type=int, default=20, help="steps of each of those")
    parser.add_argument(
        "--restarts", type=int, default=3, help="restarts timed; the median is reported"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    rows = [
        ("event lag p50 (ms)", result["event_lag_ms_p50"], ""),
        ("event lag p99 (ms)", result["event_lag_ms_p99"], "<= 20"),
        ("job service CPU per sync job (ms)", result["sync_job_cpu_ms"], ""),
        ("submit p50 (ms)", result["submit_ms_p50"], "<= 5"),
        ("submit p99 (ms)", result["submit_ms_p99"], ""),
        (
            f"gateway RSS growth, {result['queued_jobs']} queued (MB)",
            result["gateway_rss_growth_mb_queued"],
            "<= 300",
        ),
        (f"restart with {result['queued_jobs']} stored jobs (s)", result["restart_s"], "<= 3"),
        ("  start on an empty data dir (s)", result["start_empty_s"], ""),
    ]
    print(f"{'figure':48}{'value':>10}{'aim':>10}")
    for name, value, aim in rows:
        print(f"{name:48}{value!s:>10}{aim:>10}")
    print(
        f"event lag over {result['event_lag_samples']} of {result['event_lag_expected']} steps "
        f"(python {sys.version.split()[0]})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
