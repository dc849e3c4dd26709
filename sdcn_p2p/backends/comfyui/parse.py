"""ComfyUI's answers in, our types and messages out (pure); `ComfyError` when they make no sense.

``POST /prompt`` refusals name the job field at fault (`validation_error`); a failed prompt's
history says what went wrong (`execution_failure`: out of GPU memory said as such); ``GET
/queue`` lists prompt ids (`queued_ids`); ``/view`` must answer a whole PNG (`check_png`).
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image

from sdcn_p2p.backends.comfyui.workflow import JOB_FIELDS, OFFERED_INPUTS
from sdcn_p2p.errors import JobErrorCode

__all__ = [
    "ComfyError",
    "Refused",
    "check_png",
    "describe_error",
    "execution_failure",
    "image_suffix",
    "parse_json",
    "queued_ids",
    "validation_error",
]

_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ComfyError(Exception):
    """ComfyUI failed or answered nonsense; the backend's public methods turn this into our
    errors."""


class Refused(ComfyError):
    """ComfyUI refused a workflow (``POST /prompt`` 400): `code` is the job error to give."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def validation_error(body: bytes) -> Refused:
    """A `Refused` naming the job field of a ``POST /prompt`` 400 answer: ``{"error": {type,
    message, details, extra_info}, "node_errors": {node: {errors, dependent_outputs,
    class_type}}}``."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return Refused(JobErrorCode.BACKEND_FAILED, f"it refused the workflow: {_text(body)}")
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
                    field_name = JOB_FIELDS.get((class_type, name), name)
                    problems.append(f"{field_name} ({class_type}.{name}): {what}")
                    if name in OFFERED_INPUTS and error.get("type") == "value_not_in_list":
                        code = "unsupported"
                else:
                    problems.append(f"{class_type}: {what}")
    if not problems:
        error = data.get("error")
        if isinstance(error, dict):
            problems.append(f"{error.get('message', '?')}: {error.get('details', '')}".rstrip(": "))
        else:
            problems.append(_text(body))
    return Refused(code, "it refused the workflow: " + "; ".join(problems)[:800])


def execution_failure(messages: Any, seen: dict[str, Any] | None) -> str:
    """What went wrong in a prompt whose history status is "error".

    `messages` are the history's ``status.messages``; `seen` the ``execution_error`` the
    websocket brought, if any, in case the history lacks it.
    """
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


def queued_ids(
    queue: dict[str, list[Any]], which: tuple[str, ...] = ("running", "pending")
) -> set[str]:
    """The prompt ids in the `which` parts of a ``GET /queue`` answer."""
    return {
        item[1]
        for part in which
        for item in queue[f"queue_{part}"]
        if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str)
    }


def image_suffix(image: bytes) -> str:
    """The file suffix of an init image (PNG, JPEG or WebP), for its upload."""
    if image.startswith(b"\x89PNG"):
        return "png"
    if image.startswith(b"\xff\xd8"):
        return "jpg"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "webp"
    return "png"


def check_png(data: bytes) -> bytes:
    """`data` if it is a whole PNG (chunks and CRCs checked, pixels not decoded)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ComfyError("/view answered something that is not a PNG")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except _IMAGE_ERRORS as exc:
        raise ComfyError(f"/view answered a PNG that cannot be decoded: {exc}") from None
    return data


def parse_json(body: bytes, path: str) -> Any:
    """The JSON answer of `path`. Raises ComfyError if it is not JSON."""
    try:
        return json.loads(body)
    except ValueError:
        raise ComfyError(f"{path} answered something that is not JSON") from None


def describe_error(status: int, body: bytes) -> str:
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


def _text(body: bytes) -> str:
    return body[:300].decode(errors="replace").strip()
