"""Fraud reports: a gateway's signed account of a provider caught returning a wrong picture
(pure: time passed in).

A report is an envelope (libp2p RFC 0002) of domain ``sdcn-fraud-report``, signed by the
reporting gateway, whose payload is the msgpack map::

    {"peer_id": the reporter, "provider": the excluded provider's peer id,
     "job": the job (JobRequest.to_wire, a concrete seed), "images": the provider's images,
     "receipt": the provider's signed receipt for them (sdcn_p2p.jobs.receipts),
     "reruns": [the receipts of the providers whose re-runs agreed with each other, ...],
     "rerun_fingerprints": [[fingerprint of each image] for each re-run] (gateway.compare),
     "reason": str, "issued_at": wall seconds}

`FraudReport.from_bytes` checks everything that can be checked without running the job: the
reporter's signature, the job, that the provider signed exactly these images for exactly this
job, that every re-run receipt is another provider's for the same job. What it cannot check is
whether the picture is wrong: a receiving gateway re-runs the job itself before it acts
(`gateway.reports`), so a lying gateway cannot frame an honest provider.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.compare import Fingerprint
from sdcn_p2p.errors import JobError, RecordError
from sdcn_p2p.identity import Identity, PeerId
from sdcn_p2p.jobs import MAX_BATCH_SIZE, JobRequest
from sdcn_p2p.jobs.receipts import Receipt, job_digest
from sdcn_p2p.records import Envelope, open_signed
from sdcn_p2p.wire.messages import pack

__all__ = ["MAX_REPORT_BYTES", "REPORT_DOMAIN", "REPORT_PAYLOAD_TYPE", "FraudReport"]

REPORT_DOMAIN = "sdcn-fraud-report"
REPORT_PAYLOAD_TYPE = b"/sdcn/fraud-report"
#: Cap on an encoded report; a report that would be larger (big images or init image) is not
#: sent.
MAX_REPORT_BYTES = 8 * 1024 * 1024
_MAX_RERUNS = 4
_MAX_REASON_CHARS = 1000
#: How far ahead of our clock a report may be dated (seconds).
_MAX_SKEW = 60.0


@dataclass(frozen=True, slots=True)
class FraudReport:
    """A verified fraud report (see the module docstring)."""

    reporter: PeerId
    provider: PeerId
    job: JobRequest
    images: tuple[bytes, ...]
    receipt: Receipt
    reruns: tuple[Receipt, ...]
    rerun_fingerprints: tuple[tuple[Fingerprint, ...], ...]
    reason: str
    issued_at: float
    envelope: Envelope

    @property
    def key(self) -> bytes:
        """What identifies the reported fault: the provider and the job's digest."""
        return hashlib.sha256(self.provider.bytes + self.receipt.job).digest()

    @classmethod
    def seal(
        cls,
        identity: Identity,
        job: JobRequest,
        images: Sequence[bytes],
        receipt: Receipt,
        reruns: Sequence[tuple[Receipt, Sequence[Fingerprint]]],
        reason: str,
        now: float,
    ) -> FraudReport:
        """`identity`'s report that `receipt`'s provider answered `job` with `images`, which
        differ from the re-runs (each a receipt and its images' fingerprints)."""
        reason = reason[:_MAX_REASON_CHARS]
        payload = pack(
            {
                "peer_id": identity.peer_id.bytes,
                "provider": receipt.provider.bytes,
                "job": job.to_wire(),
                "images": list(images),
                "receipt": receipt.to_bytes(),
                "reruns": [rerun.to_bytes() for rerun, _ in reruns],
                "rerun_fingerprints": [[f.to_wire() for f in prints] for _, prints in reruns],
                "reason": reason,
                "issued_at": float(now),
            }
        )
        envelope = Envelope.seal(identity, REPORT_DOMAIN, REPORT_PAYLOAD_TYPE, payload)
        return cls(
            identity.peer_id,
            receipt.provider,
            job,
            tuple(images),
            receipt,
            tuple(rerun for rerun, _ in reruns),
            tuple(tuple(prints) for _, prints in reruns),
            reason,
            float(now),
            envelope,
        )

    def to_bytes(self) -> bytes:
        return self.envelope.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, now: float, max_age: float) -> FraudReport:
        """Decode and verify a report issued at most `max_age` seconds before `now`.

        Raises RecordError for anything that does not verify. CPU work: it decodes the job
        (and its init image) and hashes the images; run it in a worker thread.
        """
        envelope = Envelope.from_bytes(data, max_size=MAX_REPORT_BYTES)
        reporter, payload = open_signed(
            envelope,
            REPORT_DOMAIN,
            REPORT_PAYLOAD_TYPE,
            {
                "provider": bytes,
                "job": dict,
                "images": list,
                "receipt": bytes,
                "reruns": list,
                "rerun_fingerprints": list,
                "reason": str,
                "issued_at": float,
            },
        )
        issued_at = payload["issued_at"]
        if not now - max_age <= issued_at <= now + _MAX_SKEW:
            raise RecordError("the fraud report is too old, or dated in the future")
        reason = payload["reason"]
        if len(reason) > _MAX_REASON_CHARS:
            raise RecordError("the fraud report's reason is too long")
        try:
            provider = PeerId(payload["provider"])
        except ValueError as exc:
            raise RecordError(f"the fraud report names an invalid provider: {exc}") from None
        try:
            job = JobRequest.from_wire(payload["job"])
        except JobError as exc:
            raise RecordError(f"the fraud report's job is invalid: {exc.message}") from None
        if job.seed == -1:
            raise RecordError("the fraud report's job has no concrete seed")
        images = payload["images"]
        if not 1 <= len(images) <= MAX_BATCH_SIZE or not all(type(i) is bytes for i in images):
            raise RecordError(f"a fraud report holds 1 to {MAX_BATCH_SIZE} images")
        digest = job_digest(job)
        receipt = Receipt.from_bytes(payload["receipt"])
        receipt.check(provider, digest, images)
        reruns = payload["reruns"]
        prints = payload["rerun_fingerprints"]
        if not 1 <= len(reruns) <= _MAX_RERUNS or len(prints) != len(reruns):
            raise RecordError(f"a fraud report holds 1 to {_MAX_RERUNS} re-runs")
        rerun_receipts = []
        rerun_prints = []
        for rerun, fingerprints in zip(reruns, prints, strict=True):
            if type(rerun) is not bytes or type(fingerprints) is not list:
                raise RecordError("a fraud report's re-run is a receipt and fingerprints")
            signed = Receipt.from_bytes(rerun)
            if signed.job != digest or signed.provider == provider:
                raise RecordError("a re-run receipt is not another provider's for this job")
            if len(fingerprints) != len(signed.images):
                raise RecordError("a re-run has a fingerprint per image")
            try:
                rerun_prints.append(tuple(Fingerprint.from_wire(f) for f in fingerprints))
            except ValueError as exc:
                raise RecordError(f"a re-run fingerprint is invalid: {exc}") from None
            rerun_receipts.append(signed)
        return cls(
            reporter,
            provider,
            job,
            tuple(images),
            receipt,
            tuple(rerun_receipts),
            tuple(rerun_prints),
            reason,
            issued_at,
            envelope,
        )
