"""Hashes and architectures of ComfyUI's checkpoint and LoRA files, read from disk (blocking).

ComfyUI's API tells no file hashes, so a hash (A1111's: the first 10 hex digits of the file's
SHA-256) and an architecture are advertised only when the node can read the files itself: with
`ComfyuiConfig.models_dir` set to ComfyUI's ``models`` folder, each ``checkpoints/<name>`` and
``loras/<name>`` found there is hashed once and kept in a `HashCache` (the diffusers
backend's, in its own file).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import platformdirs

if TYPE_CHECKING:
    from sdcn_p2p.backends.diffusers.scan import HashCache

__all__ = ["open_hash_cache", "read_files"]

_HASH_CHARS = 10


def open_hash_cache(path: Path | None) -> HashCache:
    """The hash cache in `path` (None: ``comfyui-hashes.json`` in the user cache dir).

    The diffusers backend's modules are imported then, not with this one.
    """
    from sdcn_p2p.backends.diffusers.scan import HashCache

    return HashCache(path or Path(platformdirs.user_cache_dir("sdcn")) / "comfyui-hashes.json")


def read_files(
    models_dir: Path, cache: HashCache, wanted: list[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, str]]:
    """{(folder, ComfyUI name): {"hash", "architecture"}} of each `wanted` file readable under
    `models_dir` (for a checkpoint, its architecture is recognised too); the others are left
    out. Blocking: hashes new or changed files (seconds per GB), then saves `cache`.
    """
    from sdcn_p2p.backends.diffusers.scan import checkpoint_architecture

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
