"""The ComfyUI backend: a ComfyUI server, driven over its HTTP and WebSocket API.

- `samplers`: A1111 sampler and scheduler names and the ComfyUI ones they stand for.
- `workflow`: a job as API-format workflows, one per image (`Plan`, `build_workflow`).
- `parse`: ComfyUI's answers (validation errors, failed prompts, the queue) into our messages.
- `offer`: what ComfyUI offers (``/object_info``, ``/system_stats``) as `Capabilities`, and a
  job back in ComfyUI's names.
- `scan`: hashes and architectures of ComfyUI's model files, when this node can read them.
- `events`: following a job's prompts over ComfyUI's websocket.
- `backend`: `ComfyuiConfig` and `ComfyuiBackend`, the HTTP calls and a job's course.

All but `events`, `scan` and `backend` are pure: no I/O, no trio.
"""

from sdcn_p2p.backends.comfyui.backend import ComfyuiBackend, ComfyuiConfig, open_comfyui_backend
from sdcn_p2p.backends.comfyui.samplers import AUTOMATIC_SCHEDULERS, SAMPLERS, SCHEDULERS
from sdcn_p2p.backends.comfyui.workflow import Plan, build_workflow

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
