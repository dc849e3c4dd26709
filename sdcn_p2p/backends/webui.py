"""The webui backend: an AUTOMATIC1111, Forge or SD.Next server, driven over its HTTP API.

Capabilities come from ``/sdapi/v1/sd-models``, ``loras``, ``samplers``, ``schedulers`` (absent
before 1.9) and ``memory``. A job is one ``/sdapi/v1/txt2img`` or ``img2img`` call: the model as
``override_settings.sd_model_checkpoint``, each LoRA as a ``<lora:name:weight>`` tag after the
prompt, "DPM++ 2M Karras" as sampler "DPM++ 2M" with scheduler "karras" where the webui has
schedulers. ``/sdapi/v1/progress`` is polled while it runs; cancelling it posts
``/sdapi/v1/interrupt``.

The webui silently runs its default checkpoint for a name it does not know and swaps an
unknown sampler for its default, so every job is checked against the webui's own lists first
(refused with "unsupported"), and the checkpoint hash it reports running is checked after.
The webui runs one job at a time, and its progress and interrupt are global: give it one slot.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import trio
from PIL import Image

from sdcn_p2p._config import require_at_least, require_positive
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.backends import Capabilities, JobOutput, ResolvedJob, resolve_or_rescan
from sdcn_p2p.backends._http import HttpFailure, check_url, request_capped
from sdcn_p2p.errors import BackendUnavailable, JobError, JobErrorCode
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.records import Advert, LoraInfo, ModelInfo

__all__ = ["WebuiBackend", "WebuiConfig", "open_webui_backend"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_API = "/sdapi/v1"
_MIB = 2**20
# Payloads and answers above this many bytes are encoded or decoded in a worker thread; below
# it (one 512x512 image: ~1 ms of CPU) the thread hand-off would cost more than it saves.
_THREAD_BYTES = _MIB
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True, slots=True)
class WebuiConfig:
    """Timeouts and polling of the webui backend, in seconds."""

    #: Each capability and progress call, and connecting to send a job.
    timeout: float = 10.0
    #: Waiting for a job's answer; the job's own deadline normally cancels it well before.
    job_timeout: float = 3600.0
    #: The interrupt posted when a job is cancelled.
    interrupt_timeout: float = 5.0
    progress_interval: float = 0.5
    #: Cap on one answer's size, in bytes (four 2048x2048 PNGs in base64 fit well within).
    max_response_bytes: int = 256 * _MIB

    def __post_init__(self) -> None:
        require_positive(self, "timeout", "job_timeout", "interrupt_timeout", "progress_interval")
        require_at_least(self, 1, "max_response_bytes")


class _WebuiError(Exception):
    """The webui failed or answered nonsense; public methods turn this into our errors."""


class WebuiBackend:
    """A webui as a `Backend`. Create with `open_webui_backend`.

    It stays usable while the webui is down: calls fail (capabilities with
    BackendUnavailable, jobs with "backend_failed") and work again once it is back.
    """

    name = "webui"

    def __init__(self, client: httpx.AsyncClient, config: WebuiConfig = WebuiConfig()) -> None:
        """Drive the webui at `client`'s base URL; the caller closes `client`."""
        self.config = config
        self._client = client
        self._capabilities: Capabilities | None = None
        self._short_timeout = httpx.Timeout(config.timeout)
        self._job_timeout = httpx.Timeout(config.timeout, read=config.job_timeout)

    @property
    def url(self) -> str:
        """The webui's base URL."""
        return str(self._client.base_url).rstrip("/")

    async def capabilities(self) -> Capabilities:
        """Read the webui's models, LoRAs, samplers, schedulers and VRAM.

        Raises BackendUnavailable if it cannot be reached, refuses our credentials or answers
        nonsense.
        """
        try:
            return await self._fetch_capabilities()
        except _WebuiError as exc:
            raise BackendUnavailable(str(exc)) from exc

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        """Run `job` on the webui; see `Backend.generate`.

        Cancelling posts ``/interrupt`` (shielded, within `config.interrupt_timeout`) before
        the cancellation goes on.
        """
        try:
            resolved = await self._resolve(job)
            path = f"{_API}/{job.kind}"
            if job.init_image is not None and len(job.init_image) > _THREAD_BYTES:
                content = await trio.to_thread.run_sync(_encode_payload, job, resolved)
            else:
                content = _encode_payload(job, resolved)
            reporter = _Reporter(progress, job.steps)
            status, body = await self._post_job(path, content, reporter)
            if status >= 400:
                raise _WebuiError(f"{path} failed: {_describe_error(status, body)}")
            if len(body) > _THREAD_BYTES:
                images, info = await trio.to_thread.run_sync(_decode_result, body, job.batch_size)
            else:
                images, info = _decode_result(body, job.batch_size)
            _check_checkpoint(resolved.model, info)
        except _WebuiError as exc:
            raise JobError(JobErrorCode.BACKEND_FAILED, f"webui at {self.url}: {exc}") from exc
        reporter.finish()
        return JobOutput(images, _result_info(info, job))

    # --- capabilities ----------------------------------------------------------------------------

    async def _fetch_capabilities(self) -> Capabilities:
        self._capabilities = None
        models = await self._get_json("sd-models")
        loras = await self._get_json("loras", missing_ok=True)  # no Lora extension: 404
        samplers = await self._get_json("samplers")
        schedulers = await self._get_json("schedulers", missing_ok=True)  # before 1.9: 404
        memory = await self._get_json("memory", missing_ok=True)
        total, free = _parse_memory(memory)
        self._capabilities = Capabilities(
            backend=self.name,
            models=_parse_list(models, "sd-models", _model_info, Advert.MAX_MODELS),
            loras=_parse_list(loras or [], "loras", _lora_info, Advert.MAX_LORAS),
            samplers=_parse_list(samplers, "samplers", _sampler_name, Advert.MAX_SAMPLERS),
            schedulers=_parse_list(schedulers or [], "schedulers", _scheduler_name, 64),
            vram_total_mb=total,
            vram_free_mb=free,
        )
        return self._capabilities

    async def _resolve(self, job: JobRequest) -> ResolvedJob:
        return await resolve_or_rescan(
            self._capabilities, lambda offer: offer.resolve(job), self._fetch_capabilities
        )

    async def _get_json(self, name: str, *, missing_ok: bool = False) -> Any:
        path = f"{_API}/{name}"
        status, body = await self._call("GET", path, timeouts=self._short_timeout)
        if status == 404 and missing_ok:
            return None
        if status >= 400:
            raise _WebuiError(f"{path} failed: {_describe_error(status, body)}")
        try:
            return json.loads(body)
        except ValueError:
            raise _WebuiError(f"{path} answered something that is not JSON") from None

    # --- jobs --------------------------------------------------------------------------------

    async def _post_job(self, path: str, content: bytes, reporter: _Reporter) -> tuple[int, bytes]:
        settled = False  # True once the webui has no work of ours left
        try:
            async with open_service_nursery() as nursery:
                nursery.start_soon(self._poll_progress, reporter)
                try:
                    answer = await self._call(
                        "POST", path, content=content, timeouts=self._job_timeout
                    )
                except _WebuiError as exc:
                    settled = isinstance(exc.__cause__, httpx.ConnectError | httpx.ConnectTimeout)
                    raise
                settled = True
                nursery.cancel_scope.cancel()
        finally:
            if not settled:  # cancelled, or the answer was lost: stop the webui's work
                await self._interrupt()
        return answer

    async def _poll_progress(self, reporter: _Reporter) -> None:
        path = f"{_API}/progress?skip_current_image=true"
        while True:
            await trio.sleep(self.config.progress_interval)
            try:
                status, body = await self._call("GET", path, timeouts=self._short_timeout)
            except _WebuiError as exc:
                log.debug("progress poll failed: %s", exc)
                continue
            if status == 200 and (step := _parse_progress(body)) is not None:
                reporter.report(*step)

    async def _interrupt(self) -> None:
        path = f"{_API}/interrupt"
        with trio.move_on_after(self.config.interrupt_timeout, shield=True) as scope:
            try:
                # A1111 answers {}, SD.Next 204 and no body: only the status matters.
                status, body = await self._call("POST", path, timeouts=self._short_timeout)
            except _WebuiError as exc:
                log.warning("could not interrupt the webui at %s: %s", self.url, exc)
                return
            if status >= 400:
                log.warning("webui interrupt failed: %s", _describe_error(status, body))
        if scope.cancelled_caught:
            log.warning("the webui at %s did not answer the interrupt in time", self.url)

    # --- HTTP --------------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, *, timeouts: httpx.Timeout, content: bytes | None = None
    ) -> tuple[int, bytes]:
        """Send one request; return the status and the body, read up to the size cap."""
        headers = {"Content-Type": "application/json"} if content is not None else None
        limit = self.config.max_response_bytes
        try:
            return await request_capped(
                self._client,
                method,
                path,
                limit=limit,
                timeouts=timeouts,
                content=content,
                headers=headers,
            )
        except HttpFailure as exc:
            raise _WebuiError(str(exc)) from exc.__cause__


@asynccontextmanager
async def open_webui_backend(
    url: str,
    auth: tuple[str, str] | None = None,
    *,
    config: WebuiConfig = WebuiConfig(),
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[WebuiBackend]:
    """A backend for the webui at `url` (``http://127.0.0.1:7860``), with HTTP Basic `auth`
    (user, password) as set by its ``--api-auth``.

    Does not contact the webui: call `capabilities()` for that. Raises ConfigError for a URL
    that is not http(s).
    """
    check_url(url, "webui")
    async with httpx.AsyncClient(
        base_url=url,
        auth=httpx.BasicAuth(*auth) if auth else None,
        transport=transport,
        timeout=config.timeout,
    ) as client:
        yield WebuiBackend(client, config)


# --- pure helpers: webui JSON in, our types out -----------------------------------------------


class _Reporter:
    """Passes on the steps the poller sees, never going back; `finish` reports the last."""

    def __init__(self, progress: Callable[[int, int], None], steps: int) -> None:
        self._progress = progress
        self._step = 0
        self._total = steps

    def report(self, step: int, total: int) -> None:
        if step > self._step:
            self._step, self._total = step, total
            self._progress(step, total)

    def finish(self) -> None:
        self.report(self._total, self._total)


def _parse_progress(body: bytes) -> tuple[int, int] | None:
    """(step, total) of the running job from a /progress answer; None when idle or odd."""
    try:
        state = json.loads(body).get("state")
        step, total, jobs = state["sampling_step"], state["sampling_steps"], state["job_count"]
    except (ValueError, AttributeError, KeyError, TypeError):
        return None
    # Idle, the webui reports job_count 0 and the step counts of the last job.
    if not all(type(v) is int for v in (step, total, jobs)) or jobs <= 0:
        return None
    return (step, total) if 0 < step <= total else None


def _parse_list(
    data: Any, what: str, parse: Callable[[dict[str, Any]], _T | None], cap: int
) -> tuple[_T, ...]:
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise _WebuiError(f"{_API}/{what} is not a list of objects")
    items = [item for entry in data if (item := parse(entry)) is not None]
    items = list(dict.fromkeys(items))
    if len(items) > cap:
        log.warning("the webui has %d %s; advertising the first %d", len(items), what, cap)
    return tuple(items[:cap])


def _text(entry: dict[str, Any], key: str, what: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise _WebuiError(f"{_API}/{what} has an entry without a {key!r}")
    return value


def _optional_text(entry: dict[str, Any], key: str, limit: int) -> str:
    value = entry.get(key)
    return value if isinstance(value, str) and len(value) <= limit else ""


def _model_info(entry: dict[str, Any]) -> ModelInfo | None:
    name = _text(entry, "model_name", "sd-models")
    if len(name) > 256:
        log.warning("not advertising model %.60r…: its name is too long", name)
        return None
    title = _text(entry, "title", "sd-models")
    if len(title) > 512:
        title = name  # the webui accepts the model name as a checkpoint too
    return ModelInfo(name, title, _optional_text(entry, "hash", 128))


def _lora_info(entry: dict[str, Any]) -> LoraInfo | None:
    name = _text(entry, "name", "loras")
    if len(name) > 256 or any(c in name for c in "<>:"):
        log.warning("not advertising LoRA %.60r: its name cannot go in a <lora:…> tag", name)
        return None
    return LoraInfo(name)


def _sampler_name(entry: dict[str, Any]) -> str | None:
    name = _text(entry, "name", "samplers")
    return name if len(name) <= 64 else None


def _scheduler_name(entry: dict[str, Any]) -> str | None:
    return _text(entry, "name", "schedulers")


def _parse_memory(memory: Any) -> tuple[int, int]:
    """(total, free) VRAM in MiB from /memory; (0, 0) when it has none to report."""
    try:
        system = memory["cuda"]["system"]
        total, free = system["total"], system["free"]
    except (KeyError, TypeError):
        return 0, 0
    if not all(type(v) is int and v >= 0 for v in (total, free)):
        return 0, 0
    return min(total // _MIB, 10**7), min(free // _MIB, 10**7)


def _encode_payload(job: JobRequest, resolved: ResolvedJob) -> bytes:
    prompt = job.prompt + "".join(f" <lora:{lo.name}:{weight!r}>" for lo, weight in resolved.loras)
    payload: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "sampler_name": resolved.sampler,
        "steps": job.steps,
        "cfg_scale": job.cfg_scale,
        "width": job.width,
        "height": job.height,
        "batch_size": job.batch_size,
        "n_iter": 1,
        "override_settings": {"sd_model_checkpoint": resolved.model.title or resolved.model.name},
        # Every job names its checkpoint: restoring the previous one would only add a reload.
        "override_settings_restore_afterwards": False,
        "send_images": True,
        "save_images": False,
    }
    if resolved.scheduler is not None:
        payload["scheduler"] = resolved.scheduler
    if job.kind == "img2img":
        payload["init_images"] = [base64.b64encode(job.init_image or b"").decode()]
        payload["denoising_strength"] = job.denoising_strength
    return json.dumps(payload).encode()


def _decode_result(body: bytes, batch_size: int) -> tuple[list[bytes], dict[str, Any]]:
    """The PNG images and the parsed info of a txt2img/img2img answer (CPU work)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise _WebuiError("the job's answer is not JSON") from None
    encoded = data.get("images") if isinstance(data, dict) else None
    if not isinstance(encoded, list):
        raise _WebuiError("the job's answer has no images")
    if len(encoded) < batch_size:
        raise _WebuiError(f"the job's answer has {len(encoded)} images for a batch of {batch_size}")
    info = data.get("info")
    try:
        info = json.loads(info) if isinstance(info, str) else info
    except ValueError:
        info = None
    if not isinstance(info, dict) or type(info.get("seed")) is not int:
        raise _WebuiError("the job's answer has no info with a seed")
    return [_png(item) for item in encoded[:batch_size]], info


def _png(item: object) -> bytes:
    if not isinstance(item, str):
        raise _WebuiError("the job's answer has an image that is not a string")
    try:
        data = base64.b64decode(item.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise _WebuiError("the job's answer has an image that is not base64") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "PNG":
                image.verify()
                return data
            image.load()  # the webui saves JPEG or WebP when set to: we send PNG
            out = io.BytesIO()
            image.save(out, "PNG")
            return out.getvalue()
    except _IMAGE_ERRORS as exc:
        raise _WebuiError(f"the job's answer has an image that cannot be decoded: {exc}") from None


def _check_checkpoint(model: ModelInfo, info: dict[str, Any]) -> None:
    """Refuse a result made with another checkpoint than the one asked for."""
    ran = info.get("sd_model_hash")
    if not isinstance(ran, str) or not ran or not model.hash:
        return
    n = min(len(ran), len(model.hash))
    if ran[:n].lower() != model.hash[:n].lower():
        other = info.get("sd_model_name")
        raise _WebuiError(f"it ran checkpoint {other!r:.80} instead of {model.name!r}")


def _result_info(info: dict[str, Any], job: JobRequest) -> dict[str, Any]:
    n = job.batch_size
    seeds = info.get("all_seeds")
    if not isinstance(seeds, list) or len(seeds) < n or any(type(s) is not int for s in seeds[:n]):
        seeds = [info["seed"] + i for i in range(n)]
    extras: dict[str, Any] = {"seeds": seeds[:n]}
    for key, ours in (("sd_model_hash", "model_hash"), ("version", "webui_version")):
        if isinstance(value := info.get(key), str) and len(value) <= 128:
            extras[ours] = value
    return extras


def _describe_error(status: int, body: bytes) -> str:
    """The webui's error: ``{"error", "detail", "body", "errors"}``, or whatever came."""
    hints = {401: " (check the webui user and password)", 404: " (is the webui run with --api?)"}
    hint = hints.get(status, "")
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("detail", "errors", "error"):
            value = data.get(key)
            if value:
                text = value if isinstance(value, str) else json.dumps(value)
                return f"HTTP {status}: {text[:500]}{hint}"
    text = body[:200].decode(errors="replace").strip()
    return f"HTTP {status}{': ' + text if text else ''}{hint}"
