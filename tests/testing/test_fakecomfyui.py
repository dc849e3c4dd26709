"""The fake ComfyUI speaks ComfyUI's API, quirks included (checked with plain HTTP and a
plain websocket, not through the backend)."""

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
import trio_websocket

from sdcn_p2p.backends.comfyui import Plan, build_workflow
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.testing.fakecomfyui import FakeComfyui, open_fake_comfyui


def workflow(**fields: Any) -> dict[str, Any]:
    request = JobRequest(
        **{"kind": "txt2img", "model": "m", "prompt": "a cat", "steps": 3, "width": 64, **fields},
        height=64,
    )
    plan = Plan("sd-v1-5.safetensors", (), "euler", "normal")
    return build_workflow(request, plan, request.seed if request.seed >= 0 else 1, None)


@asynccontextmanager
async def comfyui(**options: Any) -> AsyncIterator[tuple[FakeComfyui, httpx.AsyncClient, str]]:
    fake = FakeComfyui(**options)
    async with open_fake_comfyui(fake) as url, httpx.AsyncClient(base_url=url) as client:
        yield fake, client, url


@asynccontextmanager
async def websocket(url: str, client_id: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    ws_url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    async with trio_websocket.open_websocket_url(ws_url) as ws:
        yield ws


async def messages_until_done(ws: trio_websocket.WebSocketConnection, prompt_id: str) -> list:
    """The JSON messages (and a marker for each binary frame) up to the prompt's end."""
    seen: list[Any] = []
    with trio.fail_after(10):
        while True:
            message = await ws.get_message()
            if isinstance(message, bytes):
                seen.append(("binary", message[:8]))
                continue
            data = json.loads(message)
            seen.append(data)
            ended = data["type"] == "executing" and data["data"]["node"] is None
            if ended and data["data"]["prompt_id"] == prompt_id:
                return seen


async def test_object_info_lists_what_it_has_and_nothing_for_an_unknown_node() -> None:
    async with comfyui(checkpoints=("a.safetensors",), loras=("l.safetensors",)) as (_, client, _):
        checkpoint = (await client.get("/object_info/CheckpointLoaderSimple")).json()
        sampler = (await client.get("/object_info/KSampler")).json()["KSampler"]
        unknown = (await client.get("/object_info/NoSuchNode")).json()
    required = checkpoint["CheckpointLoaderSimple"]["input"]["required"]
    assert required["ckpt_name"][0] == ["a.safetensors"]
    assert "euler_ancestral" in sampler["input"]["required"]["sampler_name"][0]
    assert sampler["input"]["required"]["steps"] == [
        "INT",
        {"default": 20, "min": 1, "max": 10000, "step": 1},
    ]
    assert sampler["output"] == ["LATENT"] and sampler["output_node"] is False
    assert unknown == {}


async def test_events_go_only_to_the_websocket_of_the_prompts_client_id() -> None:
    async with (
        comfyui() as (_, client, url),
        websocket(url, "mine") as mine,
        websocket(url, "other") as other,
    ):
        assert json.loads(await mine.get_message())["data"]["sid"] == "mine"
        assert json.loads(await other.get_message())["data"]["sid"] == "other"
        answer = await client.post("/prompt", json={"prompt": workflow(), "client_id": "mine"})
        prompt_id = answer.json()["prompt_id"]
        seen = await messages_until_done(mine, prompt_id)
        # The other client hears only the queue's status, up to the empty queue at the end.
        remaining = []
        while remaining[-2:] != [1, 0]:
            message = json.loads(await other.get_message())
            assert message["type"] == "status"
            remaining.append(message["data"]["status"]["exec_info"]["queue_remaining"])
    kinds = [m[0] if isinstance(m, tuple) else m["type"] for m in seen]
    assert kinds[kinds.index("execution_start") :] == [
        "execution_start",
        "execution_cached",
        *(["executing"] * 5),  # checkpoint, the prompts, latent, then KSampler
        *(["progress", "progress_state", "binary"] * 3),
        "executing",
        "executing",
        "executed",
        "execution_success",
        "executing",
    ]
    progress = [m["data"] for m in seen if isinstance(m, dict) and m["type"] == "progress"]
    assert progress[0] == {"value": 1, "max": 3, "prompt_id": prompt_id, "node": "7"}


async def test_history_is_empty_until_the_prompt_has_ended() -> None:
    async with comfyui(step_time=None) as (fake, client, _):
        prompt_id = (await client.post("/prompt", json={"prompt": workflow()})).json()["prompt_id"]
        await fake.wait_running()
        assert (await client.get(f"/history/{prompt_id}")).json() == {}
        queue = (await client.get("/queue")).json()
        assert [item[1] for item in queue["queue_running"]] == [prompt_id]
        fake.advance(3)
        await fake.wait_idle()
        entry = (await client.get(f"/history/{prompt_id}")).json()[prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    assert entry["prompt"][1] == prompt_id
    [image] = entry["outputs"]["9"]["images"]
    assert image["type"] == "temp" and image["filename"].startswith("ComfyUI_temp_")


async def test_an_identical_prompt_is_answered_from_the_cache() -> None:
    async with comfyui() as (fake, client, url), websocket(url, "me") as ws:
        await ws.get_message()
        images = []
        for _ in range(2):
            body = {"prompt": workflow(), "client_id": "me"}
            prompt_id = (await client.post("/prompt", json=body)).json()["prompt_id"]
            seen = await messages_until_done(ws, prompt_id)
            entry = (await client.get(f"/history/{prompt_id}")).json()[prompt_id]
            images.append(entry["outputs"]["9"]["images"])
    cached = [m["data"]["nodes"] for m in seen if m["type"] == "execution_cached"]
    assert not [m for m in seen if not isinstance(m, dict)]  # no previews either
    assert sorted(cached[0]) == sorted(workflow())
    assert not [m for m in seen if isinstance(m, dict) and m["type"] == "progress"]
    assert fake.last_executed == []
    assert images[0] == images[1]  # the same files


async def test_a_batch_draws_all_its_noise_from_the_one_seed() -> None:
    async with comfyui() as (fake, client, _):

        async def images(seed: int, batch: int = 1) -> list[bytes]:
            flow = workflow(seed=seed)
            flow["4"]["inputs"]["batch_size"] = batch
            prompt_id = (await client.post("/prompt", json={"prompt": flow})).json()["prompt_id"]
            await fake.wait_idle()
            entry = (await client.get(f"/history/{prompt_id}")).json()[prompt_id]
            files = entry["outputs"]["9"]["images"]
            return [(await client.get("/view", params=f)).content for f in files]

        batch = await images(5, batch=2)
        seed_5, seed_6 = await images(5), await images(6)
    assert batch[0] == seed_5[0]
    assert batch[1] not in (seed_5[0], seed_6[0])


async def test_validation_errors_have_comfyuis_shapes() -> None:
    flow = workflow()
    flow["1"]["inputs"]["ckpt_name"] = "gone.safetensors"
    flow["7"]["inputs"]["steps"] = 0
    flow["7"]["inputs"]["cfg"] = "lots"
    del flow["7"]["inputs"]["denoise"]
    async with comfyui() as (fake, client, _):
        refused = await client.post("/prompt", json={"prompt": flow})
        unknown = await client.post(
            "/prompt", json={"prompt": {"1": {"class_type": "Magic", "inputs": {}}}}
        )
        no_output = await client.post("/prompt", json={"prompt": {"1": workflow()["1"]}})
        bad_id = await client.post("/prompt", json={"prompt": workflow(), "prompt_id": "x"})
        assert fake.pending == [] and fake.running is None
    assert refused.status_code == 400
    body = refused.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = {
        node: [(e["type"], e["extra_info"]["input_name"]) for e in entry["errors"]]
        for node, entry in body["node_errors"].items()
    }
    assert errors == {
        "1": [("value_not_in_list", "ckpt_name")],
        "7": [
            ("value_smaller_than_min", "steps"),
            ("invalid_input_type", "cfg"),
            ("required_input_missing", "denoise"),
        ],
    }
    assert body["node_errors"]["7"]["class_type"] == "KSampler"
    assert body["node_errors"]["7"]["dependent_outputs"] == ["9"]
    assert body["node_errors"]["1"]["errors"][0]["details"] == (
        "ckpt_name: 'gone.safetensors' not in ['sd-v1-5.safetensors']"
    )
    assert unknown.status_code == 400 and unknown.json()["error"]["type"] == "missing_node_type"
    assert no_output.json()["error"]["type"] == "prompt_no_outputs"
    assert bad_id.json()["error"]["type"] == "invalid_prompt_id"


async def test_an_upload_to_temp_feeds_load_image() -> None:
    async with comfyui() as (_, client, _):
        files = {"image": ("init.png", b"\x89PNG fake bytes", "image/png")}
        answer = await client.post("/upload/image", files=files, data={"type": "temp"})
        again = await client.post(
            "/upload/image",
            files={"image": ("init.png", b"other bytes", "image/png")},
            data={"type": "temp"},
        )
        flow = workflow()
        flow["5"] = {"class_type": "LoadImage", "inputs": {"image": "init.png [temp]"}}
        flow["6"] = {"class_type": "LoadImage", "inputs": {"image": "init.png"}}  # not in input/
        flow["9"]["inputs"]["images"] = ["5", 0]
        flow["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
        refused = (await client.post("/prompt", json={"prompt": flow})).json()
    assert answer.json() == {"name": "init.png", "subfolder": "", "type": "temp"}
    assert again.json()["name"] == "init (1).png"  # another file of that name: renamed
    assert list(refused["node_errors"]) == ["6"]
    assert refused["node_errors"]["6"]["errors"][0]["details"] == (
        "image - Invalid image file: init.png"
    )


async def test_interrupt_with_a_prompt_id_stops_only_that_prompt() -> None:
    async with comfyui(step_time=None) as (fake, client, _):
        prompt_id = (await client.post("/prompt", json={"prompt": workflow()})).json()["prompt_id"]
        await fake.wait_running()
        await client.post("/interrupt", json={"prompt_id": "someone-else"})
        assert fake.running is not None
        await client.post("/interrupt", json={"prompt_id": prompt_id})
        await fake.wait_idle()
        entry = (await client.get(f"/history/{prompt_id}")).json()[prompt_id]
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert fake.interrupts == 1
