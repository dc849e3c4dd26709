"""Signed results: a provider's receipt binds it to exactly its images for exactly one job."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sdcn_p2p.errors import RecordError
from sdcn_p2p.jobs.receipts import MAX_RECEIPT_BYTES, Receipt, image_digests, job_digest
from sdcn_p2p.records import Envelope
from sdcn_p2p.testing import small_job, test_identity

PROVIDER = test_identity(1)
JOB = small_job()
IMAGES = [b"\x89PNG first", b"\x89PNG second"]


def test_a_receipt_round_trips_and_checks() -> None:
    receipt = Receipt.sign(PROVIDER, job_digest(JOB), IMAGES)
    data = receipt.to_bytes()
    assert len(data) <= MAX_RECEIPT_BYTES
    decoded = Receipt.from_bytes(data)
    assert decoded.provider == PROVIDER.peer_id
    assert decoded.job == job_digest(JOB) and decoded.images == image_digests(IMAGES)
    decoded.check(PROVIDER.peer_id, job_digest(JOB), IMAGES)


def test_the_job_digest_covers_every_parameter() -> None:
    digests = {
        job_digest(job)
        for job in (
            JOB,
            JOB.with_seed(8),
            replace(JOB, steps=11),
            replace(JOB, model="card-b"),
            replace(JOB, cfg_scale=7.5),
            replace(JOB, prompt="a cat"),
        )
    }
    assert len(digests) == 6
    assert job_digest(small_job()) == job_digest(JOB)


@pytest.mark.parametrize(
    ("provider", "job", "images", "problem"),
    [
        (test_identity(2).peer_id, JOB, IMAGES, "signed by"),
        (PROVIDER.peer_id, JOB.with_seed(8), IMAGES, "another job"),
        (PROVIDER.peer_id, JOB, [IMAGES[0], b"\x89PNG swapped"], "not the ones signed"),
        (PROVIDER.peer_id, JOB, IMAGES[:1], "not the ones signed"),
    ],
)
def test_a_receipt_for_something_else_is_refused(provider, job, images, problem) -> None:
    receipt = Receipt.from_bytes(Receipt.sign(PROVIDER, job_digest(JOB), IMAGES).to_bytes())
    with pytest.raises(RecordError, match=problem):
        receipt.check(provider, job_digest(job), images)


def test_a_forged_or_malformed_receipt_is_refused() -> None:
    envelope = Receipt.sign(PROVIDER, job_digest(JOB), IMAGES).envelope
    forged = replace(envelope, payload=envelope.payload[:-1] + bytes([envelope.payload[-1] ^ 1]))
    for data in (
        replace(envelope, signature=bytes(64)).to_bytes(),
        Envelope.seal(
            test_identity(2), "sdcn-job-result", b"/sdcn/job-result", envelope.payload
        ).to_bytes(),  # signed by a key that is not the peer id it names
        forged.to_bytes(),
        b"\x93",
        bytes(MAX_RECEIPT_BYTES + 1),
    ):
        with pytest.raises(RecordError):
            Receipt.from_bytes(data)
