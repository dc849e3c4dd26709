from __future__ import annotations

import io
import logging
import os
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from PIL import Image

from sdcn_p2p.backends import Capabilities, JobOutput
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.errors import BackendUnavailable, JobError
from sdcn_p2p.host import HostConfig
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.jobs.protocol import JOB, MAX_JOB_MESSAGE, request_job
from sdcn_p2p.logs import ContextFilter
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import PeerConfig, open_peer
from sdcn_p2p.provider import ProviderConfig, open_provider
from sdcn_p2p.records import Advert, Role
from sdcn_p2p.testing import (
    mock_wall_clock,
    open_memory_peers,
    small_job,
    test_identity,
    wait_advert,
)
from sdcn_p2p.transport.memory import MemoryNetwork

CARD = TestcardConfig(models=("card-a", "card-b"), loras=("pixel",), speed=10.0)
#: A slow card: a 100-step 64x64 job takes 100 * (64 * 64 / 512**2) / 0.5 = 3.1 s.
SLOW = TestcardConfig(models=("card-a",), speed=0.5)


job = small_job


def png_bytes(width: int, height: int, *, noise: bool = False) -> bytes:
    if noise:
        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        image = Image.new("RGB", (width, height), (200, 30, 30))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=0 if noise else 6)
    return out.getvalue()


@asynccontextmanager
async def provider_network(config: ProviderConfig = ProviderConfig(), card: TestcardConfig = CARD):
    """A gateway-ish peer 0 and a provider on peer 1, both listening."""
    network = MemoryNetwork(latency=0.005)
    async with (
        open_memory_peers(2, network=network) as (client, node),
        open_provider(node, TestcardBackend(card), config) as provider,
    ):
        await wait_advert(client, node, lambda a: a.state == "online")
        yield client, node, provider


async def test_provider_advertises_the_backend_capabilities(autojump_clock) -> None:
    async with provider_network(ProviderConfig(slots=2)) as (client, node, _):
        advert = client.adverts.get(node.peer_id)
        assert [m.name for m in advert.models] == ["card-a", "card-b"]
        assert [lo.name for lo in advert.loras] == ["pixel"]
        assert advert.backend == "testcard" and advert.state == "online"
        assert advert.slots == 2 and advert.queue == 0
        assert advert.reachability == "public" and advert.addrs
        assert "Euler a" in advert.samplers
        assert [a.peer_id for a in client.adverts.find("CARD-A", ["pixel"])] == [node.peer_id]


async def test_txt2img_round_trip_with_progress(autojump_clock) -> None:
    async with provider_network() as (client, node, provider):
        steps: list[tuple[int, int]] = []
        result = await request_job(
            client.host,
            node.peer_id,
            job(batch_size=2, loras=(("pixel", 0.5),)),
            deadline=60,
            on_progress=lambda step, total: steps.append((step, total)),
        )
        assert len(result.images) == 2
        for data in result.images:
            assert Image.open(io.BytesIO(data)).size == (64, 64)
        assert result.info["seed"] == 7 and result.info["model"] == "card-a"
        assert result.info["provider"] == str(node.peer_id)
        assert result.info["testcard"] is True
        assert result.info["run_ms"] == pytest.approx(2 * 10 * 64 * 64 / 512**2 / 10 * 1000, abs=2)
        assert steps and steps[-1] == (10, 10)
        assert [s for s, _ in steps] == sorted(s for s, _ in steps)
        assert provider.jobs_done == 1 and provider.speed == pytest.approx(10.0, rel=0.05)


async def test_img2img_round_trip(autojump_clock) -> None:
    async with provider_network() as (client, node, _):
        init = png_bytes(64, 64)
        result = await request_job(
            client.host,
            node.peer_id,
            job(kind="img2img", init_image=init, denoising_strength=0.0),
            deadline=60,
        )
        image = Image.open(io.BytesIO(result.images[0])).convert("RGB")
        assert image.getpixel((32, 32)) == (200, 30, 30)  # strength 0 keeps the init image


async def test_unsupported_model_lora_and_sampler_are_refused(autojump_clock) -> None:
    async with provider_network() as (client, node, _):
        for bad, word in (
            (job(model="sdxl"), "model"),
            (job(loras=(("nope", 1.0),)), "LoRA"),
            (job(sampler_name="Made Up"), "sampler"),
        ):
            with pytest.raises(JobError) as info:
                await request_job(client.host, node.peer_id, bad, deadline=60)
            assert info.value.code == "unsupported" and word in info.value.message


async def test_invalid_parameters_are_refused_naming_the_field(autojump_clock) -> None:
    async with provider_network() as (client, node, _):
        for field, value in (("steps", 0), ("width", 65), ("cfg_scale", 99), ("seed", -5)):
            wire = job().to_wire()
            wire[field] = value
            stream = await client.host.new_stream(
                node.peer_id, JOB, max_message_size=MAX_JOB_MESSAGE
            )
            async with stream:
                await stream.send_message({"type": "job", "job": wire, "deadline": 30.0})
                reply = await stream.receive_message()
            assert reply["type"] == "error" and reply["code"] == "bad_request"
            assert field in reply["message"]


async def test_each_job_logs_one_line_with_its_id_and_a_bad_id_is_refused(
    autojump_clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sdcn_p2p.provider")
    caplog.handler.addFilter(ContextFilter())
    async with provider_network() as (client, node, provider):
        await request_job(client.host, node.peer_id, job(), deadline=30, job_id="gw-1.0")
        await request_job(client.host, node.peer_id, job(), deadline=30)  # an id of its own
        with pytest.raises(JobError) as info:
            await request_job(client.host, node.peer_id, job(model="card-z"), deadline=30)
        assert info.value.code == "unsupported"
        stream = await client.host.new_stream(node.peer_id, JOB, max_message_size=MAX_JOB_MESSAGE)
        async with stream:
            message = {"type": "job", "job": job().to_wire(), "deadline": 30.0, "job_id": "a b"}
            await stream.send_message(message)
            reply = await stream.receive_message()
        assert reply["code"] == "bad_request" and reply["message"].startswith("job_id:")
        body, _ = provider.peer.metrics.exposition()
    ran = [r for r in caplog.records if r.getMessage().startswith("ran a txt2img job")]
    ids = [getattr(r, "job_id", None) for r in ran]
    assert ids[0] == "gw-1.0" and len(ids[1]) == 16
    assert [getattr(r, "status", None) for r in ran] == ["ok", "ok"]
    assert b'sdcn_provider_jobs_total{outcome="ok"} 2.0' in body
    assert b'sdcn_provider_jobs_total{outcome="unsupported"} 1.0' in body
    assert b'sdcn_provider_jobs_total{outcome="bad_request"} 1.0' in body


async def test_busy_when_slots_and_queue_are_full(autojump_clock) -> None:
    config = ProviderConfig(slots=1, max_queue=1)
    async with provider_network(config, card=SLOW) as (client, node, provider):
        outcomes: list[str] = []

        async def one() -> None:
            try:
                await request_job(client.host, node.peer_id, job(steps=100), deadline=60)
                outcomes.append("done")
            except JobError as exc:
                outcomes.append(exc.code)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
            advert = await wait_advert(client, node, lambda a: a.queue == 2)
            assert advert.queue == 2 and provider.running == 1 and provider.waiting == 1
        assert sorted(outcomes) == ["busy", "done", "done"]
        await wait_advert(client, node, lambda a: a.queue == 0)


async def test_closing_the_stream_cancels_the_job(autojump_clock) -> None:
    async with provider_network(card=SLOW) as (client, node, provider):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(request_job, client.host, node.peer_id, job(steps=150), deadline=60)
            )
            await wait_advert(client, node, lambda a: a.queue == 1)
            nursery.cancel_scope.cancel()  # the client gives up: its stream is reset
        await wait_advert(client, node, lambda a: a.queue == 0)
        assert provider.running == 0 and provider.jobs_done == 0


async def test_deadline_passed_is_a_timeout(autojump_clock) -> None:
    async with provider_network(card=SLOW) as (client, node, provider):
        stream = await client.host.new_stream(node.peer_id, JOB, max_message_size=MAX_JOB_MESSAGE)
        async with stream:
            await stream.send_message(
                {"type": "job", "job": job(steps=150).to_wire(), "deadline": 2}
            )
            reply = await stream.receive_message()
            while reply["type"] == "progress":
                reply = await stream.receive_message()
        assert reply["type"] == "error" and reply["code"] == "timeout"
        assert provider.running == 0


async def test_draining_refuses_new_jobs_and_waits_for_running_ones(autojump_clock) -> None:
    async with provider_network(card=SLOW) as (client, node, provider):
        results = []

        async def long_job() -> None:
            results.append(
                await request_job(client.host, node.peer_id, job(steps=100), deadline=60)
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_job)
            await wait_advert(client, node, lambda a: a.queue == 1)
            nursery.start_soon(provider.drain)
            await wait_advert(client, node, lambda a: a.state == "draining")
            with pytest.raises(JobError) as info:
                await request_job(client.host, node.peer_id, job(), deadline=60)
            assert info.value.code == "busy"
        assert len(results) == 1 and provider.load == 0


async def test_an_idle_provider_that_drains_and_leaves_at_once_is_seen_draining(
    autojump_clock,
) -> None:
    # What `sdcn node` does on SIGTERM with nothing running: drain, then close the peer at
    # once. The draining advert is sent before drain returns, goes out before the connection
    # closes, and is read by the other side before it tears the connection down.
    network = MemoryNetwork(latency=0.005)
    async with open_memory_peers(1, network=network) as (client,):
        transport = network.transport()
        listen = (Multiaddr.parse(f"/ip4/{transport.host}/tcp/4001/ws"),)
        seed = client.host.listen_addrs[0].with_peer_id(client.peer_id)
        config = PeerConfig(host=HostConfig(listen=listen), bootstrap=(seed,))
        async with (
            open_peer(
                test_identity(7), config, transport=transport, wall_clock=mock_wall_clock
            ) as node,
            open_provider(node, TestcardBackend(CARD)) as provider,
        ):
            await wait_advert(client, node, lambda a: a.state == "online")
            await provider.drain()
        # The node is gone; what it sent before is all there is.
        await wait_advert(client, node, lambda a: a.state == "draining")


class FlakyBackend(TestcardBackend):
    """A test card whose backend can be switched off, like a webui that goes away."""

    def __init__(self) -> None:
        super().__init__(TestcardConfig())
        self.up = True

    async def capabilities(self) -> Capabilities:
        if not self.up:
            raise BackendUnavailable("the webui went away")
        return await super().capabilities()

    async def generate(self, job: JobRequest, progress) -> JobOutput:  # type: ignore[no-untyped-def]
        if not self.up:
            raise JobError("backend_failed", "connection refused")
        return await super().generate(job, progress)


async def test_a_backend_that_goes_away_makes_the_provider_unavailable_then_online(
    autojump_clock,
) -> None:
    backend = FlakyBackend()
    config = ProviderConfig(capability_interval=5)
    async with open_memory_peers(2) as (client, node), open_provider(node, backend, config):
        await wait_advert(client, node, lambda a: a.state == "online")
        backend.up = False
        await wait_advert(client, node, lambda a: a.state == "unavailable")
        with pytest.raises(JobError) as info:
            await request_job(client.host, node.peer_id, job(model="testcard-v1"), deadline=60)
        assert info.value.code == "busy"
        backend.up = True
        await wait_advert(client, node, lambda a: a.state == "online")
        result = await request_job(client.host, node.peer_id, job(model="testcard-v1"), deadline=60)
        assert result.images


async def test_outbound_only_provider_serves_a_peer_it_dialled(autojump_clock) -> None:
    async with open_memory_peers(2, listen=[True, False]) as (gateway, node):
        assert not node.host.listen_addrs and not node.reachable
        async with open_provider(node, TestcardBackend(CARD)):
            advert = await wait_advert(gateway, node, lambda a: a.state == "online")
            assert advert.reachability == "outbound-only" and advert.addrs == ()
            result = await request_job(gateway.host, node.peer_id, job(), deadline=60)
            assert result.info["provider"] == str(node.peer_id)
            # Idle for long: the connection the provider opened stays up.
            await trio.sleep(600)
            assert gateway.host.is_connected(node.peer_id)
            await request_job(gateway.host, node.peer_id, job(), deadline=60)


async def test_outbound_only_provider_dials_the_gateways_it_learns_of(autojump_clock) -> None:
    async with (
        open_memory_peers(3, listen=[True, True, False]) as (_, gateway, node),
        open_provider(node, TestcardBackend(CARD)) as provider,
    ):
        connected = trio.Event()
        with node.host.subscribe(
            on_connected=lambda conn: conn.peer_id == gateway.peer_id and connected.set()
        ):
            await gateway.publish_advert(
                Advert(
                    gateway.peer_id,
                    seq=1,
                    issued_at=gateway.wall_clock(),
                    ttl=180,
                    addrs=tuple(gateway.host.advertised_addrs),
                    roles=(Role.GATEWAY,),
                )
            )
            await wait_advert(node, gateway, lambda a: Role.GATEWAY in a.roles)
            assert gateway.peer_id in provider._gateways
            if not node.host.is_connected(gateway.peer_id):
                await connected.wait()
            await trio.sleep(900)  # idle: the connection to a gateway is kept alive
            assert node.host.is_connected(gateway.peer_id)
            await request_job(gateway.host, node.peer_id, job(), deadline=60)


async def test_ten_megabyte_init_image_accepted_and_sixty_refused() -> None:
    """Real time: the provider decodes big images in a worker thread."""
    async with provider_network() as (client, node, _):
        big = png_bytes(1900, 1900, noise=True)
        assert len(big) > 10_000_000
        result = await request_job(
            client.host,
            node.peer_id,
            job(kind="img2img", init_image=big, width=64, height=64),
            deadline=60,
        )
        assert result.images
        wire = job(kind="img2img", init_image=png_bytes(64, 64)).to_wire()
        wire["init_image"] = b"\x89PNG\r\n\x1a\n" + os.urandom(60_000_000)
        stream = await client.host.new_stream(node.peer_id, JOB, max_message_size=MAX_JOB_MESSAGE)
        async with stream:
            await stream.send_message({"type": "job", "job": wire, "deadline": 30.0})
            reply = await stream.receive_message()
        assert reply["type"] == "error" and reply["code"] == "bad_request"
        assert "init_image" in reply["message"]
