"""The models and LoRAs on disk: scanning, architectures and content hashes (blocking).

Models are the entries of a models dir: each diffusers folder (one with a ``model_index.json``)
and each single-file ``.safetensors`` or ``.ckpt`` checkpoint, named by folder or file stem.
LoRAs are the ``.safetensors`` files of a LoRAs dir, named by stem. The architecture ("sd1",
"sd2", "sdxl") comes from a folder's configs or a checkpoint's key names; anything else in the
dirs is skipped with a warning. Content hashes (SHA-256; advertised as the first 10 hex digits,
like A1111's) are computed once per file and kept in a `HashCache`, a JSON file keyed by path,
size and mtime. Only a ``.ckpt`` checkpoint's architecture needs torch, imported then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from sdcn_p2p.records import Advert, LoraInfo, ModelInfo

__all__ = [
    "HashCache",
    "ModelEntry",
    "checkpoint_architecture",
    "default_hash_cache",
    "folder_architecture",
    "scan_loras",
    "scan_models",
]

log = logging.getLogger(__name__)

_MIB = 2**20
_HASH_CHARS = 10
_CHUNK = 4 * _MIB
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def default_hash_cache() -> Path:
    """Where the hash cache lives unless configured: ``model-hashes.json`` in the user cache."""
    return Path(platformdirs.user_cache_dir("sdcn")) / "model-hashes.json"


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
