"""The example client, `examples/sdcn_run.py`, as a subprocess against a real gateway on
loopback (its providers behind real WebSockets): the async API with progress, --sync, errors,
Ctrl-C cancelling the job on the gateway, and the progress bar on a terminal.
"""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from PIL import Image

from gateway.node import Gateway, open_gateway
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.testing import open_loopback_providers
from sdcn_p2p.testing.gated import GatedBackend

CLIENT = Path(__file__).resolve().parents[2] / "examples" / "sdcn_run.py"
PARAMS = {"prompt": "a dog", "model": "card", "seed": 4, "steps": 3, "width": 96, "height": 64}


@asynccontextmanager
async def gateway_with(backend: TestcardBackend) -> AsyncIterator[Gateway]:
    """A gateway serving HTTP on loopback, and a provider of `backend` dialling it."""
    async with (
        open_loopback_providers(backend) as (peer, _),
        open_gateway(peer, http="127.0.0.1:0") as gateway,
    ):
        yield gateway


def write_params(tmp_path: Path, **fields: object) -> Path:
    path = tmp_path / "params.json"
    path.write_text(json.dumps(PARAMS | fields))
    return path


def client(gateway: Gateway, *args: str) -> list[str]:
    """The client's command line, against `gateway`."""
    return [sys.executable, str(CLIENT), "--gateway", gateway.urls[0], *args]


async def run_client(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, str(CLIENT), *args], capture_stdout=True, capture_stderr=True, check=False
    )


async def test_txt2img_follows_the_job_and_writes_the_image(tmp_path: Path) -> None:
    async with gateway_with(TestcardBackend(TestcardConfig(models=("card",)))) as gateway:
        params, out = write_params(tmp_path), tmp_path / "out.png"
        done = await run_client("--gateway", gateway.urls[0], "txt2img", str(params), str(out))
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().splitlines() == [str(out)]
        with Image.open(out) as image:
            assert image.size == (96, 64)
        log = done.stderr.decode()
        assert "queued" in log and "running on …" in log and "step 3/3" in log
        assert log.splitlines()[-1].startswith("seed 4, model card, provider 12D3KooW")
        # --sync asks the original endpoint, for the same picture.
        same = tmp_path / "same.png"
        sync = await run_client(
            "--sync", "--gateway", gateway.urls[0], "txt2img", str(params), str(same)
        )
        assert sync.returncode == 0 and "step" not in sync.stderr.decode()
        assert same.read_bytes() == out.read_bytes()


async def test_img2img_and_a_batch_write_every_image(tmp_path: Path) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (96, 64), (0, 90, 200)).save(init)
    async with gateway_with(TestcardBackend(TestcardConfig(models=("card",)))) as gateway:
        params = write_params(tmp_path, denoising_strength=0.0, batch_size=2)
        out = tmp_path / "out.png"
        args = ["--gateway", gateway.urls[0], "img2img", str(params), str(init), str(out)]
        done = await run_client(*args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().split() == [str(out), str(tmp_path / "out-1.png")]
        with Image.open(tmp_path / "out-1.png") as image:
            assert image.convert("RGB").getpixel((48, 32)) == (0, 90, 200)


@pytest.mark.parametrize("sync", [False, True])
async def test_failures_print_the_gateways_message_and_exit_1(tmp_path: Path, sync: bool) -> None:
    flag = ["--sync"] if sync else []
    async with gateway_with(TestcardBackend(TestcardConfig(models=("card",)))) as gateway:
        url, out = gateway.urls[0], str(tmp_path / "out.png")
        for fields, expected in (
            ({"model": "sdxl"}, "sdcn_run: 404: no provider offers model 'sdxl'"),
            ({"steps": 0}, "sdcn_run: 400: steps:"),
        ):
            params = write_params(tmp_path, **fields)
            done = await run_client(*flag, "--gateway", url, "txt2img", str(params), out)
            assert done.returncode == 1 and done.stdout == b""
            assert done.stderr.decode().startswith(expected)
    params = write_params(tmp_path)
    done = await run_client(*flag, "--gateway", url, "txt2img", str(params), out)
    assert done.returncode == 1 and "cannot reach the gateway" in done.stderr.decode()
    assert not await trio.Path(out).exists()


async def test_ctrl_c_cancels_the_job_on_the_gateway_and_exits_130(tmp_path: Path) -> None:
    backend = GatedBackend()
    async with gateway_with(backend) as gateway:
        params = write_params(tmp_path)
        process = await trio.lowlevel.open_process(
            client(gateway, "txt2img", str(params), str(tmp_path / "out.png")),
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        log = b""
        with trio.fail_after(60):  # a client process that starts, then cancels: slow when loaded
            while b"running on" not in log:
                log += await process.stderr.receive_some()
            await backend.started.wait()
            process.send_signal(signal.SIGINT)
            while chunk := await process.stderr.receive_some():
                log += chunk
            assert await process.wait() == 130
            await backend.cancelled.wait()  # the provider stopped drawing
        assert log.decode().splitlines()[-1] == "sdcn_run: cancelled"
        job_id = log.split(b"job ")[1].split()[0].decode()
        async with httpx.AsyncClient(base_url=gateway.urls[0]) as http:
            assert (await http.get(f"/v1/jobs/{job_id}")).json()["status"] == "cancelled"


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
async def test_on_a_terminal_progress_is_a_bar_redrawn_in_place(tmp_path: Path) -> None:
    backend = GatedBackend()
    async with gateway_with(backend) as gateway:
        params = write_params(tmp_path)
        controller, terminal = pty.openpty()
        try:
            process = await trio.lowlevel.open_process(
                client(gateway, "txt2img", str(params), str(tmp_path / "out.png")),
                stdout=subprocess.DEVNULL,
                stderr=terminal,
            )
            os.close(terminal)
            screen = io.BytesIO()
            with trio.fail_after(30):
                for step in range(4):
                    if step:
                        backend.allow()
                    wanted = f"{step}/3".encode() if step else b"running on"
                    while wanted not in screen.getvalue():
                        await trio.lowlevel.wait_readable(controller)
                        screen.write(os.read(controller, 4096))
                assert await process.wait() == 0
        finally:
            os.close(controller)
    drawn = screen.getvalue().decode()
    assert "\r[########----------------] 1/3" in drawn
    assert "\r[########################] 3/3" in drawn and "on …" in drawn
    assert "job " not in drawn  # the plain lines are for logs, not terminals
