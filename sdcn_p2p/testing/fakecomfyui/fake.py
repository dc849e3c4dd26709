"""The state of the fake ComfyUI: what it offers, what it was sent, its queue and history.

`FakeComfyui` answers each API call as ComfyUI would (the server in `server` only carries them
over HTTP and WebSocket), runs queued prompts one at a time (`run_queue`, each by an
`execution.Run`), sends execution events to the websocket of the prompt's client id and
writes the history, and lets tests arrange failures and pace the steps.
"""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Sequence
from typing import Any

import trio

from sdcn_p2p.testing.fakecomfyui.execution import Interrupted, NodeFailure, QueueItem, Run
from sdcn_p2p.testing.fakecomfyui.nodes import KSAMPLER_NAMES, SCHEDULER_NAMES, object_info
from sdcn_p2p.testing.fakecomfyui.validator import comfy_error, validate_prompt

__all__ = ["OUT_OF_MEMORY", "FakeComfyui"]

#: An `fail_next` exception as ComfyUI reports a CUDA out-of-memory error (type, message).
OUT_OF_MEMORY = (
    "torch.OutOfMemoryError",
    "Allocation on device \nThis error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a "
    "large number.",
)
_WS_BUFFER = 4096
_MAX_FILES = 512


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
        self._queue: list[QueueItem] = []
        self._running: QueueItem | None = None
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
        return object_info(node, self._choices)

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

    def get_queue(self) -> dict[str, Any]:
        """``GET /queue``: the running prompt and the queued ones, in the order they will run."""
        running = [self._running.as_list()] if self._running is not None else []
        pending = [item.as_list() for item in sorted(self._queue, key=_key)]
        return {"queue_running": running, "queue_pending": pending}

    def post_prompt(self, body: Any) -> tuple[int, dict[str, Any]]:
        """``POST /prompt``: (status, answer)."""
        if not isinstance(body, dict) or "prompt" not in body:
            error = comfy_error("no_prompt", "No prompt provided", "No prompt provided")
            return 400, {"error": error, "node_errors": {}}
        prompt = body["prompt"]
        prompt_id = body.get("prompt_id")
        if prompt_id is None:
            prompt_id = str(uuid.uuid4())
        elif not _is_uuid(prompt_id):
            error = comfy_error(
                "invalid_prompt_id",
                "prompt_id must be a valid UUID",
                "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                "omit it to let the server generate one",
            )
            return 400, {"error": error, "node_errors": {}}
        ok, error, outputs, node_errors = validate_prompt(
            prompt, self.object_info, lambda name: self._file(name) is not None
        )
        if not ok:
            return 400, {"error": error, "node_errors": node_errors}
        extra = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        extra["create_time"] = int(time.time() * 1000)
        number = self._number
        self._number += 1
        self._queue.append(QueueItem(number, prompt_id, prompt, extra, outputs))
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

    def upload(
        self, fields: dict[str, Any], image: tuple[str, bytes] | None
    ) -> tuple[int, dict[str, str] | None]:
        """``POST /upload/image`` of the form `fields` and `image` (file name, bytes): (status,
        answer), None for an empty body."""
        kind = fields.get("type") or "input"
        if image is None or not image[0] or kind not in ("input", "temp", "output"):
            return 400, None
        name, data = image
        subfolder = fields.get("subfolder") or ""
        if name.startswith("/") or ".." in name or ".." in subfolder:
            return 400, None
        if fields.get("overwrite") not in ("true", "1"):
            stem, dot, suffix = name.rpartition(".")
            counter = 1
            while (old := self._files.get((kind, subfolder, name))) is not None and old != data:
                name = f"{stem} ({counter}){dot}{suffix}" if dot else f"{name} ({counter})"
                counter += 1
        self._store(kind, subfolder, name, data)
        return 200, {"name": name, "subfolder": subfolder, "type": kind}

    def view(self, query: dict[str, str]) -> tuple[int, bytes | None]:
        """``GET /view`` with `query`: (status, the image's bytes), None for an empty body."""
        filename = query.get("filename")
        if not filename:
            return 404, None
        if filename.startswith("/") or ".." in filename:
            return 400, None
        key = (query.get("type", "output"), query.get("subfolder", ""), filename)
        data = self._files.get(key)
        if data is None:
            return 404, None
        return 200, data

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

    def take_injected(self, path: str) -> tuple[int, Any] | None:
        """The answer `inject` set for the next request to `path`, if any, taken."""
        queue = self._injected.get(path) or self._injected.get(path.rpartition("/")[0] + "/*")
        return queue.popleft() if queue else None

    # --- the websocket -----------------------------------------------------------------------

    def connect(
        self, sid: str
    ) -> tuple[trio.MemorySendChannel[tuple[str, Any]], trio.MemoryReceiveChannel[tuple[str, Any]]]:
        """Take the websocket of client `sid` (instead of an older one with that id): the
        messages for it, ``("json", message)`` or ``("bytes", frame)``, come on the channel,
        first ``status`` and, if its prompt is running, the node it is at. Hand the send
        channel to `disconnect` when it closes."""
        send, receive = trio.open_memory_channel[tuple[str, Any]](_WS_BUFFER)
        old = self._sockets.pop(sid, None)
        if old is not None:
            old.close()
        self._sockets[sid] = send
        send.send_nowait(
            ("json", {"type": "status", "data": {"status": self.queue_info(), "sid": sid}})
        )
        running = self._running
        if running is not None and running.extra_data.get("client_id") == sid and self._last_node:
            send.send_nowait(("json", {"type": "executing", "data": {"node": self._last_node}}))
        return send, receive

    def disconnect(self, sid: str, send: trio.MemorySendChannel[tuple[str, Any]]) -> None:
        """Forget the websocket of client `sid` that `connect` gave `send`, unless a newer one
        took its place."""
        if self._sockets.get(sid) is send:
            del self._sockets[sid]

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

    async def run_queue(self) -> None:
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

    async def _execute(self, item: QueueItem) -> None:
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
        run = Run(self, item)
        cached = [node for node in item.prompt if run.signature(node) in self._cache]
        add_message("execution_cached", {"nodes": cached, "prompt_id": prompt_id})
        outputs: dict[str, Any] = {}
        success = False
        node = ""
        try:
            for node in run.order():
                if self._interrupt:
                    raise Interrupted
                ui = await run.execute(node, sid)
                if ui is not None:
                    outputs[node] = ui
            success = True
            add_message("execution_success", {"prompt_id": prompt_id})
        except Interrupted:
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
        except NodeFailure as exc:
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


def _key(item: QueueItem) -> int:
    return item.number


def _is_uuid(value: Any) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False
