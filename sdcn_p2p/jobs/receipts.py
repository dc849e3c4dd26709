"""Signed job results: a provider's Ed25519 signature over what it answered (pure, no I/O).

A provider answers every job with a *receipt*: a signed envelope (libp2p RFC 0002, as records
are) of domain ``sdcn-job-result`` whose payload is the msgpack map::

    {"peer_id": the provider's peer id, "job": SHA-256 of the job request,
     "images": [SHA-256 of each result image, in order]}

The job's digest is SHA-256 over the msgpack encoding of `JobRequest.to_wire` (a concrete
seed, every parameter, the init image's bytes), which gateway and provider compute alike. A
receipt binds the provider to the exact pictures it sent for the exact job it was asked, so
the evidence of a wrong picture can travel: anyone holding the job, the image and the receipt
can check who answered what, and re-run the job to see whether it was honest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from sdcn_p2p.errors import RecordError
from sdcn_p2p.identity import Identity, PeerId
from sdcn_p2p.jobs.schema import MAX_BATCH_SIZE, JobRequest
from sdcn_p2p.records import Envelope, open_signed
from sdcn_p2p.wire.messages import pack

__all__ = [
    "MAX_RECEIPT_BYTES",
    "RECEIPT_DOMAIN",
    "RECEIPT_PAYLOAD_TYPE",
    "Receipt",
    "image_digests",
    "job_digest",
]

RECEIPT_DOMAIN = "sdcn-job-result"
RECEIPT_PAYLOAD_TYPE = b"/sdcn/job-result"
#: Cap on an encoded receipt: a key, a signature and 1 + MAX_BATCH_SIZE digests fit easily.
MAX_RECEIPT_BYTES = 1024
_DIGEST_SIZE = 32


def job_digest(job: JobRequest) -> bytes:
    """SHA-256 of the job request as it travels (`JobRequest.to_wire`, msgpack).

    CPU work in proportion to the init image (about 20 ms for 50 MB): async code digests
    img2img jobs with a large init image in a worker thread.
    """
    return hashlib.sha256(pack(job.to_wire())).digest()


def image_digests(images: Sequence[bytes]) -> tuple[bytes, ...]:
    """SHA-256 of each image."""
    return tuple(hashlib.sha256(image).digest() for image in images)


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a provider signed: its peer id, the job's digest and its images' digests."""

    provider: PeerId
    job: bytes
    images: tuple[bytes, ...]
    envelope: Envelope

    @classmethod
    def sign(cls, identity: Identity, digest: bytes, images: Sequence[bytes]) -> Receipt:
        """The receipt `identity` gives for `images` as the result of the job of `digest`."""
        digests = image_digests(images)
        payload = pack({"peer_id": identity.peer_id.bytes, "job": digest, "images": list(digests)})
        envelope = Envelope.seal(identity, RECEIPT_DOMAIN, RECEIPT_PAYLOAD_TYPE, payload)
        return cls(identity.peer_id, digest, digests, envelope)

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        """Decode and verify an encoded receipt; raises RecordError if it is malformed, over
        MAX_RECEIPT_BYTES, or not signed by the peer id it names."""
        envelope = Envelope.from_bytes(data, max_size=MAX_RECEIPT_BYTES)
        signer, payload = open_signed(
            envelope, RECEIPT_DOMAIN, RECEIPT_PAYLOAD_TYPE, {"job": bytes, "images": list}
        )
        digest, images = payload["job"], payload["images"]
        if len(digest) != _DIGEST_SIZE:
            raise RecordError("receipt job digest is not 32 bytes")
        if not 1 <= len(images) <= MAX_BATCH_SIZE or not all(
            type(d) is bytes and len(d) == _DIGEST_SIZE for d in images
        ):
            raise RecordError(f"receipt must name 1 to {MAX_BATCH_SIZE} image digests of 32 bytes")
        return cls(signer, digest, tuple(images), envelope)

    def to_bytes(self) -> bytes:
        return self.envelope.to_bytes()

    def check(self, provider: PeerId, digest: bytes, images: Sequence[bytes]) -> None:
        """Raise RecordError unless this receipt is `provider`'s for exactly `images` as the
        result of the job of `digest`."""
        if self.provider != provider:
            raise RecordError(f"the result is signed by {self.provider}, not {provider}")
        if self.job != digest:
            raise RecordError("the result is signed for another job")
        if self.images != image_digests(images):
            raise RecordError("the result's images are not the ones signed")
