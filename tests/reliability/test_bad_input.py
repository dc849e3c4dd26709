"""Bad input at the edges: the HTTP API checked from its own OpenAPI spec (schemathesis),
img2img init images that are truncated, decompression bombs or not images, and garbage
through wire decoders not covered elsewhere (tests/wire, tests/dht, tests/gossip and
tests/test_jobs.py cover the rest).
"""

from __future__ import annotations

import base64
import contextlib
import io
import random
import struct
import zlib
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.openapi import from_dict
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.api import create_app
from gateway.node import Gateway, open_gateway
from gateway.sdcn import parse_request as parse_sdcn_request
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.errors import HandshakeError, JobError, LocalProtocolError, ProtocolError
from sdcn_p2p.jobs.images import check_result_images
from sdcn_p2p.jobs.protocol import decode_reply, parse_job_message
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.protocols.identify import parse_info
from sdcn_p2p.provider import ProviderConfig, open_provider
from sdcn_p2p.records import PeerRecord
from sdcn_p2p.testing import open_memory_peers, test_identity, wait_advert
from sdcn_p2p.wire.noise import NoiseHandshake
from sdcn_p2p.wire.varint import decode_varint, encode_varint

ALICE, BOB = test_identity(1), test_identity(2)

# --- the HTTP API from its OpenAPI spec --------------------------------------------------------


async def _spec() -> dict[str, Any]:
    async with open_memory_peers(1) as (peer,):
        return create_app(Gateway(peer)).openapi()


SCHEMA = from_dict(trio.run(_spec))
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


async def _call(case: Any) -> httpx.Response:
    async with (
        open_memory_peers(1) as (peer,),
        open_gateway(peer, default_model="card") as gateway,
    ):
        app = create_app(gateway)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            kwargs = case.as_transport_kwargs(base_url="http://gw")
            request = http.build_request(
                kwargs["method"],
                kwargs["url"],
                headers=kwargs.get("headers"),
                params=kwargs.get("params"),
                json=kwargs.get("json"),
                content=kwargs.get("data") if "json" not in kwargs else None,
            )
            return await http.send(request)


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: f"{op.method} {op.path}")
def test_every_operation_answers_per_its_schema_and_errors_are_msg(operation: Any) -> None:
    """No 500s, responses as documented, and every error exactly ``{"msg": "..."}``."""

    @settings(
        max_examples=12,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        response = trio.run(_call, case, clock=trio.testing.MockClock(autojump_threshold=0))
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"msg"} and isinstance(body["msg"], str) and body["msg"]

    check()


async def test_the_job_operations_answer_per_their_schema_for_jobs_that_exist(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The async job routes on real jobs (the examples above only find unknown ids): a
    submit, its state once done, its events, its deletion, and the 410 after it."""
    card = TestcardBackend(TestcardConfig(models=("card",)))
    async with (
        open_memory_peers(2) as (peer, node),
        open_provider(node, card, ProviderConfig()),
        open_gateway(peer) as gateway,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://gw"
        ) as http,
    ):
        await wait_advert(peer, node)

        async def check(method: str, path: str, job_id: str | None = None) -> httpx.Response:
            post = method == "POST"
            url = path.replace("{job_id}", job_id or "")
            response = await http.request(method, url, json=body if post else None)
            case = SCHEMA[path][method].Case(
                path_parameters={"job_id": job_id} if job_id else {},
                **({"body": body, "media_type": "application/json"} if post else {}),
            )
            case.validate_response(response, checks=CHECKS)
            return response

        body = {"kind": "txt2img", "model": "card", "prompt": "a cat", "width": 64, "height": 64}
        job_id = (await check("POST", "/v1/jobs")).json()["id"]
        feed = await gateway.jobs.events(job_id)
        async for event in feed:
            if event is not None and event.terminal:
                break
        feed.close()
        assert (await check("GET", "/v1/jobs/{job_id}", job_id)).json()["status"] == "done"
        events = await check("GET", "/v1/jobs/{job_id}/events", job_id)
        assert events.text.count("event: done") == 1
        assert (await check("DELETE", "/v1/jobs/{job_id}", job_id)).json()["result_deleted"]
        assert (await check("GET", "/v1/jobs/{job_id}", job_id)).status_code == 410


# --- img2img init images -----------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    """A PNG of noise, so that cutting it anywhere loses pixels."""
    pixels = random.Random(width * height).randbytes(width * height * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(out, "PNG")
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header declares `width` x `height` (a decompression bomb's header):
    its one IDAT chunk holds a compressed run of zeros far smaller than the declared canvas.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(bytes(min(width + 1, 1 << 20)) * 16, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def img2img(image: bytes) -> dict[str, Any]:
    return {
        "model": "card",
        "prompt": "a harbour",
        "init_image": base64.b64encode(image).decode(),
        "width": 64,
        "height": 64,
    }


@pytest.mark.parametrize(
    ("image", "says"),
    [
        (png(64, 64)[:60], "cannot be decoded"),
        (png(64, 64)[: len(png(64, 64)) // 2], "cannot be decoded"),
        (b"GIF89a" + bytes(100), "must be a PNG, JPEG or WebP"),
        (b"%PDF-1.4 not an image", "must be a PNG, JPEG or WebP"),
        (png_claiming(100_000, 100_000), "at most 4096x4096"),
        (png_claiming(4097, 8), "at most 4096x4096"),
        (png_claiming(65_535, 65_535), "at most 4096x4096"),
    ],
    ids=["truncated-header", "truncated-data", "gif", "pdf", "bomb", "too-wide", "bomb-max"],
)
def test_bad_init_images_are_refused_before_decoding_pixels(image: bytes, says: str) -> None:
    with pytest.raises(JobError) as info:
        parse_sdcn_request("img2img", img2img(image))
    assert info.value.code == "bad_request" and says in info.value.message
    assert info.value.message.startswith("init_image:")


def test_a_bomb_is_refused_by_its_header_without_allocating_the_canvas() -> None:
    # 60,000² greyscale would take 3.6 GB to decode: refused from the header alone.
    bomb = png_claiming(60_000, 60_000)
    assert len(bomb) < 100_000
    with pytest.raises(JobError, match="at most 4096x4096"):
        parse_sdcn_request("img2img", img2img(bomb))


async def test_bad_init_images_through_the_api_are_400_with_msg() -> None:
    async with open_memory_peers(1) as (peer,), open_gateway(peer) as gateway:
        app = create_app(gateway)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            for image in (png(64, 64)[:60], png_claiming(100_000, 100_000), b"not an image"):
                response = await http.post("/img2img", json=img2img(image))
                assert response.status_code == 400
                assert response.json()["msg"].startswith("init_image:")
            a1111 = {"prompt": "x", "init_images": [base64.b64encode(b"junk").decode()]}
            response = await http.post("/sdapi/v1/img2img", json=a1111)
            assert response.status_code == 400 and set(response.json()) == {"msg"}


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_init_images_only_raise_bad_request(data: bytes) -> None:
    for image in (data, b"\x89PNG\r\n\x1a\n" + data, b"\xff\xd8\xff" + data):
        try:
            parse_sdcn_request("img2img", img2img(image))
        except JobError as exc:
            assert exc.code == "bad_request"


# --- result images and job replies -------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_corrupted_result_pngs_are_a_protocol_error(noise: bytes, cut: int) -> None:
    good = png(16, 16)
    for image in (good[:cut], good[:cut] + noise, b"\x89PNG\r\n\x1a\n" + noise):
        if image == good:
            continue
        with pytest.raises(ProtocolError):
            check_result_images([image])
    check_result_images([good])


def test_a_result_png_claiming_a_huge_canvas_is_refused() -> None:
    with pytest.raises(ProtocolError, match="100000x100000"):
        check_result_images([png_claiming(100_000, 100_000)])


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(json_values, st.sampled_from(["result", "error", "progress", "queued", "job", None]))
def test_any_job_reply_decodes_or_is_a_protocol_error(value: Any, kind: str | None) -> None:
    message = {"type": kind, "images": value, "info": value, "code": value, "step": value}
    for candidate in (value, message):
        with contextlib.suppress(ProtocolError):
            decode_reply(candidate)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80) | st.binary(max_size=80).map(lambda b: b.decode("latin-1")))
def test_any_multiaddr_text_parses_or_is_a_value_error(text: str) -> None:
    for candidate in (
        text,
        "/ip4/" + text,
        "/ip4/1.2.3.4/tcp/" + text,
        "/dns4/" + text + "/tcp/1/ws",
    ):
        try:
            addr = Multiaddr.parse(candidate)
        except ValueError:
            continue
        assert Multiaddr.parse(str(addr)) == addr


# --- decoders not covered elsewhere ------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=12), st.integers(min_value=0, max_value=3))
def test_varint_decoding_returns_a_value_none_or_protocol_error(data: bytes, offset: int) -> None:
    try:
        decoded = decode_varint(data, offset)
    except ProtocolError:
        return
    if decoded is not None:
        value, end = decoded
        assert encode_varint(value) == data[offset:end]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["ops", "third"]))
def test_responder_raises_only_protocol_errors_at_any_step(message: bytes, step: str) -> None:
    """A responder given garbage as the initiator's last message, or driven out of turn."""
    initiator = NoiseHandshake(ALICE, initiator=True)
    responder = NoiseHandshake(BOB, initiator=False)
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    with pytest.raises(HandshakeError if step == "third" else LocalProtocolError):
        if step == "third":
            responder.read_message(message)
        else:
            responder.write_message()  # the initiator's turn
    with pytest.raises(LocalProtocolError, match="already failed"):
        responder.to_transport()  # dead after any error


def test_a_replayed_handshake_message_from_another_session_fails() -> None:
    first = NoiseHandshake(ALICE, initiator=True)
    other = NoiseHandshake(BOB, initiator=False)
    other.read_message(first.write_message())
    answer = other.write_message()
    again = NoiseHandshake(ALICE, initiator=True)
    again.write_message()  # a new ephemeral key: the old answer does not decrypt
    with pytest.raises(HandshakeError):
        again.read_message(answer)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_identify_message_parses_or_is_a_protocol_error(value: Any) -> None:
    conn = SimpleNamespace(peer_id=ALICE.peer_id)
    record = PeerRecord(ALICE.peer_id, 1, ()).seal(ALICE).to_bytes()
    candidates = [value, {"record": value}, {"record": record, "listen_addrs": value}]
    candidates.append({"record": record, "agent_version": "x", "ext": value})
    for message in candidates:
        with contextlib.suppress(ProtocolError):
            parse_info(message, conn)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(json_values, st.sampled_from(["txt2img", "img2img", None]))
def test_any_job_request_message_is_a_job_or_bad_request(value: Any, kind: Any) -> None:
    base = {"kind": kind, "model": "card", "prompt": "x"}
    for message in (
        value,
        {"type": "job", "job": value, "deadline": 10},
        {"type": "job", "job": {**base, "steps": value}, "deadline": value},
        {"type": "job", "job": {**base, "init_image": value}, "deadline": 10},
    ):
        try:
            parse_job_message(message)
        except JobError as exc:
            assert exc.code == "bad_request"
