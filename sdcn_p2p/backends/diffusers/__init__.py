"""The diffusers backend: Stable Diffusion run in this process by Hugging Face diffusers.

- `samplers`: A1111 sampler and scheduler names and the diffusers schedulers they stand for.
- `scan`: the models and LoRAs dirs: architectures, content hashes and their JSON cache.
- `backend`: `DiffusersConfig` and `DiffusersBackend`, which runs jobs in a worker thread.

torch and diffusers are imported by `open_diffusers_backend`, not with this package: the rest of
SDCN runs without them (``pip install 'sdcn-p2p[diffusers]'`` brings them).
"""

from sdcn_p2p.backends.diffusers.backend import (
    DEVICES,
    DTYPES,
    DiffusersBackend,
    DiffusersConfig,
    open_diffusers_backend,
    require_diffusers,
)
from sdcn_p2p.backends.diffusers.samplers import SAMPLERS, SCHEDULER_TYPES, scheduler_for
from sdcn_p2p.backends.diffusers.scan import (
    HashCache,
    ModelEntry,
    checkpoint_architecture,
    folder_architecture,
    scan_loras,
    scan_models,
)

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
