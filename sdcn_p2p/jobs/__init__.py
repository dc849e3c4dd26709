"""Jobs: what a txt2img or img2img job asks for, and how it travels from gateway to provider.

- `schema`: `JobRequest` and its validation, limits, kinds, sampler names with scheduler
  labels (`split_sampler`); `JobResult`, `Queued`, `Progress`. No I/O.
- `images`: init and result images checked from their headers (Pillow), limits on them.
- `protocol`: ``/sdcn/job/2.0.0``: its messages, `decode_reply`, and the client `request_job`.

The package exports the schema only, so that a backend imports it without the network; the
protocol is `sdcn_p2p.jobs.protocol`.
"""

from sdcn_p2p.jobs.images import MAX_IMAGE_SIDE, MAX_INIT_IMAGE_BYTES, MAX_RESULT_IMAGE_BYTES
from sdcn_p2p.jobs.schema import (
    KINDS,
    MAX_BATCH_SIZE,
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    SCHEDULERS,
    JobRequest,
    JobResult,
    Progress,
    Queued,
    split_sampler,
)

__all__ = [
    "KINDS",
    "MAX_BATCH_SIZE",
    "MAX_IMAGE_SIDE",
    "MAX_INIT_IMAGE_BYTES",
    "MAX_LORAS",
    "MAX_PROMPT_CHARS",
    "MAX_RESULT_IMAGE_BYTES",
    "MAX_SEED",
    "SCHEDULERS",
    "JobRequest",
    "JobResult",
    "Progress",
    "Queued",
    "split_sampler",
]
