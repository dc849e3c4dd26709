"""The diffusers backend: Stable Diffusion run in this process by Hugging Face diffusers.

Models are the entries of a models dir: each diffusers folder (one with a ``model_index.json``)
and each single-file ``.safetensors`` or ``.ckpt`` checkpoint, named by folder or file stem.
LoRAs are the ``.safetensors`` files of a LoRAs dir, named by stem. The architecture ("sd1",
"sd2", "sdxl") comes from a folder's configs or a checkpoint's key names; anything else in the
dirs is skipped with a warning. Content hashes (SHA-256; advertised as the first 10 hex digits,
like A1111's) are computed once per file and kept in a JSON cache keyed by path, size and mtime.

A single-file checkpoint takes its component configs (tokenizer, scheduler, layer shapes) from
a diffusers folder of the same architecture in the models dir when there is one, offline;
without one, diffusers fetches the standard configs of its architecture from the Hugging Face
hub (once; they are cached).

A job's sampler is an A1111 name mapped to a diffusers scheduler (`SAMPLERS`), with an optional
scheduler suffix ("DPM++ 2M Karras"). Image i of a job is made with ``torch.Generator(cpu)``
seeded ``seed + i``, as A1111's batches are, so a seed gives the same pixels on the same device
and thread count. LoRAs are loaded for the job with their weights and unloaded after it.
Pipelines are kept per model, least recently used evicted first, within the VRAM budget.

Jobs run one at a time on the device, in a worker thread, so the peer keeps answering while
they run. Progress is reported after each step; cancelling stops the job at the next step. A
CUDA out-of-memory error fails the job with "backend_failed" and frees the cached pipelines.

torch and diffusers are imported by `open_diffusers_backend`, not with this module: the rest of
SDCN runs without them (``pip install 'sdcn-p2p[diffusers]'`` brings them).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import platformdirs
import trio
from PIL import Image

from sdcn_p2p.backends import Capabilities, JobOutput, ResolvedJob
from sdcn_p2p.errors import BackendUnavailable, ConfigError, JobError
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.records import Advert, LoraInfo, ModelInfo

__all__ = [
    "DEVICES",
    "DTYPES",
    "SAMPLERS",
    "SCHEDULER_TYPES",
    "DiffusersBackend",
    "DiffusersConfig",
    "HashCache",
    "ModelEntry",
    "checkpoint_architecture",
    "folder_architecture",
    "open_diffusers_backend",
    "require_diffusers",
    "scan_loras",
    "scan_models",
    "scheduler_for",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "float16", "bfloat16", "float32")
#: What ``pip install 'sdcn-p2p[diffusers]'`` brings, by import name.
_REQUIRED = ("torch", "diffusers", "transformers", "safetensors", "peft", "torchsde")
_INSTALL_HINT = "install them with: pip install 'sdcn-p2p[diffusers]'"

#: A1111 sampler names and the diffusers scheduler class (with settings) that each stands for.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
}
#: Scheduler names (as in "DPM++ 2M Karras") and the scheduler settings each stands for.
SCHEDULER_TYPES: dict[str, dict[str, Any]] = {
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}
# The samplers whose schedulers take a sigma schedule (karras, exponential).
_SIGMA_SAMPLERS = frozenset(
    {"Euler", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "DPM2", "DPM2 a", "LMS", "Heun", "UniPC"}
)
# Schedulers that draw their own noise from a seed rather than from the job's generators.
_SEEDED_SCHEDULERS = frozenset({"DPMSolverSDEScheduler"})

_MIB = 2**20
_HASH_CHARS = 10
_CHUNK = 4 * _MIB
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# Kept free of the VRAM budget by default, for activations (MiB).
_VRAM_HEADROOM_MB = 2048
# The default budget where torch reports no device memory (CPU, MPS), in MiB.
_DEFAULT_BUDGET_MB = 8192


def scheduler_for(sampler: str, scheduler: str | None) -> tuple[str, dict[str, Any]]:
    """The diffusers scheduler class name and settings for an A1111 sampler and scheduler name.

    Raises JobError("unsupported") for a sampler or combination not in `SAMPLERS`.
    """
    try:
        class_name, settings = SAMPLERS[sampler]
    except KeyError:
        raise JobError("unsupported", f"sampler {sampler!r} is not offered here") from None
    settings = dict(settings)
    if scheduler is not None:
        extra = SCHEDULER_TYPES.get(scheduler)
        sigmas = scheduler in ("karras", "exponential")
        if extra is None or (sigmas and sampler not in _SIGMA_SAMPLERS):
            raise JobError(
                "unsupported", f"sampler {sampler!r} with scheduler {scheduler!r} is not offered"
            )
        settings.update(extra)
    return class_name, settings


# --- configuration ---------------------------------------------------------------------------


def _default_hash_cache() -> Path:
    return Path(platformdirs.user_cache_dir("sdcn")) / "model-hashes.json"


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
            raise ConfigError(f"the models dir {str(self.models_dir)!r} is not a directory")
        if self.loras_dir is not None and not Path(self.loras_dir).is_dir():
            raise ConfigError(f"the LoRAs dir {str(self.loras_dir)!r} is not a directory")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.vram_budget_mb is not None and self.vram_budget_mb < 1:
            raise ConfigError("the VRAM budget must be at least 1 MiB")
        if self.max_pixels < 64 * 64 or self.max_steps < 1:
            raise ConfigError("max_pixels must be at least 64x64 and max_steps at least 1")


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


# --- models and LoRAs on disk ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A model found in the models dir: a diffusers folder or a single-file checkpoint."""

    info: ModelInfo
    path: Path
    single_file: bool


class HashCache:
    """SHA-256 and architecture of files, kept in a JSON file keyed by path, size and mtime.

    An entry whose file changed size or mtime is computed again. Not thread-safe: one scan at
    a time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        #: How many entries were computed rather than found, since this cache was opened.
        self.computed = 0
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable hash cache %s: %s", path, exc)
            data = {}
        if isinstance(data, dict):
            self._entries = {k: v for k, v in data.items() if isinstance(v, dict)}

    def get(
        self, path: Path, stamp: tuple[int, int], compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """The entry of `path` as of `stamp` (size, mtime in ns), computed when not known."""
        key = str(path.resolve())
        entry = self._entries.get(key)
        if entry is not None and entry.get("stamp") == list(stamp):
            return entry
        entry = {"stamp": list(stamp), **compute()}
        self.computed += 1
        self._entries[key] = entry
        self._dirty = True
        return entry

    def save(self) -> None:
        """Write the cache if it changed (atomically); a failure is logged, not raised."""
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(self._entries, indent=0), encoding="utf-8")
            os.replace(temporary, self.path)
            self._dirty = False
        except OSError as exc:
            log.warning("cannot write the hash cache %s: %s", self.path, exc)


def scan_models(models_dir: Path, cache: HashCache) -> list[ModelEntry]:
    """The diffusers folders and single-file checkpoints directly in `models_dir`, by name.

    Blocking: hashes new or changed files (seconds per GB).
    """
    entries: dict[str, ModelEntry] = {}
    for path in sorted(models_dir.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            if path.is_dir() and (path / "model_index.json").is_file():
                entry = _folder_entry(path, cache)
            elif path.is_file() and path.suffix.lower() in _CHECKPOINT_SUFFIXES:
                entry = _file_entry(path, cache)
            else:
                continue
        except (OSError, ValueError) as exc:
            log.warning("skipping model %s: %s", path, exc)
            continue
        if entry is None:
            continue
        key = entry.info.name.casefold()
        if key in entries:
            log.warning("skipping %s: a model named %r is already offered", path, entry.info.name)
            continue
        entries[key] = entry
    models = list(entries.values())
    if len(models) > Advert.MAX_MODELS:
        log.warning("%d models; offering the first %d", len(models), Advert.MAX_MODELS)
    return models[: Advert.MAX_MODELS]


def scan_loras(loras_dir: Path, cache: HashCache) -> dict[str, tuple[LoraInfo, Path]]:
    """The ``.safetensors`` LoRAs directly in `loras_dir`, by case-folded name. Blocking."""
    loras: dict[str, tuple[LoraInfo, Path]] = {}
    for path in sorted(loras_dir.iterdir()):
        if not path.is_file() or path.suffix.lower() != ".safetensors" or len(path.stem) > 256:
            continue
        try:
            entry = cache.get(path, _stamp(path), lambda p=path: {"sha256": _sha256_file(p)})
        except OSError as exc:
            log.warning("skipping LoRA %s: %s", path, exc)
            continue
        if path.stem.casefold() not in loras and len(loras) < Advert.MAX_LORAS:
            loras[path.stem.casefold()] = (LoraInfo(path.stem, entry["sha256"][:_HASH_CHARS]), path)
    return loras


def _stamp(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _folder_entry(folder: Path, cache: HashCache) -> ModelEntry | None:
    files = _folder_files(folder)
    stamps = [_stamp(p) for p in files]
    stamp = (sum(s[0] for s in stamps), max((s[1] for s in stamps), default=0))

    def compute() -> dict[str, Any]:
        # The hash of a listing of each file's path and hash: the same files, the same hash.
        listing = "".join(f"{p.relative_to(folder).as_posix()}\0{_sha256_file(p)}\n" for p in files)
        return {
            "sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "architecture": folder_architecture(folder),
        }

    entry = cache.get(folder, stamp, compute)
    return _model_entry(folder, folder.name, entry, single_file=False)


def _file_entry(path: Path, cache: HashCache) -> ModelEntry | None:
    def compute() -> dict[str, Any]:
        return {"sha256": _sha256_file(path), "architecture": checkpoint_architecture(path)}

    entry = cache.get(path, _stamp(path), compute)
    return _model_entry(path, path.stem, entry, single_file=True)


def _model_entry(
    path: Path, name: str, entry: dict[str, Any], *, single_file: bool
) -> ModelEntry | None:
    architecture = entry.get("architecture")
    if not architecture:
        log.warning("skipping %s: not a Stable Diffusion 1.x, 2.x or XL model", path)
        return None
    if not name.strip() or len(name) > 256:
        log.warning("skipping %s: its name must be 1 to 256 characters", path)
        return None
    title = f"{path.name} [{entry['sha256'][:_HASH_CHARS]}]"
    info = ModelInfo(name, title, entry["sha256"][:_HASH_CHARS], architecture)
    return ModelEntry(info, path, single_file)


def folder_architecture(folder: Path) -> str:
    """ "sd1", "sd2" or "sdxl" for a diffusers folder, from its configs; "" for anything else."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    pipeline = index.get("_class_name", "") if isinstance(index, dict) else ""
    if pipeline.startswith("StableDiffusionXL"):
        return "sdxl"
    if not pipeline.startswith("StableDiffusion") or "Upscale" in pipeline:
        return ""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ""
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"


def checkpoint_architecture(path: Path) -> str:
    """ "sd1", "sd2" or "sdxl" for a single-file checkpoint, from its key names; "" otherwise.

    A ``.safetensors`` header is read without torch; a ``.ckpt`` is loaded with torch
    (``weights_only``, memory-mapped).
    """
    if path.suffix.lower() == ".safetensors":
        keys = _safetensors_keys(path)
    else:
        import pickle

        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
            raise ValueError(f"torch cannot load it: {exc}") from exc
        data = data.get("state_dict", data) if isinstance(data, dict) else {}
        keys = [k for k in data if isinstance(k, str)]
    return _architecture_of_keys(keys)


def _safetensors_keys(path: Path) -> list[str]:
    with path.open("rb") as file:
        start = file.read(8)
        if len(start) < 8:
            raise ValueError("it is too short for a safetensors file")
        (size,) = struct.unpack("<Q", start)
        if size > 100 * _MIB:
            raise ValueError("its safetensors header is implausibly large")
        header = json.loads(file.read(size))
    if not isinstance(header, dict):
        raise ValueError("its safetensors header is not a map")
    return [k for k in header if k != "__metadata__"]


def _architecture_of_keys(keys: list[str]) -> str:
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        return ""
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"  # OpenCLIP text encoder
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    return ""


# --- the backend -----------------------------------------------------------------------------


class _Interrupted(Exception):
    """Raised in the worker thread at a step once the job was cancelled."""


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
        self._cache = HashCache(config.hash_cache or _default_hash_cache())
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

        async with self._device_lock:
            images = await _run_cancellable(
                lambda stop: self._run(job, entry, scheduler, loras, report, stop)
            )
        seeds = [job.seed + i for i in range(job.batch_size)]
        info = {
            "seeds": seeds,
            "model_hash": entry.info.hash,
            "scheduler": scheduler[0],
            "device": self._runtime.device,
        }
        return JobOutput(images, info)

    async def _resolve(self, job: JobRequest) -> ResolvedJob:
        if self._capabilities is not None:
            try:
                return self._capabilities.resolve(job)
            except JobError:
                pass  # it may have been added since the last scan: look again
        return (await self.capabilities()).resolve(job)

    # --- the worker thread ---------------------------------------------------------------------

    def _run(
        self,
        job: JobRequest,
        entry: ModelEntry,
        scheduler: tuple[str, dict[str, Any]],
        loras: list[tuple[Path, float]],
        report: Callable[[int, int], None],
        stop: threading.Event,
    ) -> list[bytes]:
        torch = self._runtime.torch
        try:
            return self._run_on_device(job, entry, scheduler, loras, report, stop)
        except (JobError, _Interrupted):
            raise
        except torch.OutOfMemoryError as exc:
            self._drop_pipelines()
            first_line = str(exc).splitlines()[0] if str(exc) else "out of memory"
            raise JobError(
                "backend_failed",
                f"out of GPU memory for {job.batch_size} x {job.width}x{job.height} on "
                f"{entry.info.name} ({first_line}); a smaller size or batch may fit",
            ) from None
        except Exception as exc:
            # torch, diffusers and the model files can fail in too many ways to list; the job
            # fails, the node goes on.
            log.exception("job on %s failed", entry.info.name)
            raise JobError("backend_failed", f"{type(exc).__name__}: {exc}") from exc

    def _run_on_device(
        self,
        job: JobRequest,
        entry: ModelEntry,
        scheduler: tuple[str, dict[str, Any]],
        loras: list[tuple[Path, float]],
        report: Callable[[int, int], None],
        stop: threading.Event,
    ) -> list[bytes]:
        runtime = self._runtime
        torch = runtime.torch
        init_image = _decode_init_image(job) if job.kind == "img2img" else None
        loaded = self._pipeline(entry)
        if stop.is_set():
            raise _Interrupted
        if job.kind == "img2img" and loaded.img2img is None:
            loaded.img2img = runtime.diffusers.AutoPipelineForImage2Image.from_pipe(loaded.pipe)
            loaded.img2img.set_progress_bar_config(disable=True)
        pipe = loaded.img2img if job.kind == "img2img" else loaded.pipe
        seeds = [job.seed + i for i in range(job.batch_size)]
        class_name, settings = scheduler
        if class_name in _SEEDED_SCHEDULERS:
            settings = {**settings, "noise_sampler_seed": seeds}
        pipe.scheduler = getattr(runtime.diffusers, class_name).from_config(
            loaded.scheduler_config, **settings
        )

        def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            if stop.is_set():
                raise _Interrupted
            report(index + 1, pipe.num_timesteps)
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
        with _loras_applied(loaded.pipe, loras), torch.inference_mode():
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
                    "unsupported", f"LoRA {path.stem!r} does not fit this model: {exc}"
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
        raise JobError("bad_request", f"cannot decode the init image: {exc}") from exc
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
