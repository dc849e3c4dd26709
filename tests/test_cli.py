from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from bootstrap.node import open_bootstrap
from sdcn_p2p.cli import (
    build_parser,
    default_data_dir,
    jobs_config_from_args,
    main,
    peer_config_from_args,
    ping_peer,
    run_gateway,
)
from sdcn_p2p.errors import ConfigError
from sdcn_p2p.host import HostConfig, open_host
from sdcn_p2p.identity import PeerId, default_key_path, load_or_create_identity
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.jobs.protocol import request_job
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.records import Role
from sdcn_p2p.testing import test_identity


@pytest.fixture
def key_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default key path, redirected into tmp_path (XDG on Linux, HOME elsewhere)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = default_key_path()
    assert path.is_relative_to(tmp_path)
    return path


def test_keygen_creates_a_0600_key_and_prints_its_peer_id(key_path: Path, capsys) -> None:
    assert main(["keygen"]) == 0
    out, err = capsys.readouterr()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert PeerId.from_string(out.strip()) == load_or_create_identity(key_path).peer_id
    assert "created" in err


def test_keygen_twice_keeps_the_key(key_path: Path, capsys) -> None:
    assert main(["keygen"]) == 0
    first = capsys.readouterr().out
    pem = key_path.read_bytes()
    assert main(["keygen"]) == 0
    out, err = capsys.readouterr()
    assert out == first
    assert key_path.read_bytes() == pem
    assert f"kept the existing key at {key_path}" in err


def test_keygen_does_not_overwrite_a_corrupt_key(key_path: Path, capsys) -> None:
    key_path.parent.mkdir(parents=True)
    key_path.write_bytes(b"not a key")
    assert main(["keygen"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"sdcn: error: bad key file {key_path}")
    assert key_path.read_bytes() == b"not a key"


def test_keygen_and_id_with_explicit_key_path(tmp_path: Path, capsys) -> None:
    path = tmp_path / "keys" / "node.key"
    assert main(["keygen", "--key", str(path)]) == 0
    created = capsys.readouterr().out
    assert main(["id", "--key", str(path)]) == 0
    assert capsys.readouterr().out == created


def test_id_prints_the_peer_id_and_cid(key_path: Path, capsys) -> None:
    peer_id = load_or_create_identity(key_path).peer_id
    assert main(["id"]) == 0
    assert capsys.readouterr().out == f"{peer_id}\n"
    assert main(["id", "--cid"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bafz")
    assert PeerId.from_string(out.strip()) == peer_id


def test_id_without_a_key_fails_cleanly(key_path: Path, capsys) -> None:
    assert main(["id"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"sdcn: error: no key file at {key_path} (run `sdcn keygen` first)\n"
    assert not key_path.exists()


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--version"])
    assert exc_info.value.code == 0
    assert capsys.readouterr().out.startswith("sdcn ")


@pytest.mark.parametrize(
    "argv", [[], ["frobnicate"], ["--log-level", "loud", "id"], ["id", "--bogus"]]
)
def test_usage_errors_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    assert exc_info.value.code == 2
    assert "usage: sdcn" in capsys.readouterr().err


def test_log_level_is_case_insensitive(key_path: Path) -> None:
    assert main(["--log-level", "DEBUG", "keygen"]) == 0


def test_module_runs_as_a_script(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}

    def sdcn(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sdcn_p2p.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )

    missing = sdcn("id", "--key", str(path))
    assert missing.returncode == 1
    assert missing.stderr.startswith("sdcn: error: no key file")
    assert "Traceback" not in missing.stderr

    created = sdcn("keygen", "--key", str(path))
    assert created.returncode == 0
    assert PeerId.from_string(created.stdout.strip()) == load_or_create_identity(path).peer_id


async def test_ping_peer_prints_each_round_trip(capsys) -> None:
    listen = (Multiaddr.parse("/ip4/127.0.0.1/tcp/0/ws"),)
    async with open_host(test_identity(7), HostConfig(listen=listen)) as host:
        target = host.listen_addrs[0].with_peer_id(host.peer_id)
        rtts = await ping_peer(target, 3, 0)
    out = capsys.readouterr().out
    assert len(rtts) == 3
    assert f"connected to {host.peer_id}" in out
    assert out.count("rtt=") == 3


def test_ping_to_nobody_fails_cleanly(capsys) -> None:
    code = main(["ping", "/ip4/127.0.0.1/tcp/1/ws", "--count", "1"])
    assert code == 1
    assert "sdcn: error: could not reach" in capsys.readouterr().err


def test_bad_multiaddr_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["ping", "/ip4/1.2.3.4/udp/1"])
    assert info.value.code == 2
    assert "invalid multiaddr" in capsys.readouterr().err


async def test_node_subprocess_joins_serves_a_job_and_drains_on_sigterm(tmp_path: Path) -> None:
    """`sdcn node --backend testcard` as a real process, through a bootstrap peer."""
    config = peer_config_from_args(
        build_parser().parse_args(["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0/ws"])
    )
    async with open_bootstrap(test_identity(0), config) as boot:
        seed = boot.peer.host.listen_addrs[0].with_peer_id(boot.peer.peer_id)
        arrived = trio.lowlevel.ParkingLot()
        with boot.peer.adverts.subscribe(lambda advert: arrived.unpark_all()):
            process = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "sdcn_p2p.cli",
                    "node",
                    "--key",
                    str(tmp_path / "k"),
                    "--backend",
                    "testcard",
                    "--testcard-models",
                    "card-x",
                    "--bootstrap",
                    str(seed),
                ],
                stderr=subprocess.DEVNULL,
            )
            try:
                with trio.fail_after(60):
                    while not (adverts := boot.peer.adverts.find("card-x")):
                        await arrived.park()
                node = adverts[0].peer_id
                assert adverts[0].reachability == "outbound-only"
                job = JobRequest("txt2img", "card-x", "a cat", seed=1, width=64, height=64)
                result = await request_job(boot.peer.host, node, job, deadline=30)
                assert result.info["provider"] == str(node) and result.images
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    while boot.peer.adverts.get(node).state != "draining":
                        await arrived.park()
                    assert await process.wait() == 0
            finally:
                process.kill()
                await process.wait()


async def test_node_subprocess_serves_metrics_and_logs_json_lines_with_the_job_id(
    tmp_path: Path,
) -> None:
    """`sdcn --log-format json node --metrics ...`: its line for a job names the id the job
    came with, and its metrics count the job."""
    config = peer_config_from_args(
        build_parser().parse_args(["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0/ws"])
    )
    async with open_bootstrap(test_identity(0), config) as boot:
        seed = boot.peer.host.listen_addrs[0].with_peer_id(boot.peer.peer_id)
        arrived = trio.lowlevel.ParkingLot()
        lines: list[dict] = []
        logged = trio.lowlevel.ParkingLot()

        async def read_log(stream: trio.abc.ReceiveStream) -> None:
            buffer = b""
            async for data in stream:
                buffer += data
                *complete, buffer = buffer.split(b"\n")
                lines.extend(json.loads(line) for line in complete if line)
                logged.unpark_all()

        async def wait_line(check) -> dict:  # type: ignore[no-untyped-def]
            with trio.fail_after(60):
                while not (found := [line for line in lines if check(line)]):
                    await logged.park()
            return found[0]

        argv = ["--log-format", "json", "node", "--key", str(tmp_path / "k")]
        argv += ["--backend", "testcard", "--testcard-models", "card-x", "--bootstrap", str(seed)]
        argv += ["--metrics", "127.0.0.1:0"]
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "sdcn_p2p.cli", *argv], stderr=subprocess.PIPE
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_log, process.stderr)
                started = await wait_line(lambda line: line["message"].startswith("metrics on"))
                url = started["message"].removeprefix("metrics on ")
                with boot.peer.adverts.subscribe(lambda advert: arrived.unpark_all()):
                    with trio.fail_after(60):
                        while not (adverts := boot.peer.adverts.find("card-x")):
                            await arrived.park()
                job = JobRequest("txt2img", "card-x", "a cat", seed=1, width=64, height=64)
                host, node = boot.peer.host, adverts[0].peer_id
                await request_job(host, node, job, deadline=30, job_id="job-42.0")
                ran = await wait_line(lambda line: line.get("job_id") == "job-42.0")
                assert ran["logger"] == "sdcn_p2p.provider" and ran["status"] == "ok"
                assert ran["level"] == "INFO" and ran["model"] == "card-x"
                assert "a cat" not in json.dumps(lines)
                async with httpx.AsyncClient() as http:
                    response = await http.get(url)
                samples = {
                    (s.name, tuple(s.labels.values())): s.value
                    for f in text_string_to_metric_families(response.text)
                    for s in f.samples
                }
                assert samples[("sdcn_provider_jobs_total", ("ok",))] == 1
                assert samples[("sdcn_provider_job_run_seconds_count", ())] == 1
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    assert await process.wait() == 0
        finally:
            process.kill()
            await process.wait()


@pytest.mark.parametrize(("flag", "checks"), [([], True), (["--no-spot-checks"], False)])
async def test_a_gateway_checks_pictures_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch, flag: list[str], checks: bool
) -> None:
    import gateway.node

    argv = ["gateway", "--listen", "/ip4/127.0.0.1/tcp/0/ws", "--http", "127.0.0.1:0", *flag]
    args = build_parser().parse_args(argv)
    opened = trio.Event()
    checker: list[bool] = []
    real = gateway.node.open_gateway

    @asynccontextmanager
    async def spy(*a: Any, **kw: Any) -> AsyncIterator[Any]:
        async with real(*a, **kw) as opened_gateway:
            checker.append(opened_gateway.checker is not None)
            opened.set()
            yield opened_gateway

    monkeypatch.setattr(gateway.node, "open_gateway", spy)
    config = peer_config_from_args(args, roles=(Role.GATEWAY,))
    async with trio.open_nursery() as nursery:
        run = partial(run_gateway, test_identity(5), config, http=args.http)
        nursery.start_soon(partial(run, spot_checks=args.spot_checks))
        with trio.fail_after(30):
            await opened.wait()
        nursery.cancel_scope.cancel()
    assert checker == [checks]


def test_metrics_options_go_into_the_peer_config() -> None:
    parse = build_parser().parse_args
    assert peer_config_from_args(parse(["gateway"])).metrics
    assert not peer_config_from_args(parse(["bootstrap", "--no-metrics"])).metrics
    args = parse(["node", "--backend", "testcard", "--metrics", "0.0.0.0:9100"])
    assert args.metrics == "0.0.0.0:9100" and peer_config_from_args(args).metrics
    with pytest.raises(ConfigError, match="contradict"):
        peer_config_from_args(parse(["gateway", "--metrics", "[::]:9100", "--no-metrics"]))


def test_log_format_is_text_or_json_for_every_command(capsys) -> None:
    parser = build_parser()
    assert parser.parse_args(["--log-format", "JSON", "id"]).log_format == "json"
    assert parser.parse_args(["id"]).log_format == "text"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-format", "xml", "id"])
    assert "invalid choice: 'xml'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        (None, None),
        ("alice:s3:cret", ("alice", "s3:cret")),
        ("token-123", "token-123"),
    ],
)
async def test_node_with_comfyui_takes_its_url_and_credentials(
    auth: str | None, expected: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdcn_p2p.backends.comfyui import ComfyuiBackend
    from sdcn_p2p.cli import node_config_from_args, open_backend_from_args

    monkeypatch.delenv("SDCN_COMFYUI_AUTH", raising=False)
    argv = ["node", "--backend", "comfyui", "--comfyui-url", "http://10.0.0.2:8188"]
    args = build_parser().parse_args(argv + (["--comfyui-auth", auth] if auth else []))
    assert args.comfyui_auth == expected
    assert node_config_from_args(args)[1].slots == 1
    async with open_backend_from_args(args) as backend:
        assert isinstance(backend, ComfyuiBackend)
        assert backend.url == "http://10.0.0.2:8188"
    with pytest.raises(ConfigError, match="one prompt at a time"):
        node_config_from_args(build_parser().parse_args([*argv, "--slots", "2"]))


def test_comfyui_credentials_may_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("SDCN_COMFYUI_AUTH", "bob:pw")
    args = build_parser().parse_args(["node", "--backend", "comfyui"])
    assert args.comfyui_auth == ("bob", "pw")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["node", "--backend", "comfyui", "--comfyui-auth", ":pw"])
    assert "expected USER:PASS or a bearer token" in capsys.readouterr().err


# --- a gateway's job options -------------------------------------------------------------------


@pytest.mark.parametrize("command", [["gateway"], ["node", "--backend", "testcard"], ["devnet"]])
def test_job_options_make_the_job_service_config(command: list[str], tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [*command, "--data-dir", str(tmp_path), "--job-retention", "30m", "--results-max-mb", "5"]
    )
    config = jobs_config_from_args(args, default_dir=None)
    assert (config.data_dir, config.retention, config.results_max_mb) == (tmp_path, 1800.0, 5)
    defaults = jobs_config_from_args(build_parser().parse_args(command), default_dir=tmp_path)
    assert (defaults.data_dir, defaults.retention, defaults.results_max_mb) == (
        tmp_path,
        3600,
        2048,
    )
    assert default_data_dir().name == "sdcn"


@pytest.mark.parametrize("retention", ["soon", "-1h", "0", "1w"])
def test_a_bad_retention_is_a_usage_error(retention: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["gateway", "--job-retention", retention])
    assert exc_info.value.code == 2 and "--job-retention" in capsys.readouterr().err


def test_a_gateway_whose_data_dir_cannot_be_used_stops_with_a_clear_error(
    tmp_path: Path, capsys
) -> None:
    (tmp_path / "file").write_text("")
    argv = ["gateway", "--key", str(tmp_path / "k"), "--listen", "/ip4/127.0.0.1/tcp/0/ws"]
    argv += ["--http", "127.0.0.1:0", "--data-dir", str(tmp_path / "file")]
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith(f"sdcn: error: the data dir {tmp_path / 'file'}")
