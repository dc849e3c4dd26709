"""A fake ComfyUI: its HTTP and WebSocket API's shapes and quirks, drawing test cards.

For the ComfyUI backend's tests, the provider's and benchmarks. It serves ``GET
/object_info/{node}``, ``/system_stats``, ``/prompt``, ``/queue``, ``/history/{prompt_id}``,
``/view`` and ``/ws?clientId=``, and ``POST /prompt``, ``/queue``, ``/interrupt`` and
``/upload/image``, for the core nodes a txt2img or img2img workflow needs (`NODES`), with
optional HTTP Basic or bearer auth (a proxy in front of ComfyUI). Like the real one:

- ``POST /prompt`` validates the workflow as ``execution.validate_prompt`` does and answers a
  400 ``{"error": {type, message, details, extra_info}, "node_errors": {id: {errors,
  dependent_outputs, class_type}}}``; a valid one is queued: ``{"prompt_id", "number",
  "node_errors": {}}``. One prompt runs at a time, in order.
- A node whose inputs are those of the previous prompt is not run again but answered from the
  cache (``execution_cached`` lists it); an identical prompt runs nothing, reports no progress
  and gives the same image files.
- Execution events (``execution_start``, ``execution_cached``, ``executing``, ``progress``,
  ``executed``, ``execution_success``, ``execution_error``, ``execution_interrupted``, and
  binary preview frames) go only to the websocket whose clientId is the prompt's
  ``client_id``; ``status`` goes to all.
- ``/history/{prompt_id}`` is ``{}`` until the prompt has ended; ``execution_success`` is sent
  before the history is written, ``executing`` with node null after.
- ``/interrupt`` stops the running prompt at its next step (only that prompt when the body
  names its ``prompt_id``); ``/queue {"delete": [...]}`` drops queued prompts.
- A batch (EmptyLatentImage ``batch_size`` n) draws image i from the noise of the one seed:
  its first image is the one-image picture of that seed, the others are not those of seed + i.

Pictures depend on everything that makes them (checkpoint, LoRAs and strengths, prompts,
seed, steps, cfg, sampler, scheduler, denoise, size, init image): same inputs, same bytes.
KSampler steps take `step_time` seconds each (trio time), or wait for `advance()` when it is
None. With `png` set every image is those bytes instead (an instant ComfyUI for benchmarks).
Tests arrange failures with `fail_next()` (an execution error, out of memory for instance) and
`inject()` (an HTTP answer), and stop the server to make ComfyUI disappear.

- `nodes`: the node classes it runs, as ComfyUI declares them, and their ``/object_info``.
- `validator`: workflow validation as ``execution.validate_prompt`` does it.
- `execution`: running one prompt's nodes, from the cache where it can.
- `fake`: `FakeComfyui`, its state, queue, history and websocket clients.
- `server`: the FastAPI app over it (`create_app`) and `open_fake_comfyui`.
"""

from sdcn_p2p.testing.fakecomfyui.fake import OUT_OF_MEMORY, FakeComfyui
from sdcn_p2p.testing.fakecomfyui.nodes import (
    KSAMPLER_NAMES,
    MAX_RESOLUTION,
    NODES,
    SCHEDULER_NAMES,
    NodeSpec,
)
from sdcn_p2p.testing.fakecomfyui.server import create_app, open_fake_comfyui

__all__ = [
    "KSAMPLER_NAMES",
    "MAX_RESOLUTION",
    "NODES",
    "OUT_OF_MEMORY",
    "SCHEDULER_NAMES",
    "FakeComfyui",
    "NodeSpec",
    "create_app",
    "open_fake_comfyui",
]
