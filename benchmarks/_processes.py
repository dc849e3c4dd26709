"""Helpers for benchmarks that run SDCN parts as separate processes on loopback (Linux)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 120.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` now, in MB (10**6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for process {pid}")


def sdcn(*args: str, log_level: str = "warning") -> list[str]:
    """The command line of ``sdcn ARGS`` run by this Python."""
    return [sys.executable, "-m", "sdcn_p2p", "--log-level", log_level, *args]


def spawn(stack: ExitStack, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start `args` with output to `log`; `stack` terminates it (then kills it) on exit."""
    out = stack.enter_context(log.open("wb"))
    process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    stack.callback(stop)
    return process


def keygen(path: Path) -> str:
    """Create an identity key at `path`; return its peer id."""
    done = subprocess.run(sdcn("keygen", "--key", str(path)), capture_output=True, check=True)
    return done.stdout.decode().strip()


def start_gateway(
    stack: ExitStack, workdir: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], str, str]:
    """An ``sdcn gateway`` process on loopback (with `extra` arguments), without per-client
    limits (a benchmark is one client asking a lot) and without spot checks (the benchmarks
    measure one job's path; what checks cost, benchmarks/trust.py measures): (process, its
    HTTP URL, its multiaddr to bootstrap from)."""
    ws_port, http_port = free_port(), free_port()
    key = workdir / "gateway.key"
    gateway_id = keygen(key)
    listen = f"/ip4/127.0.0.1/tcp/{ws_port}/ws"
    http = f"127.0.0.1:{http_port}"
    args = sdcn("gateway", "--key", str(key), "--listen", listen, "--http", http, "--no-limits")
    args.append("--no-spot-checks")
    if "--data-dir" not in extra:
        args += ["--data-dir", str(workdir / "gateway-data")]
    args += extra
    process = spawn(stack, args, workdir / "gateway.log")
    return process, f"http://127.0.0.1:{http_port}", f"{listen}/p2p/{gateway_id}"


def wait_http(
    url: str,
    process: subprocess.Popen[bytes],
    check: Callable[[Any], bool] = lambda body: True,
    timeout: float = READY_TIMEOUT,
    poll: float = 0.1,
) -> Any:
    """Poll `url` every `poll` seconds until it answers 200 with JSON that passes `check`;
    return that JSON.

    Raises RuntimeError if `process` exits first or `timeout` seconds pass.
    """
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200 and check(body := response.json()):
                return body
        except httpx.HTTPError:
            pass
        time.sleep(poll)  # another process's readiness: there is nothing to wait on instead
    raise RuntimeError(f"{url} not ready within {timeout:.0f} s")
