"""Whether two result images show the same picture despite device jitter (pure; Pillow only).

PyTorch and diffusers promise no bit-exact results across devices, dtypes or versions, so two
honest providers running one job with one seed return pictures that differ a little. Each image
is reduced to a `Fingerprint` and two are compared twice over:

- a 64-bit perceptual hash (pHash: the 8x8 lowest frequencies of a 2-D DCT of the image in
  32x32 greyscale, each bit "above the median"), compared in bits that differ (0-64);
- a thumbnail, 32x32 RGB area-averaged, compared as the mean absolute difference of its
  channels (0-1 of full scale).

The hash sees the composition and ignores fine noise; the thumbnail sees colour and brightness,
which the hash (greyscale, relative to its median) does not. Two images are the same picture
when both distances are within `Thresholds`; images of different sizes never are. The default
thresholds come from measured distributions: honest pairs of the tiny diffusers model (float32
against bfloat16, one torch thread against two) against every kind of lie
(``benchmarks/trust_distances.py``; the figures are in README.md, "Trust").

A fingerprint costs a PNG decode and a resize (about 5 ms at 512x512) plus ~2 ms of Python for
the DCT; async code fingerprints large images in a worker thread. Why not `imagehash`: it needs
numpy, SciPy and PyWavelets, which the core does not install, for the 30 lines here.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

__all__ = [
    "HASH_BITS",
    "THUMB_SIDE",
    "Distance",
    "Fingerprint",
    "Thresholds",
    "compare_results",
    "distance",
    "fingerprint",
    "hash_distance",
    "pixel_distance",
]

#: Bits in the perceptual hash.
HASH_BITS = 64
#: Side of the thumbnail (pixels), whose greyscale the hash is computed from.
THUMB_SIDE = 32
_DCT_SIDE = THUMB_SIDE
_LOW = 8  # the hash keeps the lowest 8x8 frequencies

# DCT-II basis: _BASIS[k][n] = cos(pi * (2n + 1) * k / (2 * 32)), for the low frequencies only.
_BASIS = tuple(
    tuple(math.cos(math.pi * (2 * n + 1) * k / (2 * _DCT_SIDE)) for n in range(_DCT_SIDE))
    for k in range(_LOW)
)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What the comparison keeps of one image."""

    width: int
    height: int
    phash: int  # HASH_BITS bits
    thumb: bytes  # THUMB_SIDE x THUMB_SIDE RGB, row by row

    def to_wire(self) -> list[object]:
        """``[width, height, phash as 8 bytes, thumb]`` for msgpack."""
        return [self.width, self.height, self.phash.to_bytes(HASH_BITS // 8, "big"), self.thumb]

    @classmethod
    def from_wire(cls, obj: object) -> Fingerprint:
        """Decode `to_wire` output; ValueError if it is not one."""
        if not isinstance(obj, list | tuple) or len(obj) != 4:
            raise ValueError("a fingerprint is [width, height, phash, thumb]")
        width, height, phash, thumb = obj
        if not (type(width) is int and type(height) is int and width > 0 and height > 0):
            raise ValueError("fingerprint width and height must be positive integers")
        if type(phash) is not bytes or len(phash) != HASH_BITS // 8:
            raise ValueError(f"fingerprint phash must be {HASH_BITS // 8} bytes")
        if type(thumb) is not bytes or len(thumb) != THUMB_SIDE * THUMB_SIDE * 3:
            raise ValueError(f"fingerprint thumb must be {THUMB_SIDE}x{THUMB_SIDE} RGB bytes")
        return cls(width, height, int.from_bytes(phash, "big"), thumb)


@dataclass(frozen=True, slots=True)
class Distance:
    """How far apart two pictures are: hash bits that differ, and the thumbnails' mean absolute
    difference (0-1). Pictures of different sizes are infinitely far apart."""

    bits: float
    pixel: float

    @classmethod
    def far(cls) -> Distance:
        return cls(math.inf, math.inf)

    def worst(self, other: Distance) -> Distance:
        return Distance(max(self.bits, other.bits), max(self.pixel, other.pixel))


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The largest distances two pictures may be apart and still count as the same.

    Measured (README.md, "Trust"): honest pairs of the tiny diffusers model (float32 against
    bfloat16, 1 against 2 threads) were at most 2 bits and 0.002 apart, and the test card's
    simulated jitter 6 bits and 0.013; noise, another seed, another model and a fixed image
    were at least 18 bits and 0.12 apart (10 bits and 0.10 on test cards). The defaults sit
    well above the honest pairs, since a false strike costs more than a lie caught one check
    later. Fewer steps than asked changes the tiny model's picture less than that, and goes
    unseen when the picture hardly changes.
    """

    max_bits: int = 12
    max_pixel: float = 0.03

    def same(self, distance: Distance) -> bool:
        """Whether `distance` is within both thresholds."""
        return distance.bits <= self.max_bits and distance.pixel <= self.max_pixel


def fingerprint(png: bytes) -> Fingerprint:
    """The fingerprint of an image (any format Pillow reads; results are PNGs).

    Raises what Pillow raises for data it cannot decode (OSError, ValueError, ...).
    """
    with Image.open(io.BytesIO(png)) as image:
        size = image.size
        rgb = image.convert("RGB")
    small = rgb.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX, reducing_gap=2.0)
    return Fingerprint(size[0], size[1], _phash(small.convert("L").tobytes()), small.tobytes())


def _phash(grey: bytes) -> int:
    """pHash of a 32x32 greyscale: the low 8x8 DCT coefficients against their median."""
    side = _DCT_SIDE
    rows = [grey[r * side : (r + 1) * side] for r in range(side)]
    # Separable DCT, low frequencies only: along each row, then down each column.
    along = [
        [sum(p * c for p, c in zip(row, basis, strict=True)) for basis in _BASIS] for row in rows
    ]
    coefficients = [
        sum(along[r][k] * basis[r] for r in range(side)) for basis in _BASIS for k in range(_LOW)
    ]
    median = sorted(coefficients)[len(coefficients) // 2]
    bits = 0
    for value in coefficients:
        bits = (bits << 1) | (value > median)
    return bits


def hash_distance(a: Fingerprint, b: Fingerprint) -> int:
    """Bits in which the two perceptual hashes differ (0-64)."""
    return (a.phash ^ b.phash).bit_count()


def pixel_distance(a: Fingerprint, b: Fingerprint) -> float:
    """Mean absolute difference of the two thumbnails, 0 (same) to 1 (black against white)."""
    total = sum(abs(x - y) for x, y in zip(a.thumb, b.thumb, strict=True))
    return total / (255 * len(a.thumb))


def distance(a: Fingerprint, b: Fingerprint) -> Distance:
    """How far apart two pictures are (see `Distance`)."""
    if (a.width, a.height) != (b.width, b.height):
        return Distance.far()
    return Distance(hash_distance(a, b), pixel_distance(a, b))


def compare_results(a: Sequence[Fingerprint], b: Sequence[Fingerprint]) -> Distance:
    """The worst distance between two results' images, image by image; results with different
    numbers of images are infinitely far apart."""
    if len(a) != len(b) or not a:
        return Distance.far()
    worst = Distance(0, 0.0)
    for x, y in zip(a, b, strict=True):
        worst = worst.worst(distance(x, y))
    return worst
