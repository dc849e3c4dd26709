"""The diffusers backend: Stable Diffusion run in this process, one job at a time.

Jobs run on the device in a worker thread, so the peer keeps answering while they run.
Image i of a job is made with ``torch.Generator(cpu)`` seeded ``seed + i``, as A1111's batches
are, so a seed gives the same pixels on the same device and thread count. LoRAs are loaded for
the job with their weights and unloaded after it. Pipelines are kept per model, least recently
used evicted first, within the VRAM budget. Progress is reported after each step; cancelling
stops the job at the next step. A CUDA out-of-memory error fails the job with
"backend_failed" and frees the cached pipelines.

A single-file checkpoint takes its component configs (tokenizer, scheduler, layer shapes) from
a diffusers folder of the same architecture in the models dir when there is one, offline;
without one, diffusers fetches the standard configs of its architecture from the Hugging Face
hub (once; they are cached).

torch and diffusers are imported by `open_diffusers_backend`, not with this module.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio
from PIL import Image

from sdcn_p2p.backends import Capabilities, JobOutput, ResolvedJob, resolve_or_rescan
from sdcn_p2p.backends.diffusers.samplers import (
    SAMPLERS,
    SCHEDULER_TYPES,
    SEEDED_SCHEDULERS,
    scheduler_for,
)
from sdcn_p2p.backends.diffusers.scan import (
    HashCache,
    ModelEntry,
    default_hash_cache,
    scan_loras,
    scan_models,
)
from sdcn_p2p.errors import BackendUnavailable, ConfigError, JobError, JobErrorCode
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.records import LoraInfo

__all__ = [
    "DEVICES",
    "DTYPES",
    "DiffusersBackend",
    "DiffusersConfig",
    "open_diffusers_backend",
    "require_diffusers",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "float16", "bfloat16", "float32")
#: What ``pip install 'sdcn-p2p[diffusers]'`` brings, by import name.
_REQUIRED = ("torch", "diffusers", "transformers", "safetensors", "peft", "torchsde")
_INSTALL_HINT = "install them with: pip install 'sdcn-p2p[diffusers]'"

_MIB = 2**20
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# Kept free of the VRAM budget by default, for activations (MiB).
_VRAM_HEADROOM_MB = 2048
# The default budget where torch reports no device memory (CPU, MPS), in MiB.
_DEFAULT_BUDGET_MB = 8192


@dataclass(frozen=True, slots=True)
class DiffusersConfig:
    """Where the models are and how to run them.

    `vram_budget_mb` caps the memory of the cached pipelines (None: the device's total less
    2 GiB on CUDA, 8 GiB elsewhere); the pipeline of the running job is kept even over it.
    `hash_cache` is the JSON file of known content hashes (None: in the user cache dir).
    """

    models_dir: Path
    loras_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    vram_budget_mb: int | None = None
    hash_cache: Path | None = None
    max_pixels: int = 2048 * 2048
    max_steps: int = 150

    def __post_init__(self) -> None:
        if not Path(self.models_dir).is_dir():
            raise ConfigError(
                f"the models dir (models_dir) {str(self.models_dir)!r} is not a directory"
            )
        if self.loras_dir is not None and not Path(self.loras_dir).is_dir():
            raise ConfigError(
                f"the LoRAs dir (loras_dir) {str(self.loras_dir)!r} is not a directory"
            )
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.vram_budget_mb is not None and self.vram_budget_mb < 1:
            raise ConfigError(
                "the VRAM budget (vram_budget_mb) must be at least 1 MiB, "
                f"not {self.vram_budget_mb}"
            )
        if self.max_pixels < 64 * 64:
            raise ConfigError(f"max_pixels must be at least 64x64, not {self.max_pixels}")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, not {self.max_steps}")


def require_diffusers() -> None:
    """Raise ConfigError naming the missing packages unless the ``diffusers`` extra is installed.

    Looks the packages up without importing them.
    """
    missing = [name for name in _REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"the diffusers backend needs {', '.join(missing)}, which are not installed: "
            + _INSTALL_HINT
        )


class _Interrupted(Exception):
    """Raised in the worker thread at a step once the job was cancelled."""


@dataclass(frozen=True, slots=True)
class _Work:
    """A job as the worker thread runs it: resolved to a model, a scheduler and LoRA files."""

    job: JobRequest
    entry: ModelEntry
    scheduler: tuple[str, dict[str, Any]]  # class name, settings
    loras: list[tuple[Path, float]]  # file, weight
    report: Callable[[int, int], None]  # (step, total), from the worker thread


@dataclass(slots=True)
class _Loaded:
    pipe: Any
    size_mb: int
    #: The model's own scheduler settings, which each job's scheduler starts from.
    scheduler_config: Any
    img2img: Any = None


@dataclass(slots=True)
class _Runtime:
    """torch and diffusers, imported, and the device and dtype to run on."""

    torch: Any
    diffusers: Any
    device: str
    dtype: Any
    budget_mb: int


class DiffusersBackend:
    """Stable Diffusion in this process as a `Backend`. Create with `open_diffusers_backend`."""

    name = "diffusers"

    def __init__(self, config: DiffusersConfig, runtime: _Runtime) -> None:
        self.config = config
        self._runtime = runtime
        self._cache = HashCache(config.hash_cache or default_hash_cache())
        self._models: dict[str, ModelEntry] = {}
        self._loras: dict[str, tuple[LoraInfo, Path]] = {}
        self._capabilities: Capabilities | None = None
        self._pipelines: OrderedDict[str, _Loaded] = OrderedDict()
        self._scan_lock = trio.Lock()
        self._device_lock = trio.Lock()  # one job on the device at a time

    @property
    def device(self) -> str:
        """The torch device jobs run on: "cuda", "mps" or "cpu"."""
        return self._runtime.device

    @property
    def dtype(self) -> str:
        """The torch dtype of the pipelines: "float16", "bfloat16" or "float32"."""
        return str(self._runtime.dtype).removeprefix("torch.")

    @property
    def hashes_computed(self) -> int:
        """Content hashes computed (not found in the cache) since this backend was opened."""
        return self._cache.computed

    @property
    def cached_models(self) -> list[str]:
        """Names of the models whose pipelines are loaded, least recently used first."""
        return list(self._pipelines)

    async def capabilities(self) -> Capabilities:
        """Scan the models and LoRAs dirs (hashing new files in a thread) and read free VRAM.

        Raises BackendUnavailable when the models dir cannot be read.
        """
        async with self._scan_lock:
            try:
                models, loras = await trio.to_thread.run_sync(self._scan)
            except OSError as exc:
                raise BackendUnavailable(f"cannot read the models: {exc}") from exc
        self._models = {m.info.name.casefold(): m for m in models}
        self._loras = loras
        total, free = _vram(self._runtime)
        self._capabilities = Capabilities(
            backend=self.name,
            models=tuple(m.info for m in models),
            loras=tuple(info for info, _ in loras.values()),
            samplers=tuple(SAMPLERS),
            schedulers=tuple(SCHEDULER_TYPES),
            vram_total_mb=total,
            vram_free_mb=free,
            max_pixels=self.config.max_pixels,
            max_steps=self.config.max_steps,
        )
        return self._capabilities

    def _scan(self) -> tuple[list[ModelEntry], dict[str, tuple[LoraInfo, Path]]]:
        models = scan_models(Path(self.config.models_dir), self._cache)
        loras_dir = self.config.loras_dir
        loras = scan_loras(Path(loras_dir), self._cache) if loras_dir is not None else {}
        self._cache.save()
        return models, loras

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        """Run `job` on the device; see `Backend.generate`. Cancelling stops it at the next step."""
        resolved = await self._resolve(job)
        scheduler = scheduler_for(resolved.sampler, resolved.scheduler)
        entry = self._models[resolved.model.name.casefold()]
        loras = [(self._loras[lo.name.casefold()][1], weight) for lo, weight in resolved.loras]

        def report(step: int, total: int) -> None:
            trio.from_thread.run_sync(progress, step, total)

        work = _Work(job, entry, scheduler, loras, report)
        async with self._device_lock:
            images = await _run_cancellable(lambda stop: self._run(work, stop))
        seeds = [job.seed + i for i in range(job.batch_size)]
        info = {
            "seeds": seeds,
            "model_hash": entry.info.hash,
            "scheduler": scheduler[0],
            "device": self._runtime.device,
        }
        return JobOutput(images, info)

    async def _resolve(self, job: JobRequest) -> ResolvedJob:
        return await resolve_or_rescan(
            self._capabilities, lambda offer: offer.resolve(job), self.capabilities
        )

    # --- the worker thread ---------------------------------------------------------------------

    def _run(self, work: _Work, stop: threading.Event) -> list[bytes]:
        """Run `work` in the worker thread, every failure turned into a JobError."""
        torch = self._runtime.torch
        job, entry = work.job, work.entry
        try:
            return self._run_on_device(work, stop)
        except (JobError, _Interrupted):
            raise
        except torch.OutOfMemoryError as exc:
            self._drop_pipelines()
            first_line = str(exc).splitlines()[0] if str(exc) else "out of memory"
            raise JobError(
                JobErrorCode.BACKEND_FAILED,
                f"out of GPU memory for {job.batch_size} x {job.width}x{job.height} on "
                f"{entry.info.name} ({first_line}); a smaller size or batch may fit",
            ) from None
        except Exception as exc:
            # torch, diffusers and the model files can fail in too many ways to list; the job
            # fails, the node goes on.
            log.exception("job on %s failed", entry.info.name)
            raise JobError(JobErrorCode.BACKEND_FAILED, f"{type(exc).__name__}: {exc}") from exc

    def _run_on_device(self, work: _Work, stop: threading.Event) -> list[bytes]:
        runtime = self._runtime
        torch = runtime.torch
        job = work.job
        init_image = _decode_init_image(job) if job.kind == "img2img" else None
        loaded = self._pipeline(work.entry)
        if stop.is_set():
            raise _Interrupted
        if job.kind == "img2img" and loaded.img2img is None:
            loaded.img2img = runtime.diffusers.AutoPipelineForImage2Image.from_pipe(loaded.pipe)
            loaded.img2img.set_progress_bar_config(disable=True)
        pipe = loaded.img2img if job.kind == "img2img" else loaded.pipe
        seeds = [job.seed + i for i in range(job.batch_size)]
        class_name, settings = work.scheduler
        if class_name in SEEDED_SCHEDULERS:
            settings = {**settings, "noise_sampler_seed": seeds}
        pipe.scheduler = getattr(runtime.diffusers, class_name).from_config(
            loaded.scheduler_config, **settings
        )

        def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            if stop.is_set():
                raise _Interrupted
            work.report(index + 1, pipe.num_timesteps)
            return tensors

        arguments: dict[str, Any] = {
            "prompt": [job.prompt] * job.batch_size,
            "negative_prompt": [job.negative_prompt] * job.batch_size,
            "num_inference_steps": job.steps,
            "guidance_scale": job.cfg_scale,
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            "callback_on_step_end": on_step_end,
            "output_type": "pil",
        }
        if init_image is None:
            arguments.update(width=job.width, height=job.height)
        else:
            # At least one step: diffusers refuses a strength that leaves none.
            strength = max(job.denoising_strength, 1 / job.steps)
            arguments.update(image=init_image, strength=strength)
        with _loras_applied(loaded.pipe, work.loras), torch.inference_mode():
            output = pipe(**arguments)
        return [_png(image) for image in output.images]

    def _pipeline(self, entry: ModelEntry) -> _Loaded:
        name = entry.info.name
        loaded = self._pipelines.get(name)
        if loaded is not None:
            self._pipelines.move_to_end(name)
            return loaded
        runtime = self._runtime
        log.info("loading %s from %s", name, entry.path)
        pipe = self._load(entry)
        pipe.set_progress_bar_config(disable=True)
        size_mb = _pipeline_mb(pipe, runtime)
        # Evict the least recently used until the new pipeline fits the budget.
        while self._pipelines and self._used_mb() + size_mb > runtime.budget_mb:
            evicted, _ = self._pipelines.popitem(last=False)
            log.info("unloading %s to make room for %s", evicted, name)
            self._free_memory()
        pipe.to(runtime.device)
        loaded = _Loaded(pipe, size_mb, pipe.scheduler.config)
        self._pipelines[name] = loaded
        return loaded

    def _load(self, entry: ModelEntry) -> Any:
        runtime = self._runtime
        diffusers = runtime.diffusers
        kind = "StableDiffusionXLPipeline" if entry.info.architecture == "sdxl" else None
        options: dict[str, Any] = {"dtype": runtime.dtype}
        if kind is None:
            kind = "StableDiffusionPipeline"
            options.update(safety_checker=None, requires_safety_checker=False)
        pipeline_class = getattr(diffusers, kind)
        if not entry.single_file:
            return pipeline_class.from_pretrained(str(entry.path), **options)
        config = self._config_folder(entry.info.architecture)
        if config is not None:
            options.update(config=str(config), local_files_only=True)
        return pipeline_class.from_single_file(str(entry.path), **options)

    def _config_folder(self, architecture: str) -> Path | None:
        for model in self._models.values():
            if not model.single_file and model.info.architecture == architecture:
                return model.path
        return None

    def _used_mb(self) -> int:
        return sum(loaded.size_mb for loaded in self._pipelines.values())

    def _drop_pipelines(self) -> None:
        self._pipelines.clear()
        self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        if self._runtime.device == "cuda":
            self._runtime.torch.cuda.empty_cache()


async def _run_cancellable(work: Callable[[threading.Event], _T]) -> _T:
    """Run `work(stop)` in a worker thread; cancelling sets `stop` and waits for the thread.

    `work` is to check `stop` between steps and give up (raising anything) once it is set.
    """
    stop, started, finished = threading.Event(), threading.Event(), threading.Event()

    def run() -> _T:
        started.set()
        try:
            if stop.is_set():  # cancelled while the thread was starting
                raise _Interrupted
            return work(stop)
        finally:
            finished.set()

    try:
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    except trio.Cancelled:
        # Either the thread sees `stop` before working, or we see it started and wait: the
        # device is ours until the thread is done.
        stop.set()
        if started.is_set():
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(finished.wait)
        raise


@contextlib.contextmanager
def _loras_applied(pipe: Any, loras: list[tuple[Path, float]]) -> Iterator[None]:
    """Load `loras` (path, weight) into `pipe` for the block and unload them after it.

    Raises JobError("unsupported") for a LoRA that does not fit the model.
    """
    if not loras:
        yield
        return
    names = [f"sdcn_lora_{i}" for i in range(len(loras))]
    try:
        for (path, _), name in zip(loras, names, strict=True):
            try:
                pipe.load_lora_weights(str(path), adapter_name=name)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise JobError(
                    JobErrorCode.UNSUPPORTED, f"LoRA {path.stem!r} does not fit this model: {exc}"
                ) from exc
        pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras])
        yield
    finally:
        # Unloading restores the weights exactly (fusing would drift).
        pipe.unload_lora_weights()


def _decode_init_image(job: JobRequest) -> Image.Image:
    try:
        with Image.open(io.BytesIO(job.init_image or b"")) as source:
            image = source.convert("RGB")
    except _IMAGE_ERRORS as exc:
        raise JobError(JobErrorCode.BAD_REQUEST, f"cannot decode the init image: {exc}") from exc
    if image.size != (job.width, job.height):
        image = image.resize((job.width, job.height), Image.Resampling.LANCZOS)
    return image


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=4)
    return out.getvalue()


def _pipeline_mb(pipe: Any, runtime: _Runtime) -> int:
    total = 0
    for component in pipe.components.values():
        if isinstance(component, runtime.torch.nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                total += tensor.numel() * runtime.dtype.itemsize
    return max(1, -(-total // _MIB))


def _vram(runtime: _Runtime) -> tuple[int, int]:
    """(total, free) device memory in MiB; (0, 0) where torch reports none (CPU, MPS)."""
    if runtime.device != "cuda":
        return 0, 0
    free, total = runtime.torch.cuda.mem_get_info()
    return total // _MIB, free // _MIB


def _import_runtime(config: DiffusersConfig) -> _Runtime:
    """Import torch and diffusers and pick the device and dtype (blocking: seconds)."""
    require_diffusers()
    try:
        torch = importlib.import_module("torch")
        diffusers = importlib.import_module("diffusers")
        importlib.import_module("peft")  # LoRAs load through it
        transformers = importlib.import_module("transformers")
    except (ImportError, OSError) as exc:  # OSError: a broken CUDA library
        raise ConfigError(f"cannot import the diffusers backend ({exc}): {_INSTALL_HINT}") from exc
    # Progress bars on a node's stderr are noise: steps go out as progress messages.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    device = config.device
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA GPU (is the CUDA build installed?)")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: torch sees no Apple GPU")
    dtype_name = config.dtype
    if dtype_name == "auto":
        dtype_name = "float32" if device == "cpu" else "float16"
    budget = config.vram_budget_mb
    if budget is None:
        if device == "cuda":
            total = torch.cuda.mem_get_info()[1] // _MIB
            budget = max(total - _VRAM_HEADROOM_MB, total // 2)
        else:
            budget = _DEFAULT_BUDGET_MB
    return _Runtime(torch, diffusers, device, getattr(torch, dtype_name), budget)


@asynccontextmanager
async def open_diffusers_backend(config: DiffusersConfig) -> AsyncIterator[DiffusersBackend]:
    """A backend running the models of `config.models_dir` on this machine.

    Imports torch and diffusers in a worker thread (seconds). Raises ConfigError when they are
    not installed or the device asked for is not there. The first `capabilities()` call scans
    the dirs. Pipelines are freed on exit.
    """
    runtime = await trio.to_thread.run_sync(_import_runtime, config)
    backend = DiffusersBackend(config, runtime)
    log.info(
        "diffusers backend on %s (%s), pipeline budget %d MiB",
        backend.device,
        backend.dtype,
        runtime.budget_mb,
    )
    try:
        yield backend
    finally:
        with trio.CancelScope(shield=True):
            async with backend._device_lock:
                backend._drop_pipelines()
