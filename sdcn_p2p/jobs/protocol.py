"""``/sdcn/job/2.0.0``: the job protocol between a gateway and a provider, and its client.

One stream per job. The client sends one message and never FIN: closing or resetting the
stream cancels the job. The provider answers with any number of ``queued`` and ``progress``
messages, then one ``result`` or ``error``::

    client    {"type": "job", "job": JobRequest.to_wire(), "deadline": seconds left,
               "job_id": str (optional: the gateway's name for the job, for the logs)}
    provider  {"type": "queued", "position": jobs ahead of this one}
              {"type": "progress", "step": i, "total": n}
              {"type": "result", "images": [png bytes, ...],
               "info": {"seed", "model", "provider", "queue_ms", "run_ms", "backend", ...}}
              {"type": "error", "code": JobErrorCode, "message": str}

The job inside is validated as the schema says (`JobRequest.from_wire`), and so is a
``job_id`` (`check_job_id`: 1 to 64 of ``[A-Za-z0-9._:-]``). Unknown keys in a message
envelope are ignored (room for metadata); unknown message types are refused.
Replies are decoded strictly and with bounds; anything malformed is a ProtocolError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio

from sdcn_p2p.connection import Stream
from sdcn_p2p.errors import JobError, JobErrorCode, ProtocolError, RemoteProtocolError
from sdcn_p2p.host import Host
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs.images import MAX_RESULT_IMAGE_BYTES, PNG_SIGNATURE, check_result_images
from sdcn_p2p.jobs.schema import (
    MAX_BATCH_SIZE,
    JobRequest,
    JobResult,
    Progress,
    Queued,
    check_job_id,
    check_number,
)
from sdcn_p2p.wire.messages import expect_map, pack

__all__ = [
    "JOB",
    "MAX_JOB_MESSAGE",
    "decode_reply",
    "error_message",
    "job_message",
    "parse_job_id",
    "parse_job_message",
    "progress_message",
    "queued_message",
    "request_job",
    "result_message",
]

JOB = "/sdcn/job/2.0.0"
#: Cap on one message of the job protocol, in bytes.
MAX_JOB_MESSAGE = 64 * 1024 * 1024
_MAX_INFO_BYTES = 64 * 1024
_MAX_ERROR_CHARS = 2000
_MAX_QUEUE_POSITION = 2**31
_MAX_PROGRESS_TOTAL = 100_000
_MAX_DEADLINE = 86_400.0
_INFO_FIELDS: dict[str, type] = {
    "seed": int,
    "model": str,
    "provider": str,
    "queue_ms": int,
    "run_ms": int,
    "backend": str,
}


# --- messages ----------------------------------------------------------------------------------


def job_message(job: JobRequest, deadline: float, job_id: str | None = None) -> dict[str, Any]:
    """The client's request: `job` to finish within `deadline` seconds (at most a day), named
    `job_id` in the logs of both sides."""
    message = {"type": "job", "job": job.to_wire(), "deadline": min(float(deadline), _MAX_DEADLINE)}
    if job_id is not None:
        message["job_id"] = check_job_id(job_id)
    return message


def parse_job_message(obj: Any) -> tuple[JobRequest, float]:
    """Return the job and its deadline (seconds from now) from a client's request.

    Raises JobError("bad_request", ...), for a malformed ``job_id`` too. Decodes the init
    image: see `JobRequest`.
    """
    if not isinstance(obj, dict) or obj.get("type") != "job":
        raise JobError.bad_request("type", "the request must be a map of type 'job'")
    deadline = check_number("deadline", obj.get("deadline"), 0, _MAX_DEADLINE)
    parse_job_id(obj)
    return JobRequest.from_wire(obj.get("job")), deadline


def parse_job_id(obj: Any) -> str | None:
    """The ``job_id`` of a client's request, None if it sent none.

    Raises JobError("bad_request", "job_id: ...") for one that is not a job id.
    """
    if not isinstance(obj, dict) or obj.get("job_id") is None:
        return None
    return check_job_id(obj["job_id"])


def queued_message(position: int) -> dict[str, Any]:
    """Tell the client its job waits behind `position` others."""
    return {"type": "queued", "position": min(max(position, 0), _MAX_QUEUE_POSITION)}


def progress_message(step: int, total: int) -> dict[str, Any]:
    """Report `step` of `total` done; both are clamped into range, so odd reports are safe."""
    total = min(max(total, 1), _MAX_PROGRESS_TOTAL)
    return {"type": "progress", "step": min(max(step, 0), total), "total": total}


def result_message(images: list[bytes], info: Mapping[str, Any]) -> dict[str, Any]:
    """The final reply: PNG `images` and `info` (seed, model, provider, queue_ms, run_ms,
    backend, plus any extras).

    Raises JobError("backend_failed") if the images are not 1 to 4 PNGs that fit the limits,
    ValueError if `info` lacks a field or is over 64 KiB (a bug in the caller).
    """
    _check_info(info, ValueError)
    failed = JobErrorCode.BACKEND_FAILED
    if not 1 <= len(images) <= MAX_BATCH_SIZE:
        raise JobError(failed, f"the backend returned {len(images)} images")
    for image in images:
        if not image.startswith(PNG_SIGNATURE) or len(image) > MAX_RESULT_IMAGE_BYTES:
            raise JobError(failed, "the backend returned an image that is not a PNG")
    if sum(map(len, images)) + _MAX_INFO_BYTES + 1024 > MAX_JOB_MESSAGE:
        raise JobError(failed, "the images are too large to send")
    return {"type": "result", "images": list(images), "info": dict(info)}


def error_message(code: JobErrorCode | str, message: str) -> dict[str, Any]:
    """The final reply for a failed job; a long `message` is cut short."""
    if code not in JobError.CODES:
        raise ValueError(f"unknown job error code {code!r}")
    return {"type": "error", "code": str(code), "message": message[:_MAX_ERROR_CHARS]}


def _check_info(info: object, error: Callable[[str], Exception]) -> dict[str, Any]:
    if not isinstance(info, Mapping):
        raise error("info must be a map")
    for name, kind in _INFO_FIELDS.items():
        value = info.get(name)
        if type(value) is not kind or (kind is int and value < 0):
            raise error(f"info field {name!r} must be a non-negative {kind.__name__}")
    if any(type(key) is not str for key in info):
        raise error("info keys must be strings")
    try:
        size = len(pack(dict(info)))
    except (TypeError, ValueError, OverflowError) as exc:
        raise error(f"info cannot be encoded: {exc}") from None
    if size > _MAX_INFO_BYTES:
        raise error(f"info is {size} bytes, over the cap of {_MAX_INFO_BYTES}")
    return dict(info)


def decode_reply(obj: Any) -> Queued | Progress | JobResult | JobError:
    """Decode a provider's reply; an error reply comes back as the JobError it reports.

    Raises ProtocolError for anything malformed, out of bounds or of an unknown type.
    """
    kind = expect_map(obj, {"type": str})["type"]
    if kind == "progress":
        expect_map(obj, {"step": int, "total": int})
        step, total = obj["step"], obj["total"]
        if not 0 <= step <= total <= _MAX_PROGRESS_TOTAL or total < 1:
            raise RemoteProtocolError(f"bad progress {step}/{total}")
        return Progress(step, total)
    if kind == "queued":
        position = expect_map(obj, {"position": int})["position"]
        if not 0 <= position <= _MAX_QUEUE_POSITION:
            raise RemoteProtocolError(f"bad queue position {position}")
        return Queued(position)
    if kind == "result":
        expect_map(obj, {"images": list, "info": dict})
        images = obj["images"]
        if not 1 <= len(images) <= MAX_BATCH_SIZE:
            raise RemoteProtocolError(f"a result must hold 1 to {MAX_BATCH_SIZE} images")
        for image in images:
            if type(image) is not bytes or not image.startswith(PNG_SIGNATURE):
                raise RemoteProtocolError("result images must be PNG bytes")
            if len(image) > MAX_RESULT_IMAGE_BYTES:
                raise RemoteProtocolError(f"a result image is over {MAX_RESULT_IMAGE_BYTES} bytes")
        return JobResult(images, _check_info(obj["info"], ProtocolError))
    if kind == "error":
        expect_map(obj, {"code": str, "message": str})
        code, message = obj["code"], obj["message"]
        if code not in JobError.CODES:
            raise RemoteProtocolError(f"unknown job error code {code!r:.40}")
        if len(message) > _MAX_ERROR_CHARS:
            raise RemoteProtocolError(f"error message over {_MAX_ERROR_CHARS} characters")
        return JobError(code, message)
    raise RemoteProtocolError(f"unknown job reply type {kind!r:.40}")


# --- client ------------------------------------------------------------------------------------


async def request_job(
    host: Host,
    peer: PeerId,
    job: JobRequest,
    *,
    deadline: float,
    on_progress: Callable[[int, int], None] | None = None,
    job_id: str | None = None,
) -> JobResult:
    """Run `job` on provider `peer` and return its images, within `deadline` seconds from now.

    `job_id` travels with the job, so that the provider's log lines name it as ours do.

    `on_progress(step, total)` is called for each progress reply; queued replies are checked
    and dropped. Raises JobError with the provider's code for an error reply, or with "timeout"
    when the deadline passes; ProtocolError for a malformed reply or a stream that ends
    without a result; DialError, UnsupportedProtocol and StreamReset (a
    trio.BrokenResourceError) as the host raises them. Cancelling, or any failure, resets the
    stream, which cancels the job on the provider.
    """
    start = trio.current_time()
    try:
        with trio.fail_after(max(deadline, 0)):
            stream = await host.new_stream(peer, JOB, max_message_size=MAX_JOB_MESSAGE)
            async with stream:
                try:
                    left = deadline - (trio.current_time() - start)
                    message = job_message(job, left, job_id)
                    result = await _exchange(stream, message, on_progress)
                except BaseException:
                    stream.reset()
                    raise
    except trio.TooSlowError:
        raise JobError(JobErrorCode.TIMEOUT, f"no result within {deadline:g} s") from None
    if len(result.images) != job.batch_size:
        raise RemoteProtocolError(f"asked for {job.batch_size} images, got {len(result.images)}")
    if sum(map(len, result.images)) > _THREAD_IMAGE_BYTES:
        await trio.to_thread.run_sync(check_result_images, result.images)
    else:
        check_result_images(result.images)
    return result


# Result images above this many bytes (all together) are checked in a worker thread.
_THREAD_IMAGE_BYTES = 1024 * 1024


async def _exchange(
    stream: Stream, request: dict[str, Any], on_progress: Callable[[int, int], None] | None
) -> JobResult:
    await stream.send_message(request)
    # No send_eof: to the provider, FIN means "stop".
    while True:
        try:
            reply = decode_reply(await stream.receive_message())
        except trio.EndOfChannel:
            raise RemoteProtocolError("the provider closed the stream without a result") from None
        if isinstance(reply, JobResult):
            return reply
        if isinstance(reply, JobError):
            raise reply
        if isinstance(reply, Progress) and on_progress is not None:
            on_progress(reply.step, reply.total)
