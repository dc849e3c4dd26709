"""A fake ComfyUI: its HTTP and WebSocket API's shapes and quirks, drawing test cards.

For the ComfyUI backend's tests, the provider's and benchmarks. It serves ``GET
/object_info/{node}``, ``/system_stats``, ``/prompt``, ``/queue``, ``/history/{prompt_id}``,
``/view`` and ``/ws?clientId=``, and ``POST /prompt``, ``/queue``, ``/interrupt`` and
``/upload/image``, for the core nodes a txt2img or img2img workflow needs (`NODES`), with
optional HTTP Basic or bearer auth (a proxy in front of ComfyUI). Like the real one:

- ``POST /prompt`` validates the workflow as ``execution.validate_prompt`` does and answers a
  400 ``{"error": {type, message, details, extra_info}, "node_errors": {id: {errors,
  dependent_outputs, class_type}}}``; a valid one is queued: ``{"prompt_id", "number",
  "node_errors": {}}``. One prompt runs at a time, in order.
- A node whose inputs are those of the previous prompt is not run again but answered from the
  cache (``execution_cached`` lists it); an identical prompt runs nothing, reports no progress
  and gives the same image files.
- Execution events (``execution_start``, ``execution_cached``, ``executing``, ``progress``,
  ``executed``, ``execution_success``, ``execution_error``, ``execution_interrupted``, and
  binary preview frames) go only to the websocket whose clientId is the prompt's
  ``client_id``; ``status`` goes to all.
- ``/history/{prompt_id}`` is ``{}`` until the prompt has ended; ``execution_success`` is sent
  before the history is written, ``executing`` with node null after.
- ``/interrupt`` stops the running prompt at its next step (only that prompt when the body
  names its ``prompt_id``); ``/queue {"delete": [...]}`` drops queued prompts.
- A batch (EmptyLatentImage ``batch_size`` n) draws image i from the noise of the one seed:
  its first image is the one-image picture of that seed, the others are not those of seed + i.

Pictures depend on everything that makes them (checkpoint, LoRAs and strengths, prompts,
seed, steps, cfg, sampler, scheduler, denoise, size, init image): same inputs, same bytes.
KSampler steps take `step_time` seconds each (trio time), or wait for `advance()` when it is
None. With `png` set every image is those bytes instead (an instant ComfyUI for benchmarks).
Tests arrange failures with `fail_next()` (an execution error, out of memory for instance) and
`inject()` (an HTTP answer), and stop the server to make ComfyUI disappear.
"""

from __future__ import annotations

import base64
import collections
import email.parser
import email.policy
import hashlib
import json
import random
import secrets
import struct
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.backends.testcard import render_card
from sdcn_p2p.httpserver import serve_http

__all__ = [
    "KSAMPLER_NAMES",
    "NODES",
    "OUT_OF_MEMORY",
    "SCHEDULER_NAMES",
    "FakeComfyui",
    "create_app",
    "open_fake_comfyui",
]

#: ComfyUI's ``comfy.samplers.KSAMPLER_NAMES`` (2025) and the three it adds for KSampler.
KSAMPLER_NAMES = (
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)
#: ComfyUI's ``comfy.samplers.SCHEDULER_NAMES``.
SCHEDULER_NAMES = (
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
)
#: An `fail_next` exception as ComfyUI reports a CUDA out-of-memory error (type, message).
OUT_OF_MEMORY = (
    "torch.OutOfMemoryError",
    "Allocation on device \nThis error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a "
    "large number.",
)
MAX_RESOLUTION = 16384
_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
_WS_BUFFER = 4096
_MAX_FILES = 512
# A binary preview frame: event 1 (PREVIEW_IMAGE), image type 1 (JPEG), then the image.
_PREVIEW = struct.pack(">II", 1, 1) + b"\xff\xd8\xff\xe0fake-preview\xff\xd9"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A node class as ``/object_info`` describes it; choices None are the fake's lists."""

    inputs: dict[str, Any]
    returns: tuple[str, ...]
    category: str
    output_node: bool = False
    #: Inputs its VALIDATE_INPUTS checks itself (no combo check for them).
    validates: tuple[str, ...] = ()


def _int(default: int, low: int, high: int, step: int = 1) -> list[Any]:
    return ["INT", {"default": default, "min": low, "max": high, "step": step}]


def _float(default: float, low: float, high: float, step: float = 0.01) -> list[Any]:
    return ["FLOAT", {"default": default, "min": low, "max": high, "step": step}]


#: The core nodes the fake runs, with their inputs as ComfyUI declares them. A choice list of
#: None is filled from the fake's checkpoints, LoRAs, samplers, schedulers or input images.
NODES: dict[str, NodeSpec] = {
    "CheckpointLoaderSimple": NodeSpec(
        {"required": {"ckpt_name": [None, {"tooltip": "The name of the checkpoint."}]}},
        ("MODEL", "CLIP", "VAE"),
        "loaders",
    ),
    "LoraLoader": NodeSpec(
        {
            "required": {
                "model": ["MODEL", {}],
                "clip": ["CLIP", {}],
                "lora_name": [None, {}],
                "strength_model": _float(1.0, -100.0, 100.0),
                "strength_clip": _float(1.0, -100.0, 100.0),
            }
        },
        ("MODEL", "CLIP"),
        "loaders",
    ),
    "CLIPTextEncode": NodeSpec(
        {
            "required": {
                "text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
                "clip": ["CLIP", {}],
            }
        },
        ("CONDITIONING",),
        "conditioning",
    ),
    "EmptyLatentImage": NodeSpec(
        {
            "required": {
                "width": _int(1024, 16, MAX_RESOLUTION, 8),
                "height": _int(1024, 16, MAX_RESOLUTION, 8),
                "batch_size": _int(1, 1, 4096),
            }
        },
        ("LATENT",),
        "latent",
    ),
    "LoadImage": NodeSpec(
        {"required": {"image": [None, {"image_upload": True}]}},
        ("IMAGE", "MASK"),
        "image",
        validates=("image",),
    ),
    "ImageScale": NodeSpec(
        {
            "required": {
                "image": ["IMAGE", {}],
                "upscale_method": [_UPSCALE_METHODS, {}],
                "width": _int(512, 0, MAX_RESOLUTION),
                "height": _int(512, 0, MAX_RESOLUTION),
                "crop": [["disabled", "center"], {}],
            }
        },
        ("IMAGE",),
        "image/upscaling",
    ),
    "VAEEncode": NodeSpec(
        {"required": {"pixels": ["IMAGE", {}], "vae": ["VAE", {}]}}, ("LATENT",), "latent"
    ),
    "KSampler": NodeSpec(
        {
            "required": {
                "model": ["MODEL", {}],
                "seed": _int(0, 0, 0xFFFFFFFFFFFFFFFF),
                "steps": _int(20, 1, 10000),
                "cfg": _float(8.0, 0.0, 100.0, 0.1),
                "sampler_name": [None, {}],
                "scheduler": [None, {}],
                "positive": ["CONDITIONING", {}],
                "negative": ["CONDITIONING", {}],
                "latent_image": ["LATENT", {}],
                "denoise": _float(1.0, 0.0, 1.0),
            }
        },
        ("LATENT",),
        "sampling",
    ),
    "VAEDecode": NodeSpec(
        {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}}, ("IMAGE",), "latent"
    ),
    "PreviewImage": NodeSpec(
        {"required": {"images": ["IMAGE", {}]}, "hidden": _HIDDEN}, (), "image", output_node=True
    ),
    "SaveImage": NodeSpec(
        {
            "required": {
                "images": ["IMAGE", {}],
                "filename_prefix": ["STRING", {"default": "ComfyUI"}],
            },
            "hidden": _HIDDEN,
        },
        (),
        "image",
        output_node=True,
    ),
}


class _Interrupted(Exception):
    pass


class _NodeFailure(Exception):
    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type


@dataclass(slots=True)
class _Item:
    """A queued prompt, as ComfyUI's queue holds it."""

    number: int
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class FakeComfyui:
    """The state of a fake ComfyUI: what it offers (change it at will), what it was sent.

    `auth` is (user, password) for HTTP Basic or a bearer token string; `vram_mb` (total,
    free) MiB, or None for a CPU-only ComfyUI. `requests` holds ``(method path, JSON body or
    None)`` of the latest 256 requests that passed auth.
    """

    def __init__(
        self,
        *,
        checkpoints: Sequence[str] = ("sd-v1-5.safetensors",),
        loras: Sequence[str] = (),
        samplers: Sequence[str] = KSAMPLER_NAMES,
        schedulers: Sequence[str] = SCHEDULER_NAMES,
        vram_mb: tuple[int, int] | None = (8192, 6144),
        auth: tuple[str, str] | str | None = None,
        step_time: float | None = 0.0,
        png: bytes | None = None,
    ) -> None:
        self.checkpoints = list(checkpoints)
        self.loras = list(loras)
        self.samplers = list(samplers)
        self.schedulers = list(schedulers)
        self.vram_mb = vram_mb
        self.auth = auth
        self.step_time = step_time
        #: PNG bytes every image is, instead of a drawn card (None: draw).
        self.png = png
        #: False: refuse websockets, as a proxy that does not pass them on.
        self.accept_websockets = True
        self.requests: collections.deque[tuple[str, Any]] = collections.deque(maxlen=256)
        #: Prompts that ended, and interrupts that stopped a running prompt.
        self.prompts_done = 0
        self.interrupts = 0
        #: Node ids run (not answered from the cache) by the latest prompt.
        self.last_executed: list[str] = []
        self._injected: dict[str, collections.deque[tuple[int, Any]]] = {}
        self._failures: collections.deque[tuple[str, str, str]] = collections.deque()
        self._number = 0
        self._queue: list[_Item] = []
        self._running: _Item | None = None
        self._interrupt = False
        self._history: dict[str, dict[str, Any]] = {}
        self._files: collections.OrderedDict[tuple[str, str, str], bytes] = (
            collections.OrderedDict()
        )
        self._cache: dict[str, tuple[Any, ...]] = {}
        self._ui_cache: dict[str, dict[str, Any]] = {}
        self._sockets: dict[str, trio.MemorySendChannel[tuple[str, Any]]] = {}
        self._last_node: str | None = None
        self._queued = trio.Event()
        self._changed = trio.Event()
        self._credits = 0
        self._advanced = trio.Event()

    # --- for tests ---------------------------------------------------------------------------

    def inject(self, path: str, status: int, body: Any) -> None:
        """Answer the next request to `path` (``/history/*``: any path under /history/) with
        `status` and `body` instead (bytes are sent as they are, anything else as JSON)."""
        self._injected.setdefault(path, collections.deque()).append((status, body))

    def fail_next(self, node_type: str, exception_type: str, message: str) -> None:
        """Make the next run of a `node_type` node raise, as ComfyUI reports an exception."""
        self._failures.append((node_type, exception_type, message))

    def advance(self, steps: int = 1) -> None:
        """Let KSampler take `steps` more steps (when `step_time` is None)."""
        self._credits += steps
        self._advanced.set()
        self._advanced = trio.Event()

    @property
    def running(self) -> tuple[str, str | None] | None:
        """(prompt id, client id) of the running prompt, if any."""
        item = self._running
        return None if item is None else (item.prompt_id, item.extra_data.get("client_id"))

    @property
    def pending(self) -> list[tuple[str, str | None]]:
        """(prompt id, client id) of the queued prompts, in the order they will run."""
        return [(i.prompt_id, i.extra_data.get("client_id")) for i in sorted(self._queue, key=_key)]

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of `prompt_id` (None until it has ended)."""
        return self._history.get(prompt_id)

    @property
    def statuses(self) -> list[str]:
        """The ``status_str`` of every prompt in the history, oldest first."""
        return [entry["status"]["status_str"] for entry in self._history.values()]

    @property
    def files(self) -> dict[tuple[str, str, str], bytes]:
        """The files ComfyUI holds: {(folder type, subfolder, name): bytes}, type ``input``,
        ``temp`` or ``output``."""
        return dict(self._files)

    async def wait_running(self, predicate: Any = None) -> tuple[str, str | None]:
        """Return (prompt id, client id) once a prompt (one `predicate` accepts) is running."""
        while (running := self.running) is None or (predicate and not predicate(*running)):
            await self._changed.wait()
        return running

    async def wait_pending(self, count: int) -> None:
        """Return once `count` prompts (or more) are queued behind the running one."""
        while len(self._queue) < count:
            await self._changed.wait()

    async def wait_idle(self) -> None:
        """Return once no prompt is running or queued."""
        while self._running is not None or self._queue:
            await self._changed.wait()

    def forget(self) -> None:
        """Lose the queue, history, cache and files, as a restarted ComfyUI does."""
        self._queue.clear()
        self._history.clear()
        self._files.clear()
        self._cache.clear()
        self._ui_cache.clear()

    # --- ComfyUI's behaviour -----------------------------------------------------------------

    def object_info(self, node: str) -> dict[str, Any]:
        spec = NODES.get(node)
        if spec is None:
            return {}
        inputs: dict[str, Any] = {}
        for group, section in spec.inputs.items():
            if group == "hidden":
                inputs[group] = dict(section)
                continue
            inputs[group] = {
                name: [self._choices(node, name) if value[0] is None else value[0], value[1]]
                for name, value in section.items()
            }
        return {
            node: {
                "input": inputs,
                "input_order": {g: list(s) for g, s in inputs.items() if g != "hidden"},
                "is_input_list": False,
                "output": list(spec.returns),
                "output_is_list": [False] * len(spec.returns),
                "output_name": list(spec.returns),
                "name": node,
                "display_name": node,
                "description": "",
                "python_module": "nodes",
                "category": spec.category,
                "output_node": spec.output_node,
                "has_intermediate_output": False,
                "search_aliases": [],
            }
        }

    def _choices(self, node: str, name: str) -> list[str]:
        if name == "ckpt_name":
            return list(self.checkpoints)
        if name == "lora_name":
            return list(self.loras)
        if name == "sampler_name":
            return list(self.samplers)
        if name == "scheduler":
            return list(self.schedulers)
        return sorted(n for (kind, sub, n) in self._files if kind == "input" and not sub)

    def system_stats(self) -> dict[str, Any]:
        gib = 2**30
        if self.vram_mb is None:
            device = {"name": "cpu", "type": "cpu", "index": None}
            total = free = 32 * gib
        else:
            device = {"name": "cuda:0 NVIDIA Fake : cudaMallocAsync", "type": "cuda", "index": 0}
            total, free = (mb * 2**20 for mb in self.vram_mb)
        return {
            "system": {
                "os": "linux",
                "ram_total": 32 * gib,
                "ram_free": 16 * gib,
                "comfyui_version": "0.3.99-fake",
                "python_version": "3.12.0",
                "pytorch_version": "2.9.0+cu128",
                "embedded_python": False,
                "argv": ["main.py"],
            },
            "devices": [
                {
                    **device,
                    "vram_total": total,
                    "vram_free": free,
                    "torch_vram_total": total,
                    "torch_vram_free": free,
                }
            ],
        }

    def queue_info(self) -> dict[str, Any]:
        remaining = len(self._queue) + (self._running is not None)
        return {"exec_info": {"queue_remaining": remaining}}

    def post_prompt(self, body: Any) -> tuple[int, dict[str, Any]]:
        """``POST /prompt``: (status, answer)."""
        if not isinstance(body, dict) or "prompt" not in body:
            error = _error("no_prompt", "No prompt provided", "No prompt provided")
            return 400, {"error": error, "node_errors": {}}
        prompt = body["prompt"]
        prompt_id = body.get("prompt_id")
        if prompt_id is None:
            prompt_id = str(uuid.uuid4())
        elif not _is_uuid(prompt_id):
            error = _error(
                "invalid_prompt_id",
                "prompt_id must be a valid UUID",
                "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                "omit it to let the server generate one",
            )
            return 400, {"error": error, "node_errors": {}}
        ok, error, outputs, node_errors = _Validator(self, prompt).run()
        if not ok:
            return 400, {"error": error, "node_errors": node_errors}
        extra = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        extra["create_time"] = int(time.time() * 1000)
        number = self._number
        self._number += 1
        self._queue.append(_Item(number, prompt_id, prompt, extra, outputs))
        self._queued.set()
        self._queue_updated()
        # Outputs that failed validation are dropped, and named in node_errors.
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def post_queue(self, body: Any) -> None:
        if not isinstance(body, dict):
            return
        if body.get("clear"):
            self._queue.clear()
        for prompt_id in body.get("delete") or []:
            for item in self._queue:
                if item.prompt_id == prompt_id:
                    self._queue.remove(item)
                    break
        self._queue_updated()

    def post_interrupt(self, body: Any) -> None:
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        running = self._running
        if running is not None and (not prompt_id or prompt_id == running.prompt_id):
            self._interrupt = True
            self.interrupts += 1
            self._advanced.set()  # wake a KSampler waiting for steps
            self._advanced = trio.Event()

    def upload(self, fields: dict[str, Any], image: tuple[str, bytes] | None) -> Response:
        kind = fields.get("type") or "input"
        if image is None or not image[0] or kind not in ("input", "temp", "output"):
            return Response(status_code=400)
        name, data = image
        subfolder = fields.get("subfolder") or ""
        if name.startswith("/") or ".." in name or ".." in subfolder:
            return Response(status_code=400)
        if fields.get("overwrite") not in ("true", "1"):
            stem, dot, suffix = name.rpartition(".")
            counter = 1
            while (old := self._files.get((kind, subfolder, name))) is not None and old != data:
                name = f"{stem} ({counter}){dot}{suffix}" if dot else f"{name} ({counter})"
                counter += 1
        self._store(kind, subfolder, name, data)
        return JSONResponse({"name": name, "subfolder": subfolder, "type": kind})

    def view(self, query: dict[str, str]) -> Response:
        filename = query.get("filename")
        if not filename:
            return Response(status_code=404)
        if filename.startswith("/") or ".." in filename:
            return Response(status_code=400)
        key = (query.get("type", "output"), query.get("subfolder", ""), filename)
        data = self._files.get(key)
        if data is None:
            return Response(status_code=404)
        return Response(data, media_type="image/png")

    def _store(self, kind: str, subfolder: str, name: str, data: bytes) -> None:
        self._files[(kind, subfolder, name)] = data
        self._files.move_to_end((kind, subfolder, name))
        while len(self._files) > _MAX_FILES:
            self._files.popitem(last=False)

    def _file(self, annotated: str) -> bytes | None:
        """The bytes of a LoadImage name: ``sub/name.png [temp]`` (input when unannotated)."""
        kind = "input"
        for candidate in ("input", "temp", "output"):
            if annotated.endswith(f" [{candidate}]"):
                kind, annotated = candidate, annotated[: -len(candidate) - 3]
                break
        subfolder, _, name = annotated.rpartition("/")
        return self._files.get((kind, subfolder, name))

    # --- the websocket -----------------------------------------------------------------------

    def _send(self, event: str | int, data: Any, sid: str | None) -> None:
        message = (
            ("bytes", data) if isinstance(event, int) else ("json", {"type": event, "data": data})
        )
        targets = list(self._sockets.items()) if sid is None else [(sid, self._sockets.get(sid))]
        for key, channel in targets:
            if channel is None:
                continue
            try:
                channel.send_nowait(message)
            except trio.WouldBlock:  # a client that does not read: drop it
                channel.close()
                self._sockets.pop(key, None)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._sockets.pop(key, None)  # its websocket is closing

    def _queue_updated(self) -> None:
        self._send("status", {"status": self.queue_info()}, None)
        self._changed.set()
        self._changed = trio.Event()

    # --- the prompt worker -------------------------------------------------------------------

    async def _work(self) -> None:
        """Run queued prompts one at a time, until cancelled (the server stops)."""
        while True:
            while not self._queue:
                self._queued = trio.Event()
                await self._queued.wait()
            item = min(self._queue, key=_key)
            self._queue.remove(item)
            self._running = item
            self._queue_updated()
            try:
                await self._execute(item)
            finally:
                self._running = None
                self._last_node = None
            self._queue_updated()

    async def _execute(self, item: _Item) -> None:
        sid = item.extra_data.get("client_id")
        messages: list[list[Any]] = []
        self._interrupt = False

        def add_message(event: str, data: dict[str, Any], broadcast: bool = False) -> None:
            data = {**data, "timestamp": int(time.time() * 1000)}
            messages.append([event, data])
            if sid is not None or broadcast:
                self._send(event, data, sid)

        prompt_id = item.prompt_id
        add_message("execution_start", {"prompt_id": prompt_id})
        run = _Run(self, item)
        cached = [node for node in item.prompt if run.signature(node) in self._cache]
        add_message("execution_cached", {"nodes": cached, "prompt_id": prompt_id})
        outputs: dict[str, Any] = {}
        success = False
        node = ""
        try:
            for node in run.order():
                if self._interrupt:
                    raise _Interrupted
                ui = await run.execute(node, sid)
                if ui is not None:
                    outputs[node] = ui
            success = True
            add_message("execution_success", {"prompt_id": prompt_id})
        except _Interrupted:
            add_message(
                "execution_interrupted",
                {
                    "prompt_id": prompt_id,
                    "node_id": node,
                    "node_type": item.prompt[node]["class_type"],
                    "executed": run.executed,
                },
                broadcast=True,
            )
        except _NodeFailure as exc:
            add_message(
                "execution_error",
                {
                    "prompt_id": prompt_id,
                    "node_id": node,
                    "node_type": item.prompt[node]["class_type"],
                    "executed": run.executed,
                    "exception_message": str(exc),
                    "exception_type": exc.exception_type,
                    "traceback": ['  File "nodes.py", line 1, in sample\n'],
                    "current_inputs": {},
                    "current_outputs": [],
                },
            )
        self.last_executed = run.executed
        self._cache = run.cache
        # ComfyUI writes the history after execution_success has gone out (the quirk).
        await trio.lowlevel.checkpoint()
        self._history[prompt_id] = {
            "prompt": item.as_list(),
            "outputs": outputs,
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": messages,
            },
            "meta": {
                node: {
                    "node_id": node,
                    "display_node": node,
                    "parent_node": None,
                    "real_node_id": node,
                }
                for node in outputs
            },
        }
        self.prompts_done += 1
        if sid is not None:
            self._send("executing", {"node": None, "prompt_id": prompt_id}, sid)

    async def _next_step(self) -> None:
        if self.step_time is not None:
            await trio.sleep(self.step_time)
            return
        while self._credits == 0 and not self._interrupt:
            await self._advanced.wait()
        if self._credits:
            self._credits -= 1


class _Run:
    """One prompt's execution: the order of its nodes, their cache keys and values."""

    def __init__(self, fake: FakeComfyui, item: _Item) -> None:
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
                raise _NodeFailure(kind, message)
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
                result = _evaluate(fake, class_type, inputs)
        except (KeyError, TypeError, ValueError, OSError) as exc:  # as ComfyUI reports any
            raise _NodeFailure(type(exc).__name__, str(exc)) from exc
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
                raise _Interrupted
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


def _evaluate(fake: FakeComfyui, class_type: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
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
    raise _NodeFailure("RuntimeError", f"the fake cannot run {class_type}")


class _Validator:
    """``execution.validate_prompt`` for the fake's nodes: the same checks, the same shapes."""

    def __init__(self, fake: FakeComfyui, prompt: Any) -> None:
        self.fake = fake
        self.prompt = prompt
        self.validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}

    def run(self) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
        prompt = self.prompt
        if not isinstance(prompt, dict):
            return False, _error("invalid_prompt", "Invalid prompt", "not an object"), [], {}
        outputs = []
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                error = _error(
                    "missing_node_type",
                    f"Node 'ID #{node_id}' has no class_type. The workflow may be corrupted or "
                    "a custom node is missing.",
                    f"Node ID '#{node_id}'",
                    node_id=node_id,
                    class_type=None,
                    node_title=None,
                )
                return False, error, [], {}
            spec = NODES.get(node["class_type"])
            if spec is None:
                title = node["class_type"]
                error = _error(
                    "missing_node_type",
                    f"Node '{title}' not found. The custom node may not be installed.",
                    f"Node ID '#{node_id}'",
                    node_id=node_id,
                    class_type=title,
                    node_title=title,
                )
                return False, error, [], {}
            if spec.output_node:
                outputs.append(node_id)
        if not outputs:
            return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}
        good, errors, node_errors = [], [], {}
        for output in outputs:
            try:
                valid, reasons = self._inputs(output)
            except (KeyError, IndexError, TypeError, AttributeError) as exc:
                valid = False
                reasons = [
                    {
                        "type": "exception_during_validation",
                        "message": "Exception when validating node",
                        "details": str(exc),
                        "extra_info": {"exception_type": type(exc).__name__, "traceback": []},
                    }
                ]
                self.validated[output] = (False, reasons)
            if valid:
                good.append(output)
                continue
            errors.append((output, reasons))
            for node_id, (ok, node_reasons) in self.validated.items():
                if ok or not node_reasons:
                    continue
                entry = node_errors.setdefault(
                    node_id,
                    {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    },
                )
                entry["dependent_outputs"].append(output)
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}" for _, rs in errors for e in rs)
            error = _error(
                "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
            )
            return False, error, [], node_errors
        return True, None, good, node_errors

    def _inputs(self, node_id: str) -> tuple[bool, list[dict[str, Any]]]:
        if node_id in self.validated:
            return self.validated[node_id]
        node = self.prompt[node_id]
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            inputs = node["inputs"] = {}
        spec = NODES[node["class_type"]]
        info = self.fake.object_info(node["class_type"])[node["class_type"]]["input"]
        errors: list[dict[str, Any]] = []
        valid = True
        for group in ("required", "optional"):
            for name, (kind, options) in info.get(group, {}).items():
                if name not in inputs:
                    if group == "required":
                        errors.append(
                            _reason(
                                "required_input_missing", "Required input is missing", name, name
                            )
                        )
                    continue
                value = inputs[name]
                config = [kind, options]
                if isinstance(value, list):
                    if len(value) != 2:
                        errors.append(
                            _reason(
                                "bad_linked_input",
                                "Bad linked input, must be a length-2 list of [node_id, slot_index]",  # noqa: E501
                                name,
                                name,
                                input_config=config,
                                received_value=value,
                            )
                        )
                        continue
                    linked = self.prompt[str(value[0])]  # KeyError: exception_during_validation
                    received = NODES[linked["class_type"]].returns[value[1]]
                    if received != kind:
                        errors.append(
                            _reason(
                                "return_type_mismatch",
                                "Return type mismatch between linked nodes",
                                f"{name}, received_type({received}) mismatch input_type({kind})",
                                name,
                                input_config=config,
                                received_type=received,
                                linked_node=value,
                            )
                        )
                        continue
                    if not self._inputs(str(value[0]))[0]:
                        valid = False
                    continue
                converted = _convert(kind, value)
                if converted is None:
                    errors.append(
                        _reason(
                            "invalid_input_type",
                            f"Failed to convert an input value to a {kind} value",
                            f"{name}, {value}, invalid literal",
                            name,
                            input_config=config,
                            received_value=value,
                        )
                    )
                    continue
                inputs[name] = value = converted
                if name in spec.validates:
                    if self.fake._file(str(value)) is None:
                        errors.append(
                            _reason(
                                "custom_validation_failed",
                                "Custom validation failed for node",
                                f"{name} - Invalid image file: {value}",
                                name,
                            )
                        )
                    continue
                if "min" in options and value < options["min"]:
                    errors.append(
                        _reason(
                            "value_smaller_than_min",
                            f"Value {value} smaller than min of {options['min']}",
                            name,
                            name,
                            input_config=config,
                            received_value=value,
                        )
                    )
                elif "max" in options and value > options["max"]:
                    errors.append(
                        _reason(
                            "value_bigger_than_max",
                            f"Value {value} bigger than max of {options['max']}",
                            name,
                            name,
                            input_config=config,
                            received_value=value,
                        )
                    )
                elif isinstance(kind, list) and value not in kind:
                    listed = f"(list of length {len(kind)})" if len(kind) > 20 else str(kind)
                    errors.append(
                        _reason(
                            "value_not_in_list",
                            "Value not in list",
                            f"{name}: {value!r} not in {listed}",
                            name,
                            input_config=None if len(kind) > 20 else config,
                            received_value=value,
                        )
                    )
        result = (valid and not errors, errors)
        self.validated[node_id] = result
        return result


def _convert(kind: Any, value: Any) -> Any:
    try:
        if kind == "INT":
            return int(value)
        if kind == "FLOAT":
            return float(value)
        if kind == "STRING":
            return str(value)
    except (TypeError, ValueError):
        return None
    return value


def _error(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _reason(kind: str, message: str, details: str, name: str, **extra: Any) -> dict[str, Any]:
    return _error(kind, message, details, input_name=name, **extra)


def _key(item: _Item) -> int:
    return item.number


def _is_uuid(value: Any) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False


class _Injected(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


class _Unauthorized(Exception):
    pass


def _authorized(fake: FakeComfyui, header: str | None) -> bool:
    if fake.auth is None:
        return True
    if isinstance(fake.auth, tuple):
        expected = "Basic " + base64.b64encode(":".join(fake.auth).encode()).decode()
    else:
        expected = f"Bearer {fake.auth}"
    return header is not None and secrets.compare_digest(header.encode(), expected.encode())


def _parse_form(content_type: str, body: bytes) -> tuple[dict[str, str], tuple[str, bytes] | None]:
    """The text fields and the ``image`` file of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, str] = {}
    image = None
    if not message.is_multipart():
        return fields, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "image":
            image = (part.get_filename() or "", payload)
        elif isinstance(name, str):
            fields[name] = payload.decode(errors="replace")
    return fields, image


def create_app(fake: FakeComfyui) -> FastAPI:
    """ComfyUI's API over `fake`."""

    app = FastAPI(title="fake ComfyUI")

    @app.middleware("http")
    async def check(request: Request, call_next: Any) -> Response:
        if not _authorized(fake, request.headers.get("authorization")):
            return Response(b"<html>401 Authorization Required</html>", 401, media_type="text/html")
        body = await request.body()
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        fake.requests.append((f"{request.method} {request.url.path}", payload))
        path = request.url.path
        queue = fake._injected.get(path) or fake._injected.get(path.rpartition("/")[0] + "/*")
        if queue:
            status, answer = queue.popleft()
            if isinstance(answer, bytes):
                return Response(answer, status_code=status, media_type="text/html")
            return JSONResponse(answer, status_code=status)
        return await call_next(request)

    @app.get("/object_info/{node}")
    async def object_info(node: str) -> dict[str, Any]:
        return fake.object_info(node)

    @app.get("/system_stats")
    async def system_stats() -> dict[str, Any]:
        return fake.system_stats()

    @app.get("/prompt")
    async def get_prompt() -> dict[str, Any]:
        return fake.queue_info()

    @app.post("/prompt")
    async def post_prompt(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return Response(status_code=500)  # aiohttp's request.json() raises
        status, answer = fake.post_prompt(body)
        return JSONResponse(answer, status_code=status)

    @app.get("/queue")
    async def get_queue() -> dict[str, Any]:
        running = [fake._running.as_list()] if fake._running is not None else []
        pending = [item.as_list() for item in sorted(fake._queue, key=_key)]
        return {"queue_running": running, "queue_pending": pending}

    @app.post("/queue")
    async def post_queue(request: Request) -> Response:
        fake.post_queue(json.loads(await request.body() or b"{}"))
        return Response(status_code=200)

    @app.post("/interrupt")
    async def interrupt(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            body = {}
        fake.post_interrupt(body)
        return Response(status_code=200)

    @app.get("/history/{prompt_id}")
    async def history(prompt_id: str) -> dict[str, Any]:
        entry = fake._history.get(prompt_id)
        return {} if entry is None else {prompt_id: entry}

    @app.get("/view")
    async def view(request: Request) -> Response:
        return fake.view(dict(request.query_params))

    @app.post("/upload/image")
    async def upload(request: Request) -> Response:
        fields, image = _parse_form(request.headers.get("content-type", ""), await request.body())
        return fake.upload(fields, image)

    @app.websocket("/ws")
    async def websocket(ws: WebSocket) -> None:
        if not fake.accept_websockets or not _authorized(fake, ws.headers.get("authorization")):
            await ws.close(code=1008)
            return
        await ws.accept()
        sid = ws.query_params.get("clientId") or uuid.uuid4().hex
        send, receive = trio.open_memory_channel[tuple[str, Any]](_WS_BUFFER)
        old = fake._sockets.pop(sid, None)
        if old is not None:
            old.close()
        fake._sockets[sid] = send
        send.send_nowait(
            ("json", {"type": "status", "data": {"status": fake.queue_info(), "sid": sid}})
        )
        running = fake._running
        if running is not None and running.extra_data.get("client_id") == sid and fake._last_node:
            send.send_nowait(("json", {"type": "executing", "data": {"node": fake._last_node}}))

        async def pump() -> None:
            async with receive:
                async for kind, payload in receive:
                    if kind == "json":
                        await ws.send_text(json.dumps(payload))
                    else:
                        await ws.send_bytes(payload)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                while (await ws.receive())["type"] != "websocket.disconnect":
                    pass  # ComfyUI reads feature flags here; the fake ignores them
                nursery.cancel_scope.cancel()
        finally:
            if fake._sockets.get(sid) is send:
                del fake._sockets[sid]

    return app


@asynccontextmanager
async def open_fake_comfyui(fake: FakeComfyui, bind: str = "127.0.0.1:0") -> AsyncIterator[str]:
    """Serve `fake` over HTTP on `bind` and yield its URL (``http://127.0.0.1:PORT``).

    Leaving the block stops the server and its prompt worker (ComfyUI "goes away": a running
    prompt is lost); serving the same `fake` again on the same port brings it back with its
    queue (call `forget()` first for a restarted ComfyUI).
    """
    async with open_service_nursery() as nursery:
        urls = await nursery.start(serve_http, create_app(fake), bind)
        nursery.start_soon(fake._work)
        try:
            yield urls[0]
        finally:
            nursery.cancel_scope.cancel()
