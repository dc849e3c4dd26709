"""The ComfyUI backend: a ComfyUI server, driven over its HTTP and WebSocket API.

Capabilities are what ``/object_info`` and ``/system_stats`` say ComfyUI offers, under A1111's
names (`offer`, `samplers`), with file hashes when this node can read ComfyUI's ``models``
folder (`scan`). Anything ComfyUI lacks is refused with "unsupported" before anything is
queued.

A job is one API-format workflow per image (`workflow`), all queued at once with ``POST
/prompt`` under a client id of its own; an img2img job's init image is first uploaded (``POST
/upload/image``) into ComfyUI's temp folder, which it empties when it starts. Progress comes
from the job's websocket (`events`); a prompt's result is read from ``/history/{prompt_id}``
(``{}`` until it has ended) and its image from ``/view``. Where the websocket says nothing,
``/history`` is polled. A failed prompt (``execution_error``) fails the job with
"backend_failed" and ComfyUI's exception message, saying so when it is out of GPU memory.

A cancelled or failed job leaves nothing behind: its queued prompts are deleted (``POST /queue
{"delete": [...]}``) and, if one is running, ComfyUI is interrupted (``POST /interrupt
{"prompt_id"}``) only after ``GET /queue`` shows that the running prompt is ours: another
client's work is never stopped. (A ComfyUI older than the targeted interrupt of 2025 treats it
as a global one; the check before it leaves a window of one request.) ComfyUI runs one prompt
at a time: give the node one slot.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from sdcn_p2p._config import require_at_least, require_positive
from sdcn_p2p.backends import Capabilities, JobOutput, resolve_or_rescan
from sdcn_p2p.backends._http import HttpFailure, check_url, request_capped
from sdcn_p2p.backends.comfyui.events import Events, Tracker, open_events
from sdcn_p2p.backends.comfyui.offer import Offer, combo_choices, make_offer, parse_devices
from sdcn_p2p.backends.comfyui.parse import (
    ComfyError,
    Refused,
    check_png,
    describe_error,
    execution_failure,
    image_suffix,
    parse_json,
    queued_ids,
    validation_error,
)
from sdcn_p2p.backends.comfyui.scan import open_hash_cache, read_files
from sdcn_p2p.backends.comfyui.workflow import OUTPUT_NODE, Plan, build_workflow
from sdcn_p2p.errors import BackendUnavailable, JobError, JobErrorCode
from sdcn_p2p.jobs import JobRequest

if TYPE_CHECKING:
    from sdcn_p2p.backends.diffusers.scan import HashCache

__all__ = ["ComfyuiBackend", "ComfyuiConfig", "open_comfyui_backend"]

log = logging.getLogger(__name__)

_MIB = 2**20


@dataclass(frozen=True, slots=True)
class ComfyuiConfig:
    """Timeouts (seconds), limits and the optional models folder of the ComfyUI backend."""

    #: Each HTTP call, and opening the websocket.
    timeout: float = 10.0
    #: Longest a job may take; the job's own deadline normally cancels it well before.
    job_timeout: float = 3600.0
    #: Deleting and interrupting a cancelled job's prompts.
    interrupt_timeout: float = 5.0
    #: How often /history is read while the websocket cannot tell (it broke, or a prompt
    #: ended but its history is not there yet).
    poll_interval: float = 1.0
    #: How often /history is read anyway while the websocket is quiet (a lost message).
    quiet_poll_interval: float = 30.0
    #: Cap on one HTTP answer or websocket message, in bytes.
    max_response_bytes: int = 64 * _MIB
    #: ComfyUI's ``models`` folder, when this node can read it: checkpoints and LoRAs found
    #: there are advertised with their hash and architecture.
    models_dir: Path | None = None
    #: The JSON file of known hashes (None: ``comfyui-hashes.json`` in the user cache dir).
    hash_cache: Path | None = None

    def __post_init__(self) -> None:
        require_positive(
            self,
            "timeout",
            "job_timeout",
            "interrupt_timeout",
            "poll_interval",
            "quiet_poll_interval",
        )
        require_at_least(self, 1, "max_response_bytes")


class ComfyuiBackend:
    """A ComfyUI server as a `Backend`. Create with `open_comfyui_backend`.

    It stays usable while ComfyUI is down: calls fail (capabilities with BackendUnavailable,
    jobs with "backend_failed") and work again once it is back.
    """

    name = "comfyui"

    def __init__(
        self,
        client: httpx.AsyncClient,
        config: ComfyuiConfig = ComfyuiConfig(),
        *,
        ws_headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        """Drive the ComfyUI at `client`'s base URL, sending `ws_headers` (credentials) when
        opening its websocket; the caller closes `client`."""
        self.config = config
        self._client = client
        self._ws_headers = list(ws_headers)
        self._offer: Offer | None = None
        self._timeouts = httpx.Timeout(config.timeout)
        self._hash_lock = trio.Lock()
        self._hash_cache: HashCache | None = None  # opened on first use
        #: Interrupts posted for cancelled jobs (for tests and logs).
        self.interrupts = 0

    @property
    def url(self) -> str:
        """ComfyUI's base URL."""
        return str(self._client.base_url).rstrip("/")

    async def capabilities(self) -> Capabilities:
        """Read ComfyUI's checkpoints, LoRAs, samplers, schedulers and VRAM.

        Raises BackendUnavailable if it cannot be reached, refuses our credentials or answers
        nonsense.
        """
        try:
            return (await self._fetch_offer()).capabilities
        except ComfyError as exc:
            raise BackendUnavailable(str(exc)) from exc

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        """Run `job` on ComfyUI; see `Backend.generate` and the module docstring.

        Cancelling deletes the job's queued prompts and interrupts its running one (shielded,
        within `config.interrupt_timeout`) before the cancellation goes on.
        """
        plan = await self._plan(job)
        try:
            with trio.move_on_after(self.config.job_timeout) as scope:
                async with self._open_events(job, progress) as events:
                    image = await self._upload(job.init_image) if job.init_image else None
                    images = await self._run(job, plan, image, events)
            if scope.cancelled_caught:
                raise ComfyError(f"the job did not finish within {self.config.job_timeout:g} s")
        except Refused as exc:
            if exc.code == JobErrorCode.UNSUPPORTED:
                self._offer = None  # stale: read them again next time
            raise JobError(exc.code, f"ComfyUI at {self.url}: {exc}") from exc
        except ComfyError as exc:
            raise JobError(JobErrorCode.BACKEND_FAILED, f"ComfyUI at {self.url}: {exc}") from exc
        seeds = [job.seed + i for i in range(job.batch_size)]
        info = {
            "seeds": seeds,
            "comfyui_sampler": plan.sampler,
            "comfyui_scheduler": plan.scheduler,
        }
        return JobOutput(images, info)

    # --- capabilities ----------------------------------------------------------------------------

    async def _fetch_offer(self) -> Offer:
        self._offer = None
        checkpoint_node = await self._object_info("CheckpointLoaderSimple")
        lora_node = await self._object_info("LoraLoader")
        sampler_node = await self._object_info("KSampler")
        if not checkpoint_node or not sampler_node:
            raise ComfyError("/object_info has no CheckpointLoaderSimple or KSampler: not ComfyUI?")
        checkpoints = combo_choices(checkpoint_node, "CheckpointLoaderSimple", "ckpt_name")
        loras = combo_choices(lora_node, "LoraLoader", "lora_name") if lora_node else []
        samplers = frozenset(combo_choices(sampler_node, "KSampler", "sampler_name"))
        schedulers = frozenset(combo_choices(sampler_node, "KSampler", "scheduler"))
        vram = parse_devices(await self._get_json("/system_stats"))
        self._offer = make_offer(
            self.name,
            checkpoints=checkpoints,
            loras=loras,
            samplers=samplers,
            schedulers=schedulers,
            vram=vram,
            files=await self._file_info(checkpoints, loras),
        )
        return self._offer

    async def _plan(self, job: JobRequest) -> Plan:
        """Raises JobError: "unsupported", or "backend_failed" if ComfyUI cannot answer."""
        try:
            return await resolve_or_rescan(
                self._offer, lambda offer: offer.plan(job), self._fetch_offer
            )
        except ComfyError as exc:
            raise JobError(JobErrorCode.BACKEND_FAILED, f"ComfyUI at {self.url}: {exc}") from exc

    async def _object_info(self, node: str) -> dict[str, Any]:
        data = await self._get_json(f"/object_info/{node}")
        if not isinstance(data, dict):
            raise ComfyError(f"/object_info/{node} is not a JSON object")
        info = data.get(node, {})  # {} when ComfyUI has no such node
        if not isinstance(info, dict):
            raise ComfyError(f"/object_info/{node} is not a node description")
        return info

    async def _file_info(
        self, checkpoints: list[str], loras: list[str]
    ) -> dict[tuple[str, str], dict[str, str]]:
        """{(folder, ComfyUI name): {"hash", "architecture"}} of the files this node can read."""
        if self.config.models_dir is None:
            return {}
        async with self._hash_lock:  # one scan at a time: the cache is not thread-safe
            if self._hash_cache is None:
                self._hash_cache = open_hash_cache(self.config.hash_cache)
            wanted = [("checkpoints", n) for n in checkpoints] + [("loras", n) for n in loras]
            return await trio.to_thread.run_sync(
                read_files, self.config.models_dir, self._hash_cache, wanted
            )

    # --- jobs --------------------------------------------------------------------------------

    def _open_events(
        self, job: JobRequest, progress: Callable[[int, int], None]
    ) -> AbstractAsyncContextManager[Events]:
        """The job's websocket, following its prompts (see `events.open_events`)."""
        return open_events(
            self._client.base_url,
            Tracker(job.steps, job.batch_size, progress),
            headers=self._ws_headers,
            open_timeout=self.config.timeout,
            max_message_size=self.config.max_response_bytes,
        )

    async def _upload(self, image: bytes) -> str:
        """Put the init image in ComfyUI's temp folder; return its LoadImage name."""
        name = f"sdcn-{hashlib.sha256(image).hexdigest()[:32]}.{image_suffix(image)}"
        status, body = await self._call(
            "POST",
            "/upload/image",
            files={"image": (name, image, "application/octet-stream")},
            data={"type": "temp", "overwrite": "true"},
        )
        if status >= 400:
            raise ComfyError(f"/upload/image failed: {describe_error(status, body)}")
        answer = parse_json(body, "/upload/image")
        stored = answer.get("name") if isinstance(answer, dict) else None
        if not isinstance(stored, str) or not stored:
            raise ComfyError("/upload/image answered without a name")
        subfolder = answer.get("subfolder") or ""
        path = f"{subfolder}/{stored}" if isinstance(subfolder, str) and subfolder else stored
        return f"{path} [temp]"

    async def _run(
        self, job: JobRequest, plan: Plan, image: str | None, events: Events
    ) -> list[bytes]:
        posted: list[str] = []
        finished = 0
        try:
            for i in range(job.batch_size):
                posted.append(
                    await self._submit(
                        build_workflow(job, plan, job.seed + i, image), events.client_id
                    )
                )
            images: list[bytes] = []
            for prompt_id in posted:
                entry = await self._wait_history(prompt_id, events)
                images.append(await self._result(prompt_id, entry, events))
                finished += 1
                events.tracker.ended(prompt_id)
            return images
        finally:
            if finished < len(posted):
                await self._withdraw(posted[finished:])

    async def _submit(self, workflow: dict[str, Any], client_id: str) -> str:
        """Queue `workflow`; return its prompt id. Shielded: a prompt ComfyUI may have queued is
        always known, so that a cancelled job can take it back."""
        content = json.dumps({"prompt": workflow, "client_id": client_id}).encode()
        with trio.CancelScope(shield=True):
            status, body = await self._call("POST", "/prompt", content=content)
        if status == 400:
            raise validation_error(body)
        if status >= 400:
            raise ComfyError(f"/prompt failed: {describe_error(status, body)}")
        answer = parse_json(body, "/prompt")
        prompt_id = answer.get("prompt_id") if isinstance(answer, dict) else None
        if not isinstance(prompt_id, str) or not prompt_id or len(prompt_id) > 128:
            raise ComfyError("/prompt answered without a prompt_id")
        return prompt_id

    async def _wait_history(self, prompt_id: str, events: Events) -> dict[str, Any]:
        """The history entry of `prompt_id` once it has ended.

        Raises ComfyError if the prompt leaves ComfyUI's queue without one (someone deleted
        it, or ComfyUI restarted).
        """
        checked_end = False
        next_poll = trio.current_time() + self.config.quiet_poll_interval
        while True:
            ended = events.tracker.has_ended(prompt_id)
            polling = trio.current_time() >= next_poll
            if (ended and not checked_end) or polling:
                checked_end = ended
                entry = await self._history(prompt_id)
                if entry is None and polling and prompt_id not in queued_ids(await self._queue()):
                    entry = await self._history(prompt_id)  # unless it ended just now
                    if entry is None:
                        raise ComfyError(f"prompt {prompt_id} left its queue without a result")
                if entry is not None:
                    return entry
                quick = ended or events.closed
                interval = self.config.poll_interval if quick else self.config.quiet_poll_interval
                next_poll = trio.current_time() + interval
            if events.closed:
                next_poll = min(next_poll, trio.current_time() + self.config.poll_interval)
            with trio.move_on_at(next_poll):
                await events.wait_changed()

    async def _queue(self) -> dict[str, list[Any]]:
        """``GET /queue``: {"queue_running": [...], "queue_pending": [...]}, items
        ``[number, prompt_id, prompt, extra_data, outputs]``."""
        queue = await self._get_json("/queue")
        if not isinstance(queue, dict) or not all(
            isinstance(queue.get(key), list) for key in ("queue_running", "queue_pending")
        ):
            raise ComfyError("/queue is not the queue")
        return queue

    async def _history(self, prompt_id: str) -> dict[str, Any] | None:
        data = await self._get_json(f"/history/{prompt_id}")
        if not isinstance(data, dict):
            raise ComfyError("/history is not a JSON object")
        entry = data.get(prompt_id)
        if entry is None:
            return None  # {} while queued or running
        if not isinstance(entry, dict):
            raise ComfyError("/history has an entry that is not an object")
        return entry

    async def _result(self, prompt_id: str, entry: dict[str, Any], events: Events) -> bytes:
        """The image of an ended prompt, or the error it failed with."""
        status = entry.get("status")
        messages = status.get("messages") if isinstance(status, dict) else None
        if isinstance(status, dict) and status.get("status_str") == "error":
            raise ComfyError(execution_failure(messages, events.tracker.errors.get(prompt_id)))
        outputs = entry.get("outputs")
        node = outputs.get(OUTPUT_NODE) if isinstance(outputs, dict) else None
        images = node.get("images") if isinstance(node, dict) else None
        if not isinstance(images, list) or not images or not isinstance(images[0], dict):
            raise ComfyError(f"prompt {prompt_id} ended without an image")
        found = images[0]
        params = {
            key: found.get(key) or default
            for key, default in (("filename", ""), ("subfolder", ""), ("type", "temp"))
        }
        if not all(isinstance(v, str) for v in params.values()) or not params["filename"]:
            raise ComfyError(f"prompt {prompt_id} has an image without a file name")
        status_code, body = await self._call("GET", "/view", params=params)
        if status_code >= 400:
            raise ComfyError(f"/view failed: {describe_error(status_code, body)}")
        return check_png(body)

    async def _withdraw(self, prompt_ids: list[str]) -> None:
        """Take back prompts of a cancelled or failed job: delete the queued ones, interrupt
        the running one if it is ours. Shielded, within `config.interrupt_timeout`."""
        with trio.move_on_after(self.config.interrupt_timeout, shield=True) as scope:
            try:
                content = json.dumps({"delete": prompt_ids}).encode()
                status, body = await self._call("POST", "/queue", content=content)
                if status >= 400:
                    log.warning("ComfyUI queue delete failed: %s", describe_error(status, body))
                running = queued_ids(await self._queue(), ("running",))
                for prompt_id in prompt_ids:
                    if prompt_id in running:
                        content = json.dumps({"prompt_id": prompt_id}).encode()
                        status, body = await self._call("POST", "/interrupt", content=content)
                        self.interrupts += 1
                        if status >= 400:
                            log.warning(
                                "ComfyUI interrupt failed: %s", describe_error(status, body)
                            )
            except ComfyError as exc:
                log.warning("could not take back prompts from ComfyUI at %s: %s", self.url, exc)
        if scope.cancelled_caught:
            log.warning("ComfyUI at %s did not take back our prompts in time", self.url)

    # --- HTTP --------------------------------------------------------------------------------

    async def _get_json(self, path: str) -> Any:
        status, body = await self._call("GET", path)
        if status >= 400:
            raise ComfyError(f"{path} failed: {describe_error(status, body)}")
        return parse_json(body, path)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        files: dict[str, Any] | None = None,
        data: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """Send one request; return the status and the body, read up to the size cap."""
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            return await request_capped(
                self._client,
                method,
                path,
                limit=self.config.max_response_bytes,
                timeouts=self._timeouts,
                content=content,
                params=params,
                files=files,
                data=data,
                headers=headers,
            )
        except HttpFailure as exc:
            raise ComfyError(str(exc)) from exc.__cause__


@asynccontextmanager
async def open_comfyui_backend(
    url: str,
    auth: tuple[str, str] | str | None = None,
    *,
    config: ComfyuiConfig = ComfyuiConfig(),
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[ComfyuiBackend]:
    """A backend for the ComfyUI at `url` (``http://127.0.0.1:8188``, a path prefix allowed
    for one behind a proxy), with `auth` for such a proxy: (user, password) for HTTP Basic, or
    a bearer token.

    Does not contact ComfyUI: call `capabilities()` for that. Raises ConfigError for a URL that
    is not http(s).
    """
    check_url(url, "ComfyUI")
    if isinstance(auth, tuple):
        credentials = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        header = f"Basic {credentials}"
    elif isinstance(auth, str):
        header = f"Bearer {auth}"
    else:
        header = None
    headers = {"Authorization": header} if header else None
    async with httpx.AsyncClient(
        base_url=url, headers=headers, transport=transport, timeout=config.timeout
    ) as client:
        ws_headers = [(b"Authorization", header.encode())] if header else []
        yield ComfyuiBackend(client, config, ws_headers=ws_headers)
