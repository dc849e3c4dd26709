"""Checking the images a job carries, from their headers before any pixel is decoded.

An init image (img2img) must be a PNG, JPEG or WebP of at most MAX_IMAGE_SIDE pixels a side
and MAX_INIT_IMAGE_BYTES bytes that decodes; a provider's result images must be whole PNGs
within the same side. Sizes come from the header, checked before Pillow allocates pixels (or,
for WebP, its canvas), so a small file declaring a huge image costs nothing. Pure CPU work: a
few ms per MB, so async code runs large checks in a worker thread.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from sdcn_p2p.errors import JobError, RemoteProtocolError

__all__ = [
    "MAX_IMAGE_SIDE",
    "MAX_INIT_IMAGE_BYTES",
    "MAX_RESULT_IMAGE_BYTES",
    "PNG_SIGNATURE",
    "check_init_image",
    "check_result_images",
]

#: Cap on an init image's encoded bytes (before base64).
MAX_INIT_IMAGE_BYTES = 50 * 1024 * 1024
#: Longest side of an init image or a result image, in pixels.
MAX_IMAGE_SIDE = 4096
#: Cap on one result image (PNG), in bytes.
MAX_RESULT_IMAGE_BYTES = 32 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# What Pillow raises for corrupt or truncated data, whichever decoder it is in.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    struct.error,
    Image.DecompressionBombError,
)


def _bad_image(problem: str) -> JobError:
    return JobError.bad_request("init_image", problem)


def check_init_image(data: bytes) -> None:
    """Refuse `data` unless it is a PNG, JPEG or WebP image of at most 4096² that decodes.

    The size comes from the header, checked before any pixel (or canvas) is allocated.
    Raises JobError("bad_request", "init_image: ...").
    """
    if len(data) > MAX_INIT_IMAGE_BYTES:
        raise _bad_image(f"is over {MAX_INIT_IMAGE_BYTES // 2**20} MiB")
    opener: Callable[[io.BytesIO], Image.Image]
    if data.startswith(PNG_SIGNATURE):
        opener = PngImagePlugin.PngImageFile
    elif data.startswith(b"\xff\xd8\xff"):
        opener = JpegImagePlugin.JpegImageFile
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        # Pillow's WebP decoder allocates its canvas as it opens: check the header first.
        _check_size(_webp_size(data))
        opener = WebPImagePlugin.WebPImageFile
    else:
        raise _bad_image("must be a PNG, JPEG or WebP image")
    try:
        with opener(io.BytesIO(data)) as image:
            _check_size(image.size)
            image.load()
    except _DECODE_ERRORS as exc:
        raise _bad_image(f"cannot be decoded: {exc}") from None


def _check_size(size: tuple[int, int]) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise _bad_image("declares no size")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        limit = f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}"
        raise _bad_image(f"must be at most {limit} pixels, got {width}x{height}")


def _webp_size(data: bytes) -> tuple[int, int]:
    """The canvas size a WebP header declares (RFC 9649); (0, 0) if it declares none."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return 0, 0


def check_result_images(images: list[bytes]) -> None:
    """Check that each of a provider's result `images` is a whole PNG of at most 4096².

    Reads the header and every chunk's CRC without decoding pixels (a few ms per MB: run
    it in a thread for large results). Raises ProtocolError naming the first bad image, so a
    provider that sends garbage behind a PNG signature is caught before a client sees it.
    """
    for index, image in enumerate(images):
        if not image.startswith(PNG_SIGNATURE):
            raise RemoteProtocolError(f"result image {index} is not a PNG")
        try:
            with PngImagePlugin.PngImageFile(io.BytesIO(image)) as png:
                width, height = png.size
                if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
                    raise RemoteProtocolError(f"result image {index} is {width}x{height} pixels")
                png.verify()
        except _DECODE_ERRORS as exc:
            raise RemoteProtocolError(f"result image {index} is not a valid PNG: {exc}") from None
