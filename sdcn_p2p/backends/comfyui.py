"""The ComfyUI backend: a ComfyUI server, driven over its HTTP and WebSocket API.

Capabilities come from ``/object_info/CheckpointLoaderSimple`` (checkpoints),
``/object_info/LoraLoader`` (LoRAs), ``/object_info/KSampler`` (sampler and scheduler names)
and ``/system_stats`` (VRAM of the first device). A model or LoRA is advertised by its file
name without folder or extension (``SDXL/juggernaut.safetensors`` is "juggernaut"; the first
of two with one name wins). ComfyUI's API tells no file hashes, so a hash (A1111's: the first
10 hex digits of the file's SHA-256) and an architecture are advertised only when the node can
read the files itself: with `ComfyuiConfig.models_dir` set to ComfyUI's ``models`` folder, each
``checkpoints/<name>`` and ``loras/<name>`` found there is hashed once and cached.

Samplers are advertised under A1111's names (`SAMPLERS`: "Euler a" is ComfyUI's
``euler_ancestral``), those whose ComfyUI sampler this server has; scheduler suffixes map to
ComfyUI schedulers (`SCHEDULERS`: "DDIM" is ``ddim_uniform``). A sampler name without one gets
the scheduler A1111's "Automatic" picks for it (`AUTOMATIC_SCHEDULERS`, else ``normal``).
Anything ComfyUI lacks is refused with "unsupported" before anything is queued.

A job is one API-format workflow per image (`build_workflow`), all queued at once with
``POST /prompt`` under a client id of its own: CheckpointLoaderSimple, a LoraLoader per LoRA,
CLIPTextEncode twice, EmptyLatentImage (batch 1) or, for img2img, LoadImage of the init image
(``POST /upload/image`` into ComfyUI's temp folder, which it empties when it starts) scaled to
the job's size and VAEEncoded, then KSampler, VAEDecode and PreviewImage (a temp file: nothing
is left in ComfyUI's output folder). One prompt per image, because a ComfyUI batch draws the
noise of all its images from the one seed (``comfy.sample.prepare_noise``: image *i* gets the
*i*-th draw of the seed's generator, not seed + *i*'s; ancestral and SDE samplers draw each
step's noise for the whole batch from one generator too), so no batch gives A1111's image *i*
= seed + *i*. One prompt per image gives image *i* exactly the picture a one-image job with
seed + *i* gives; ComfyUI's cache runs the loaders and text encoders once for them all.

Progress comes from the ``progress`` messages of ``/ws?clientId=`` (ComfyUI sends execution
events only to the websocket of the prompt's client id); a prompt has ended when ComfyUI says
``executing`` with node null, its result is read from ``/history/{prompt_id}`` (``{}`` until it
has ended) and each image from ``/view``. Where the websocket says nothing (it broke, or an
old ComfyUI), ``/history`` is polled. A failed prompt (``execution_error``) fails the job with
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
import contextlib
import hashlib
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import platformdirs
import trio
import trio_websocket
from PIL import Image

from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.backends import Capabilities, JobOutput
from sdcn_p2p.backends._http import HttpFailure, request_capped
from sdcn_p2p.errors import BackendUnavailable, ConfigError, JobError, JobErrorCode
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.records import Advert, LoraInfo, ModelInfo

__all__ = [
    "AUTOMATIC_SCHEDULERS",
    "SAMPLERS",
    "SCHEDULERS",
    "ComfyuiBackend",
    "ComfyuiConfig",
    "Plan",
    "build_workflow",
    "open_comfyui_backend",
]

log = logging.getLogger(__name__)

#: A1111 sampler names and the ComfyUI sampler each is (``comfy.samplers.KSampler.SAMPLERS``).
#: A1111's Restart, DDIM CFG++ and PLMS have no ComfyUI twin.
SAMPLERS: dict[str, str] = {
    "Euler a": "euler_ancestral",
    "Euler": "euler",
    "LMS": "lms",
    "Heun": "heun",
    "DPM2": "dpm_2",
    "DPM2 a": "dpm_2_ancestral",
    "DPM++ 2S a": "dpmpp_2s_ancestral",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun",
    "DPM++ 3M SDE": "dpmpp_3m_sde",
    "DPM fast": "dpm_fast",
    "DPM adaptive": "dpm_adaptive",
    "DDIM": "ddim",
    "UniPC": "uni_pc",
    "LCM": "lcm",
}
#: A1111 scheduler names (as `split_sampler` gives them) and the ComfyUI scheduler each is
#: (``comfy.samplers.KSampler.SCHEDULERS``). A1111's uniform, polyexponential and
#: align_your_steps are separate nodes in ComfyUI, not KSampler schedulers.
SCHEDULERS: dict[str, str] = {
    "karras": "karras",
    "exponential": "exponential",
    "sgm_uniform": "sgm_uniform",
    "simple": "simple",
    "normal": "normal",
    "ddim": "ddim_uniform",
    "beta": "beta",
    "kl_optimal": "kl_optimal",
}
#: The ComfyUI scheduler for a sampler named without one: the one A1111 1.10's "Automatic"
#: picks for it; ``normal`` (A1111's default discretization) for the others.
AUTOMATIC_SCHEDULERS: dict[str, str] = {
    "DPM++ 2M": "karras",
    "DPM++ SDE": "karras",
    "DPM++ 2S a": "karras",
    "DPM++ 2M SDE": "exponential",
    "DPM++ 2M SDE Heun": "exponential",
    "DPM++ 3M SDE": "exponential",
    "DDIM": "ddim_uniform",
}
_DEFAULT_SCHEDULER = "normal"
# Seconds to wait for ComfyUI's answer to our websocket close.
_WS_CLOSE_TIMEOUT = 1.0

_MIB = 2**20
_HASH_CHARS = 10
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# The workflow's node ids (ComfyUI's frontend numbers its nodes too).
_CHECKPOINT, _POSITIVE, _NEGATIVE, _LATENT = "1", "2", "3", "4"
_LOAD, _SCALE, _SAMPLER, _DECODE, _OUTPUT = "5", "6", "7", "8", "9"
_FIRST_LORA = 10
# Job fields by the (node class, input) that carries them, for ComfyUI's validation errors.
_FIELDS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "model",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoader", "strength_model"): "loras",
    ("LoraLoader", "strength_clip"): "loras",
    ("CLIPTextEncode", "text"): "prompt",
    ("EmptyLatentImage", "width"): "width",
    ("EmptyLatentImage", "height"): "height",
    ("ImageScale", "width"): "width",
    ("ImageScale", "height"): "height",
    ("LoadImage", "image"): "init_image",
    ("KSampler", "seed"): "seed",
    ("KSampler", "steps"): "steps",
    ("KSampler", "cfg"): "cfg_scale",
    ("KSampler", "sampler_name"): "sampler_name",
    ("KSampler", "scheduler"): "sampler_name",
    ("KSampler", "denoise"): "denoising_strength",
}
# Inputs naming something that may have left ComfyUI since its capabilities were read.
_OFFERED = {"ckpt_name", "lora_name", "sampler_name", "scheduler"}


def _default_hash_cache() -> Path:
    return Path(platformdirs.user_cache_dir("sdcn")) / "comfyui-hashes.json"


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


class _ComfyError(Exception):
    """ComfyUI failed or answered nonsense; public methods turn this into our errors."""


@dataclass(frozen=True, slots=True)
class Plan:
    """A job in ComfyUI's names: the checkpoint and LoRA files, sampler and scheduler."""

    checkpoint: str
    loras: tuple[tuple[str, float], ...]
    sampler: str
    scheduler: str


@dataclass(frozen=True, slots=True)
class _Offer:
    """What ComfyUI offers: the advertised capabilities and the files behind their names."""

    capabilities: Capabilities
    checkpoints: dict[str, str]  # advertised model name -> ComfyUI ckpt_name
    loras: dict[str, str]  # advertised LoRA name -> ComfyUI lora_name
    samplers: frozenset[str]  # ComfyUI's
    schedulers: frozenset[str]  # ComfyUI's

    def plan(self, job: JobRequest) -> Plan:
        """Raises JobError("unsupported") for what is not offered."""
        resolved = self.capabilities.resolve(job)
        if resolved.scheduler is not None:
            scheduler = SCHEDULERS[resolved.scheduler]
        else:
            scheduler = AUTOMATIC_SCHEDULERS.get(resolved.sampler, _DEFAULT_SCHEDULER)
            if scheduler not in self.schedulers:
                scheduler = _DEFAULT_SCHEDULER
        return Plan(
            checkpoint=self.checkpoints[resolved.model.name],
            loras=tuple((self.loras[lora.name], weight) for lora, weight in resolved.loras),
            sampler=SAMPLERS[resolved.sampler],
            scheduler=scheduler,
        )


def build_workflow(job: JobRequest, plan: Plan, seed: int, init_image: str | None) -> dict:
    """The API-format workflow of one image of `job` with `seed`.

    `init_image` is the LoadImage name of the uploaded init image (img2img), scaled to the
    job's size before it is encoded, as A1111 resizes it.
    """
    prompt: dict[str, dict[str, Any]] = {
        _CHECKPOINT: _node("CheckpointLoaderSimple", ckpt_name=plan.checkpoint),
    }
    model, clip = [_CHECKPOINT, 0], [_CHECKPOINT, 1]
    for index, (name, weight) in enumerate(plan.loras):
        node = str(_FIRST_LORA + index)
        prompt[node] = _node(
            "LoraLoader",
            model=model,
            clip=clip,
            lora_name=name,
            strength_model=weight,
            strength_clip=weight,
        )
        model, clip = [node, 0], [node, 1]
    prompt[_POSITIVE] = _node("CLIPTextEncode", text=job.prompt, clip=clip)
    prompt[_NEGATIVE] = _node("CLIPTextEncode", text=job.negative_prompt, clip=clip)
    vae = [_CHECKPOINT, 2]
    if init_image is None:
        prompt[_LATENT] = _node(
            "EmptyLatentImage", width=job.width, height=job.height, batch_size=1
        )
        denoise = 1.0
    else:
        prompt[_LOAD] = _node("LoadImage", image=init_image)
        prompt[_SCALE] = _node(
            "ImageScale",
            image=[_LOAD, 0],
            upscale_method="lanczos",
            width=job.width,
            height=job.height,
            crop="disabled",
        )
        prompt[_LATENT] = _node("VAEEncode", pixels=[_SCALE, 0], vae=vae)
        denoise = job.denoising_strength
    prompt[_SAMPLER] = _node(
        "KSampler",
        model=model,
        seed=seed,
        steps=job.steps,
        cfg=job.cfg_scale,
        sampler_name=plan.sampler,
        scheduler=plan.scheduler,
        positive=[_POSITIVE, 0],
        negative=[_NEGATIVE, 0],
        latent_image=[_LATENT, 0],
        denoise=denoise,
    )
    prompt[_DECODE] = _node("VAEDecode", samples=[_SAMPLER, 0], vae=vae)
    prompt[_OUTPUT] = _node("PreviewImage", images=[_DECODE, 0])
    return prompt


def _node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


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
        self._offer: _Offer | None = None
        self._timeouts = httpx.Timeout(config.timeout)
        self._hash_lock = trio.Lock()
        self._hash_cache: Any = None  # a diffusers.HashCache, opened on first use
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
        except _ComfyError as exc:
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
                raise _ComfyError(f"the job did not finish within {self.config.job_timeout:g} s")
        except _Refused as exc:
            if exc.code == JobErrorCode.UNSUPPORTED:
                self._offer = None  # stale: read them again next time
            raise JobError(exc.code, f"ComfyUI at {self.url}: {exc}") from exc
        except _ComfyError as exc:
            raise JobError(JobErrorCode.BACKEND_FAILED, f"ComfyUI at {self.url}: {exc}") from exc
        seeds = [job.seed + i for i in range(job.batch_size)]
        info = {
            "seeds": seeds,
            "comfyui_sampler": plan.sampler,
            "comfyui_scheduler": plan.scheduler,
        }
        return JobOutput(images, info)

    # --- capabilities ----------------------------------------------------------------------------

    async def _fetch_offer(self) -> _Offer:
        self._offer = None
        checkpoint_node = await self._object_info("CheckpointLoaderSimple")
        lora_node = await self._object_info("LoraLoader")
        sampler_node = await self._object_info("KSampler")
        if not checkpoint_node or not sampler_node:
            raise _ComfyError(
                "/object_info has no CheckpointLoaderSimple or KSampler: not ComfyUI?"
            )
        checkpoints = _combo(checkpoint_node, "CheckpointLoaderSimple", "ckpt_name")
        loras = _combo(lora_node, "LoraLoader", "lora_name") if lora_node else []
        samplers = frozenset(_combo(sampler_node, "KSampler", "sampler_name"))
        schedulers = frozenset(_combo(sampler_node, "KSampler", "scheduler"))
        total, free = _parse_devices(await self._get_json("/system_stats"))
        files = await self._file_info(checkpoints, loras)
        models = _named(checkpoints, "checkpoint", Advert.MAX_MODELS)
        lora_names = _named(loras, "LoRA", Advert.MAX_LORAS)
        capabilities = Capabilities(
            backend=self.name,
            models=tuple(
                _model_info(name, file, files.get(("checkpoints", file), {}))
                for name, file in models.items()
            ),
            loras=tuple(
                LoraInfo(name, files.get(("loras", file), {}).get("hash", ""))
                for name, file in lora_names.items()
            ),
            samplers=tuple(a1111 for a1111, comfy in SAMPLERS.items() if comfy in samplers),
            schedulers=tuple(a1111 for a1111, comfy in SCHEDULERS.items() if comfy in schedulers),
            vram_total_mb=total,
            vram_free_mb=free,
        )
        self._offer = _Offer(capabilities, models, lora_names, samplers, schedulers)
        return self._offer

    async def _plan(self, job: JobRequest) -> Plan:
        """Raises JobError: "unsupported", or "backend_failed" if ComfyUI cannot answer."""
        if self._offer is not None:
            try:
                return self._offer.plan(job)
            except JobError:
                pass  # it may have been added to ComfyUI since: look again
        try:
            offer = await self._fetch_offer()
        except _ComfyError as exc:
            raise JobError(JobErrorCode.BACKEND_FAILED, f"ComfyUI at {self.url}: {exc}") from exc
        return offer.plan(job)

    async def _object_info(self, node: str) -> dict[str, Any]:
        data = await self._get_json(f"/object_info/{node}")
        if not isinstance(data, dict):
            raise _ComfyError(f"/object_info/{node} is not a JSON object")
        info = data.get(node, {})  # {} when ComfyUI has no such node
        if not isinstance(info, dict):
            raise _ComfyError(f"/object_info/{node} is not a node description")
        return info

    async def _file_info(
        self, checkpoints: list[str], loras: list[str]
    ) -> dict[tuple[str, str], dict[str, str]]:
        """{(folder, ComfyUI name): {"hash", "architecture"}} of the files this node can read."""
        if self.config.models_dir is None:
            return {}
        async with self._hash_lock:  # one scan at a time: the cache is not thread-safe
            if self._hash_cache is None:
                from sdcn_p2p.backends.diffusers import HashCache

                self._hash_cache = HashCache(self.config.hash_cache or _default_hash_cache())
            wanted = [("checkpoints", n) for n in checkpoints] + [("loras", n) for n in loras]
            return await trio.to_thread.run_sync(
                _read_files, self.config.models_dir, self._hash_cache, wanted
            )

    # --- jobs --------------------------------------------------------------------------------

    @asynccontextmanager
    async def _open_events(
        self, job: JobRequest, progress: Callable[[int, int], None]
    ) -> AsyncIterator[_Events]:
        """The job's websocket, with a client id of its own, following its prompts.

        Without a websocket (a proxy that refuses it) the job goes on, following /history.
        """
        events = _Events(uuid.uuid4().hex, _Tracker(job.steps, job.batch_size, progress))
        stream = await self._connect()
        try:
            async with open_service_nursery() as nursery:
                try:
                    with trio.fail_after(self.config.timeout):
                        ws = await nursery.start(self._follow, stream, events)
                except (trio_websocket.HandshakeError, trio.TooSlowError) as exc:
                    log.warning(
                        "no websocket from ComfyUI at %s (%s): following /history",
                        self.url,
                        _handshake_error(exc),
                    )
                    events.closed = True
                    yield events
                    return
                with trio.move_on_after(self.config.timeout):
                    await events.wait_ready()
                if not events.ready:
                    raise _ComfyError("its websocket sent no status")
                yield events
                with trio.move_on_after(_WS_CLOSE_TIMEOUT):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
        finally:
            # Ours to close: trio-websocket leaves the stream open when the peer went away.
            await stream.aclose()

    async def _connect(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        """A TCP (or TLS) connection to ComfyUI, for its websocket."""
        base = self._client.base_url
        host, port = base.host, base.port or (443 if base.scheme == "https" else 80)
        try:
            with trio.fail_after(self.config.timeout):
                if base.scheme == "https":
                    return await trio.open_ssl_over_tcp_stream(host, port, https_compatible=True)
                return await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            raise _ComfyError(f"cannot reach it: {exc or type(exc).__name__}") from exc

    async def _follow(
        self,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        events: _Events,
        *,
        task_status: trio.TaskStatus[trio_websocket.WebSocketConnection],
    ) -> None:
        """Open ``/ws?clientId=`` over `stream` and feed `events` until it closes.

        Raises HandshakeError (through `task_status`) if ComfyUI or a proxy refuses it.
        """
        base = self._client.base_url
        prefix = base.raw_path.decode().split("?")[0].rstrip("/")
        async with open_service_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                base.host,
                f"{prefix}/ws?clientId={events.client_id}",
                extra_headers=self._ws_headers,
                max_message_size=self.config.max_response_bytes,
            )
            task_status.started(ws)
            await events.read(ws)

    async def _upload(self, image: bytes) -> str:
        """Put the init image in ComfyUI's temp folder; return its LoadImage name."""
        name = f"sdcn-{hashlib.sha256(image).hexdigest()[:32]}.{_image_suffix(image)}"
        status, body = await self._call(
            "POST",
            "/upload/image",
            files={"image": (name, image, "application/octet-stream")},
            data={"type": "temp", "overwrite": "true"},
        )
        if status >= 400:
            raise _ComfyError(f"/upload/image failed: {_describe_error(status, body)}")
        answer = _json(body, "/upload/image")
        stored = answer.get("name") if isinstance(answer, dict) else None
        if not isinstance(stored, str) or not stored:
            raise _ComfyError("/upload/image answered without a name")
        subfolder = answer.get("subfolder") or ""
        path = f"{subfolder}/{stored}" if isinstance(subfolder, str) and subfolder else stored
        return f"{path} [temp]"

    async def _run(
        self, job: JobRequest, plan: Plan, image: str | None, events: _Events
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
            raise _validation_error(body)
        if status >= 400:
            raise _ComfyError(f"/prompt failed: {_describe_error(status, body)}")
        answer = _json(body, "/prompt")
        prompt_id = answer.get("prompt_id") if isinstance(answer, dict) else None
        if not isinstance(prompt_id, str) or not prompt_id or len(prompt_id) > 128:
            raise _ComfyError("/prompt answered without a prompt_id")
        return prompt_id

    async def _wait_history(self, prompt_id: str, events: _Events) -> dict[str, Any]:
        """The history entry of `prompt_id` once it has ended.

        Raises _ComfyError if the prompt leaves ComfyUI's queue without one (someone deleted
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
                if entry is None and polling and prompt_id not in _queued(await self._queue()):
                    entry = await self._history(prompt_id)  # unless it ended just now
                    if entry is None:
                        raise _ComfyError(f"prompt {prompt_id} left its queue without a result")
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
            raise _ComfyError("/queue is not the queue")
        return queue

    async def _history(self, prompt_id: str) -> dict[str, Any] | None:
        data = await self._get_json(f"/history/{prompt_id}")
        if not isinstance(data, dict):
            raise _ComfyError("/history is not a JSON object")
        entry = data.get(prompt_id)
        if entry is None:
            return None  # {} while queued or running
        if not isinstance(entry, dict):
            raise _ComfyError("/history has an entry that is not an object")
        return entry

    async def _result(self, prompt_id: str, entry: dict[str, Any], events: _Events) -> bytes:
        """The image of an ended prompt, or the error it failed with."""
        status = entry.get("status")
        messages = status.get("messages") if isinstance(status, dict) else None
        if isinstance(status, dict) and status.get("status_str") == "error":
            raise _ComfyError(_execution_failure(messages, events.tracker.errors.get(prompt_id)))
        outputs = entry.get("outputs")
        node = outputs.get(_OUTPUT) if isinstance(outputs, dict) else None
        images = node.get("images") if isinstance(node, dict) else None
        if not isinstance(images, list) or not images or not isinstance(images[0], dict):
            raise _ComfyError(f"prompt {prompt_id} ended without an image")
        found = images[0]
        params = {
            key: found.get(key) or default
            for key, default in (("filename", ""), ("subfolder", ""), ("type", "temp"))
        }
        if not all(isinstance(v, str) for v in params.values()) or not params["filename"]:
            raise _ComfyError(f"prompt {prompt_id} has an image without a file name")
        status_code, body = await self._call("GET", "/view", params=params)
        if status_code >= 400:
            raise _ComfyError(f"/view failed: {_describe_error(status_code, body)}")
        return _png(body)

    async def _withdraw(self, prompt_ids: list[str]) -> None:
        """Take back prompts of a cancelled or failed job: delete the queued ones, interrupt
        the running one if it is ours. Shielded, within `config.interrupt_timeout`."""
        with trio.move_on_after(self.config.interrupt_timeout, shield=True) as scope:
            try:
                content = json.dumps({"delete": prompt_ids}).encode()
                status, body = await self._call("POST", "/queue", content=content)
                if status >= 400:
                    log.warning("ComfyUI queue delete failed: %s", _describe_error(status, body))
                running = _queued(await self._queue(), ("running",))
                for prompt_id in prompt_ids:
                    if prompt_id in running:
                        content = json.dumps({"prompt_id": prompt_id}).encode()
                        status, body = await self._call("POST", "/interrupt", content=content)
                        self.interrupts += 1
                        if status >= 400:
                            log.warning(
                                "ComfyUI interrupt failed: %s", _describe_error(status, body)
                            )
            except _ComfyError as exc:
                log.warning("could not take back prompts from ComfyUI at %s: %s", self.url, exc)
        if scope.cancelled_caught:
            log.warning("ComfyUI at %s did not take back our prompts in time", self.url)

    # --- HTTP --------------------------------------------------------------------------------

    async def _get_json(self, path: str) -> Any:
        status, body = await self._call("GET", path)
        if status >= 400:
            raise _ComfyError(f"{path} failed: {_describe_error(status, body)}")
        return _json(body, path)

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
            raise _ComfyError(str(exc)) from exc.__cause__


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
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"bad ComfyUI URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"the ComfyUI URL must be http(s)://HOST[:PORT], got {url!r}")
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


# --- following a job over the websocket ---------------------------------------------------------


class _Tracker:
    """What ComfyUI's websocket says of one job's prompts; pure: messages in, state out.

    Reports progress over the whole job, image after image: step ``i * steps + s`` of
    ``batch * steps`` while image i is at step s, never going back.
    """

    def __init__(self, steps: int, batch: int, progress: Callable[[int, int], None]) -> None:
        self._steps = steps
        self._total = steps * batch
        self._progress = progress
        self._reported = 0
        self._running: str | None = None
        self._ended: set[str] = set()
        #: ``execution_error`` messages by prompt id, in case the history lacks them.
        self.errors: dict[str, dict[str, Any]] = {}

    def has_ended(self, prompt_id: str) -> bool:
        """Whether ComfyUI has said `prompt_id` ended (its history is written by then)."""
        return prompt_id in self._ended

    def ended(self, prompt_id: str) -> None:
        """Count `prompt_id`'s image as done, whatever the websocket said."""
        self._ended.add(prompt_id)
        self._report(len(self._ended) * self._steps)

    def feed(self, message: Any) -> bool:
        """Take one JSON message; return whether it told something about our prompts."""
        if not isinstance(message, dict) or not isinstance(data := message.get("data"), dict):
            return False
        kind = message.get("type")
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str):
            prompt_id = self._running  # ComfyUI before 2024 sent progress without it
        if prompt_id is None:
            return False
        if kind == "execution_start":
            self._running = prompt_id
        elif kind == "executing" and data.get("node") is None:
            self._running = None
            self._ended.add(prompt_id)
        elif kind == "progress" and data.get("node") in (_SAMPLER, None):
            value, most = data.get("value"), data.get("max")
            if type(value) is int and type(most) is int and 0 < value <= most:
                done = len(self._ended - {prompt_id}) * self._steps
                self._report(done + value * self._steps // most)
        elif kind == "execution_error":
            self.errors[prompt_id] = data
        else:
            return kind in ("execution_success", "execution_interrupted")
        return True

    def _report(self, step: int) -> None:
        step = min(step, self._total)
        if step > self._reported:
            self._reported = step
            self._progress(step, self._total)


class _Events:
    """A job's websocket: a reader task feeds the `_Tracker`; waiters learn of each change."""

    def __init__(self, client_id: str, tracker: _Tracker) -> None:
        self.client_id = client_id
        self.tracker = tracker
        #: ComfyUI's first message (``status``) has come: it knows our client id.
        self.ready = False
        #: The websocket is gone: only /history can tell now.
        self.closed = False
        self._changed = trio.Event()

    async def wait_ready(self) -> None:
        while not self.ready and not self.closed:
            await self.wait_changed()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def read(self, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, bytes):
                    continue  # a preview image
                try:
                    data = json.loads(message)
                except ValueError:
                    log.debug("ComfyUI sent a websocket message that is not JSON")
                    continue
                if not self.ready and isinstance(data, dict) and data.get("type") == "status":
                    self.ready = True
                    self._notify()
                elif self.tracker.feed(data):
                    self._notify()
        except trio_websocket.ConnectionClosed as exc:
            log.info("ComfyUI's websocket closed (%s); polling /history", exc.reason)
            self.closed = True
            self._notify()


# --- pure helpers: ComfyUI JSON in, our types out ---------------------------------------------


class _Refused(_ComfyError):
    """ComfyUI refused a workflow (``POST /prompt`` 400): `code` is the job error to give."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _validation_error(body: bytes) -> _Refused:
    """A `_Refused` naming the job field of a ``POST /prompt`` 400 answer: ``{"error": {type,
    message, details, extra_info}, "node_errors": {node: {errors, dependent_outputs,
    class_type}}}``."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return _Refused(JobErrorCode.BACKEND_FAILED, f"it refused the workflow: {_text(body)}")
    node_errors = data.get("node_errors")
    problems: list[str] = []
    code = "backend_failed"
    if isinstance(node_errors, dict):
        for node in node_errors.values():
            if not isinstance(node, dict) or not isinstance(node.get("errors"), list):
                continue
            class_type = str(node.get("class_type", "?"))
            for error in node["errors"]:
                if not isinstance(error, dict):
                    continue
                extra = error.get("extra_info")
                name = extra.get("input_name") if isinstance(extra, dict) else None
                what = f"{error.get('message', '?')}: {error.get('details', '')}".rstrip(": ")
                if isinstance(name, str):
                    field_name = _FIELDS.get((class_type, name), name)
                    problems.append(f"{field_name} ({class_type}.{name}): {what}")
                    if name in _OFFERED and error.get("type") == "value_not_in_list":
                        code = "unsupported"
                else:
                    problems.append(f"{class_type}: {what}")
    if not problems:
        error = data.get("error")
        if isinstance(error, dict):
            problems.append(f"{error.get('message', '?')}: {error.get('details', '')}".rstrip(": "))
        else:
            problems.append(_text(body))
    return _Refused(code, "it refused the workflow: " + "; ".join(problems)[:800])


def _execution_failure(messages: Any, seen: dict[str, Any] | None) -> str:
    """What went wrong in a prompt whose history status is "error"."""
    error = seen
    interrupted = None
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict):
                if message[0] == "execution_error":
                    error = message[1]
                elif message[0] == "execution_interrupted":
                    interrupted = message[1]
    if error is None:
        if interrupted is not None:
            return f"the prompt was interrupted in ComfyUI (at {interrupted.get('node_type')})"
        return "the prompt failed in ComfyUI"
    node_type = error.get("node_type", "?")
    kind = str(error.get("exception_type", ""))
    text = str(error.get("exception_message", "")).strip().split("\n")[0][:400]
    if "OutOfMemory" in kind or "out of memory" in text.lower():
        return f"out of GPU memory in {node_type}: {text}"
    return f"{node_type} failed: {kind.rsplit('.', 1)[-1]}: {text}".rstrip(": ")


def _queued(
    queue: dict[str, list[Any]], which: tuple[str, ...] = ("running", "pending")
) -> set[str]:
    """The prompt ids in the `which` parts of a ``GET /queue`` answer."""
    return {
        item[1]
        for part in which
        for item in queue[f"queue_{part}"]
        if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str)
    }


def _combo(info: dict[str, Any], node: str, name: str) -> list[str]:
    """The choices of input `name`: ``[[choice, ...], {...}]`` or ``["COMBO", {"options"}]``."""
    inputs = info.get("input")
    spec = None
    if isinstance(inputs, dict):
        for group in ("required", "optional"):
            section = inputs.get(group)
            if isinstance(section, dict) and name in section:
                spec = section[name]
                break
    choices = None
    if isinstance(spec, list) and spec:
        if isinstance(spec[0], list):
            choices = spec[0]
        elif spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
            choices = spec[1].get("options")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise _ComfyError(f"/object_info/{node} has no list of {name}")
    return choices


def _stem(file: str) -> str:
    """The advertised name of a ComfyUI file name: no folder, no model extension."""
    base = PurePosixPath(file.replace("\\", "/")).name
    for suffix in _MODEL_SUFFIXES:
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def _named(files: list[str], what: str, cap: int) -> dict[str, str]:
    """{advertised name: ComfyUI name}, the first of each name, at most `cap`."""
    named: dict[str, str] = {}
    seen: set[str] = set()
    for file in files:
        name = _stem(file)
        if not name.strip() or len(name) > 256 or len(file) > 512:
            log.warning("not advertising %s %.80r: its name is too long or empty", what, file)
            continue
        if name.casefold() in seen:
            log.warning("not advertising %s %r: another is named %r", what, file, name)
            continue
        seen.add(name.casefold())
        named[name] = file
    if len(named) > cap:
        log.warning("ComfyUI has %d %ss; advertising the first %d", len(named), what, cap)
    return dict(list(named.items())[:cap])


def _model_info(name: str, file: str, info: dict[str, str]) -> ModelInfo:
    digest = info.get("hash", "")
    title = f"{file} [{digest}]" if digest else file
    return ModelInfo(name, title, digest, info.get("architecture", ""))


def _read_files(
    models_dir: Path, cache: Any, wanted: list[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, str]]:
    """Hash (and for a checkpoint, recognise) each readable file; blocking."""
    from sdcn_p2p.backends.diffusers import checkpoint_architecture

    found: dict[tuple[str, str], dict[str, str]] = {}
    for folder, name in wanted:
        path = models_dir / folder / PurePosixPath(name.replace("\\", "/"))

        def compute(path: Path = path, folder: str = folder) -> dict[str, Any]:
            with path.open("rb") as file:
                digest = hashlib.file_digest(file, "sha256").hexdigest()
            architecture = ""
            if folder == "checkpoints" and path.suffix.lower() == ".safetensors":
                with contextlib.suppress(OSError, ValueError):
                    architecture = checkpoint_architecture(path)
            return {"sha256": digest, "architecture": architecture}

        try:
            stat = path.stat()
            entry = cache.get(path, (stat.st_size, stat.st_mtime_ns), compute)
        except OSError:
            continue  # not here, or not readable: advertised without a hash
        found[(folder, name)] = {
            "hash": entry["sha256"][:_HASH_CHARS],
            "architecture": entry.get("architecture", ""),
        }
    cache.save()
    return found


def _parse_devices(stats: Any) -> tuple[int, int]:
    """(total, free) VRAM in MiB of the first device of /system_stats; (0, 0) for a CPU."""
    devices = stats.get("devices") if isinstance(stats, dict) else None
    if not isinstance(devices, list) or not devices or not isinstance(devices[0], dict):
        return 0, 0
    device = devices[0]
    total, free = device.get("vram_total"), device.get("vram_free")
    if device.get("type") == "cpu" or not all(type(v) is int and v >= 0 for v in (total, free)):
        return 0, 0
    return min(total // _MIB, 10**7), min(free // _MIB, 10**7)


def _image_suffix(image: bytes) -> str:
    if image.startswith(b"\x89PNG"):
        return "png"
    if image.startswith(b"\xff\xd8"):
        return "jpg"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "webp"
    return "png"


def _png(data: bytes) -> bytes:
    """`data` if it is a whole PNG (chunks and CRCs checked, pixels not decoded)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise _ComfyError("/view answered something that is not a PNG")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except _IMAGE_ERRORS as exc:
        raise _ComfyError(f"/view answered a PNG that cannot be decoded: {exc}") from None
    return data


def _json(body: bytes, path: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise _ComfyError(f"{path} answered something that is not JSON") from None


def _text(body: bytes) -> str:
    return body[:300].decode(errors="replace").strip()


def _describe_error(status: int, body: bytes) -> str:
    """ComfyUI's error (``{"error": {...}}`` or ``{"error": "..."}``), or whatever came."""
    hints = {401: " (check --comfyui-auth)", 403: " (check --comfyui-auth)"}
    hint = hints.get(status, "")
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and (error := data.get("error")):
        if isinstance(error, dict):
            error = f"{error.get('message', '')}: {error.get('details', '')}".strip(": ")
        return f"HTTP {status}: {str(error)[:500]}{hint}"
    text = _text(body)
    return f"HTTP {status}{': ' + text if text else ''}{hint}"


def _handshake_error(exc: Exception) -> str:
    if isinstance(exc, trio_websocket.ConnectionRejected):
        hint = " (check --comfyui-auth)" if exc.status_code in (401, 403) else ""
        return f"HTTP {exc.status_code}{hint}"
    cause = exc.__cause__ or exc.__context__
    return str(cause or exc) or type(cause or exc).__name__
