"""The SDCN API's request bodies (``POST /txt2img``, ``/img2img``) made into jobs (pure).

A body is the job's fields as JSON (``shared/seed/SDCN.md``), validated by the job schema;
the init image is base64, with or without a ``data:image/...;base64,`` prefix, and may be
wrapped in lines as some encoders do.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

from sdcn_p2p.errors import JobError
from sdcn_p2p.jobs import MAX_INIT_IMAGE_BYTES, JobRequest
from sdcn_p2p.jobs.schema import type_name

__all__ = ["decode_base64_image", "parse_request"]

_DATA_URL = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
# Base64 of the largest init image accepted; longer text is refused before decoding.
_MAX_BASE64_CHARS = (MAX_INIT_IMAGE_BYTES + 2) // 3 * 4


def parse_request(kind: str, body: Mapping[str, Any]) -> JobRequest:
    """Validate an SDCN API body (parsed JSON) of `kind` ("txt2img" or "img2img").

    Decodes the init image (CPU work: run img2img in a worker thread). Raises
    JobError("bad_request", "<field>: ...").
    """
    return JobRequest.from_fields(kind, body, init_image=decode_base64_image)


def decode_base64_image(value: object) -> bytes:
    """The bytes of a base64 image, `data:` prefix allowed; JobError(JobErrorCode.BAD_REQUEST,
    "init_image: ...") if it is not base64 or is over MAX_INIT_IMAGE_BYTES.
    """
    if not isinstance(value, str):
        raise JobError.bad_request("init_image", f"must be a base64 string, got {type_name(value)}")
    if prefix := _DATA_URL.match(value):
        value = value[prefix.end() :]
    if len(value) > _MAX_BASE64_CHARS:
        raise JobError.bad_request("init_image", f"is over {MAX_INIT_IMAGE_BYTES // 2**20} MiB")
    try:
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            # Some encoders wrap lines: whitespace is tolerated, nothing else.
            return base64.b64decode("".join(value.split()), validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise JobError.bad_request("init_image", "is not valid base64") from None
