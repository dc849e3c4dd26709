"""How the fake ComfyUI runs one prompt: its nodes in order, from the cache where it can.

The nodes the output nodes need run each after its inputs; a node whose class and inputs
(links replaced by the linked node's cache key, LoadImage's file by its hash) are those of the
previous prompt is answered from the cache, as ComfyUI's is. KSampler steps are paced by the
fake (`FakeComfyui.step_time` or `advance`), reporting progress and preview frames; image
savers draw test cards (or `FakeComfyui.png`). The values nodes pass are plain dicts: a card
shows every parameter that made it.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdcn_p2p.backends.testcard import render_card

if TYPE_CHECKING:
    from sdcn_p2p.testing.fakecomfyui.fake import FakeComfyui

__all__ = ["Interrupted", "NodeFailure", "QueueItem", "Run", "evaluate"]

# A binary preview frame: event 1 (PREVIEW_IMAGE), image type 1 (JPEG), then the image.
_PREVIEW = struct.pack(">II", 1, 1) + b"\xff\xd8\xff\xe0fake-preview\xff\xd9"


class Interrupted(Exception):
    """The running prompt was interrupted (``POST /interrupt``)."""


class NodeFailure(Exception):
    """A node raised `exception_type` (``torch.OutOfMemoryError``), as ComfyUI reports it."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type


@dataclass(slots=True)
class QueueItem:
    """A queued prompt, as ComfyUI's queue holds it."""

    number: int
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class Run:
    """One prompt's execution: the order of its nodes, their cache keys and values.

    The fake's executor: it works on `fake`'s cache, files, websockets and step pacing.
    """

    def __init__(self, fake: FakeComfyui, item: QueueItem) -> None:
        self.fake = fake
        self.prompt = item.prompt
        self.prompt_id = item.prompt_id
        self.outputs = item.outputs
        self.values: dict[str, tuple[Any, ...]] = {}
        self.cache: dict[str, tuple[Any, ...]] = {}
        self.executed: list[str] = []
        self._signatures: dict[str, str] = {}

    def signature(self, node: str) -> str:
        """The cache key of `node`: its class and inputs, links replaced by the linked node's
        key, the file's bytes for LoadImage (its IS_CHANGED)."""
        if node not in self._signatures:
            spec = self.prompt[node]
            inputs = {}
            for name, value in spec["inputs"].items():
                if isinstance(value, list):
                    inputs[name] = [self.signature(str(value[0])), value[1]]
                else:
                    inputs[name] = value
            if spec["class_type"] == "LoadImage":
                data = self.fake._file(str(spec["inputs"]["image"])) or b""
                inputs["__changed__"] = hashlib.sha256(data).hexdigest()
            text = json.dumps([spec["class_type"], inputs], sort_keys=True, default=str)
            self._signatures[node] = hashlib.sha256(text.encode()).hexdigest()
        return self._signatures[node]

    def order(self) -> list[str]:
        """The nodes the output nodes need, each after its inputs."""
        ordered: list[str] = []

        def visit(node: str) -> None:
            if node in ordered:
                return
            for value in self.prompt[node]["inputs"].values():
                if isinstance(value, list):
                    visit(str(value[0]))
            ordered.append(node)

        for output in sorted(self.outputs):
            visit(output)
        return ordered

    async def execute(self, node: str, sid: str | None) -> dict[str, Any] | None:
        """Run or recall `node`; return its UI output (images) if it has one."""
        fake = self.fake
        key = self.signature(node)
        class_type = self.prompt[node]["class_type"]
        if key in fake._cache:
            self.values[node] = self.cache[key] = fake._cache[key]
            ui = fake._ui_cache.get(key)
            if ui is not None and sid is not None:
                fake._send(
                    "executed",
                    {"node": node, "display_node": node, "output": ui, "prompt_id": self.prompt_id},
                    sid,
                )
            return ui
        if sid is not None:
            fake._last_node = node
            fake._send(
                "executing", {"node": node, "display_node": node, "prompt_id": self.prompt_id}, sid
            )
        for index, (node_type, kind, message) in enumerate(fake._failures):
            if node_type == class_type:
                del fake._failures[index]
                raise NodeFailure(kind, message)
        inputs = {
            name: self.values[str(value[0])][value[1]] if isinstance(value, list) else value
            for name, value in self.prompt[node]["inputs"].items()
        }
        ui = None
        try:
            if class_type == "KSampler":
                result: tuple[Any, ...] = await self._sample(node, inputs, sid)
            elif class_type in ("PreviewImage", "SaveImage"):
                ui = {"images": self._save(inputs["images"], class_type)}
                result = ()
            else:
                result = evaluate(fake, class_type, inputs)
        except (KeyError, TypeError, ValueError, OSError) as exc:  # as ComfyUI reports any
            raise NodeFailure(type(exc).__name__, str(exc)) from exc
        if ui is not None and sid is not None:
            fake._send(
                "executed",
                {"node": node, "display_node": node, "output": ui, "prompt_id": self.prompt_id},
                sid,
            )
        self.values[node] = self.cache[key] = result
        if ui is not None:
            fake._ui_cache[key] = ui
        self.executed.append(node)
        return ui

    async def _sample(self, node: str, inputs: dict[str, Any], sid: str | None) -> tuple[Any]:
        fake = self.fake
        steps = int(inputs["steps"])
        for step in range(1, steps + 1):
            await fake._next_step()
            if fake._interrupt:
                raise Interrupted
            if sid is not None:
                progress = {"value": step, "max": steps, "prompt_id": self.prompt_id, "node": node}
                fake._send("progress", progress, sid)
                state = {**progress, "state": "running", "node_id": node}
                fake._send(
                    "progress_state", {"prompt_id": self.prompt_id, "nodes": {node: state}}, sid
                )
                fake._send(1, _PREVIEW, sid)
        latent = inputs["latent_image"]
        model = inputs["model"]
        params = {
            "model": model["ckpt"],
            "loras": ", ".join(
                model["loras"] + [f"clip {x}" for x in inputs["positive"]["clip"]["loras"]]
            )
            or "none",
            "prompt": inputs["positive"]["text"],
            "negative": inputs["negative"]["text"],
            "seed": int(inputs["seed"]),
            "steps": steps,
            "cfg": float(inputs["cfg"]),
            "sampler": f"{inputs['sampler_name']} / {inputs['scheduler']}",
            "denoise": float(inputs["denoise"]),
        }
        return ({**latent, "params": params},)

    def _save(self, image: dict[str, Any], class_type: str) -> list[dict[str, str]]:
        fake = self.fake
        kind = "temp" if class_type == "PreviewImage" else "output"
        prefix = "ComfyUI_temp_" + "".join(random.choices("abcdefghijklmnopqrstupvxyz", k=5))
        files = []
        if "params" not in image:  # a loaded image, not a generated one: saved as it is
            name = f"{prefix}_{len(fake._files):05}_.png"
            fake._store(kind, "", name, image.get("init") or b"")
            return [{"filename": name, "subfolder": "", "type": kind}]
        for index in range(image["batch"]):
            params = dict(image["params"])
            if index:  # the batch's noise: the index-th draw of the one seed
                params["noise"] = f"draw {index} of seed {params['seed']}"
            if fake.png is not None:
                data = fake.png
            else:
                data = render_card(
                    params,
                    image["width"],
                    image["height"],
                    title="FAKE COMFYUI",
                    init_image=image.get("init"),
                    denoising_strength=params["denoise"],
                )
            name = f"{prefix}_{len(fake._files):05}_.png"
            fake._store(kind, "", name, data)
            files.append({"filename": name, "subfolder": "", "type": kind})
        return files


def evaluate(fake: FakeComfyui, class_type: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
    """The outputs of a node other than KSampler and the image savers: plain dicts."""
    if class_type == "CheckpointLoaderSimple":
        name = inputs["ckpt_name"]
        return {"ckpt": name, "loras": []}, {"ckpt": name, "loras": []}, {"ckpt": name}
    if class_type == "LoraLoader":
        model, clip = inputs["model"], inputs["clip"]
        name = inputs["lora_name"]
        strength_model, strength_clip = (
            float(inputs["strength_model"]),
            float(inputs["strength_clip"]),
        )
        if strength_model == 0 and strength_clip == 0:
            return model, clip
        return (
            {**model, "loras": [*model["loras"], f"{name}:{strength_model:g}"]},
            {**clip, "loras": [*clip["loras"], f"{name}:{strength_clip:g}"]},
        )
    if class_type == "CLIPTextEncode":
        return ({"text": inputs["text"], "clip": inputs["clip"]},)
    if class_type == "EmptyLatentImage":
        return (
            {"width": inputs["width"], "height": inputs["height"], "batch": inputs["batch_size"]},
        )
    if class_type == "LoadImage":
        data = fake._file(str(inputs["image"]))
        return {"init": data}, None
    if class_type == "ImageScale":
        return ({**inputs["image"], "width": inputs["width"], "height": inputs["height"]},)
    if class_type == "VAEEncode":
        pixels = inputs["pixels"]
        return (
            {
                "width": pixels["width"],
                "height": pixels["height"],
                "batch": 1,
                "init": pixels["init"],
            },
        )
    if class_type == "VAEDecode":
        return (inputs["samples"],)
    raise NodeFailure("RuntimeError", f"the fake cannot run {class_type}")
