"""Per-client limits (pure: time passed in)."""

from __future__ import annotations

import math

import pytest

from gateway.errors import LimitExceeded
from gateway.limits import SHARED_WINDOW, Client, Limits, Quotas, Reason, TokenBucket
from sdcn_p2p.errors import ConfigError

TIGHT = Limits(
    requests_per_second=1, request_burst=2, max_in_flight=1, max_waiting=2,
    megapixel_steps_per_minute=60,
)  # fmt: skip


def test_a_token_bucket_holds_a_burst_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, capacity=4, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(1, 0.0) == pytest.approx(0.5)  # seconds until one token
    assert bucket.take(1, 0.5) == 0.0
    assert bucket.level(100.0) == 4  # never above its capacity


def test_a_job_bigger_than_the_bucket_needs_it_full_and_leaves_it_in_debt() -> None:
    bucket = TokenBucket(rate=1.0, capacity=10, now=0.0)
    assert bucket.take(25, 0.0) == 0.0 and bucket.tokens == -15
    assert bucket.take(25, 5.0) == pytest.approx(20.0)
    bucket.give_back(25)
    assert bucket.level(5.0) == 10


def test_requests_over_the_rate_are_refused_with_when_to_come_back() -> None:
    quotas = Quotas()
    client = Client("ip:192.0.2.1", TIGHT)
    quotas.request(client, 0.0)
    quotas.request(client, 0.0)
    with pytest.raises(LimitExceeded) as refused:
        quotas.request(client, 0.0)
    assert refused.value.reason == Reason.REQUESTS and refused.value.retry_after == 1.0
    assert "1 requests a second" in refused.value.message
    quotas.request(client, 1.0)
    quotas.request(Client("ip:192.0.2.2", TIGHT), 1.0)  # another client has its own bucket


def test_jobs_in_flight_waiting_and_work_each_have_their_limit() -> None:
    quotas = Quotas()
    client = Client("key:alice", TIGHT)
    quotas.accept(client, 10.0, 0.0, waits=False)
    with pytest.raises(LimitExceeded) as refused:
        quotas.accept(client, 10.0, 0.0, waits=False)
    assert refused.value.reason == Reason.IN_FLIGHT
    quotas.accept(client, 10.0, 0.0, waits=True)  # an async job waits instead
    quotas.accept(client, 10.0, 0.0, waits=True)
    with pytest.raises(LimitExceeded) as refused:
        quotas.accept(client, 10.0, 0.0, waits=True)
    assert refused.value.reason == Reason.WAITING
    assert quotas.usage(client, 0.0) == {
        "jobs_in_flight": 1, "jobs_waiting": 2, "megapixel_steps_available": 30.0,
    }  # fmt: skip
    assert not quotas.may_dispatch(client.id)
    quotas.ended(client.id, 1.0, waiting=False)
    assert quotas.may_dispatch(client.id)
    quotas.dispatched(client.id, 1.0)
    with pytest.raises(LimitExceeded) as refused:
        quotas.accept(client, 40.0, 1.0, waits=True)
    assert refused.value.reason == Reason.MEGAPIXEL_STEPS
    assert refused.value.retry_after == pytest.approx(9.0)  # 9 more at 1 a second
    quotas.ended(client.id, 2.0, waiting=True, refund=10.0)  # it ran nothing: work back
    quotas.accept(client, 40.0, 2.0, waits=True)


def test_a_refused_job_counts_nothing() -> None:
    quotas = Quotas()
    client = Client("key:bob", TIGHT)
    quotas.accept(client, 100.0, 0.0, waits=True)  # over a minute's worth: needs it full
    with pytest.raises(LimitExceeded):
        quotas.accept(client, 1.0, 0.0, waits=True)  # ... and leaves it in debt
    assert quotas.usage(client, 0.0)["jobs_waiting"] == 1
    assert quotas.usage(client, 0.0)["megapixel_steps_available"] == -40.0


def test_no_limits_for_a_client_without_them() -> None:
    quotas = Quotas()
    client = Client("internal")
    for _ in range(1000):
        quotas.request(client, 0.0)
        quotas.accept(client, 1e9, 0.0, waits=False)
    assert quotas.usage(client, 0.0)["megapixel_steps_available"] is None


def test_new_limits_from_a_reload_keep_what_the_client_used() -> None:
    quotas = Quotas()
    quotas.accept(Client("key:c", TIGHT), 50.0, 0.0, waits=False)
    looser = Client("key:c", Limits(megapixel_steps_per_minute=600))
    assert quotas.usage(looser, 0.0)["jobs_in_flight"] == 1
    quotas.accept(looser, 5.0, 0.0, waits=False)  # 10 left of the old 60: fits
    with pytest.raises(LimitExceeded):
        quotas.accept(looser, 6.0, 0.0, waits=False)


def test_the_gateway_is_shared_while_two_clients_have_jobs_or_had_them_lately() -> None:
    quotas = Quotas()
    a, b = Client("a"), Client("b")
    quotas.accept(a, 1.0, 0.0, waits=True)
    assert not quotas.shared(0.0)
    quotas.accept(b, 1.0, 1.0, waits=True)
    assert quotas.shared(1.0) and quotas.active == 2
    quotas.ended("b", 2.0, waiting=True)
    assert quotas.shared(2.0 + SHARED_WINDOW - 1)
    assert not quotas.shared(2.0 + SHARED_WINDOW + 1)


def test_idle_clients_are_forgotten_past_the_cap_busy_ones_never() -> None:
    quotas = Quotas(max_clients=100)
    quotas.accept(Client("busy", TIGHT), 1.0, 0.0, waits=True)
    for number in range(1000):
        quotas.request(Client(f"ip:{number}", TIGHT), 0.0)
    assert len(quotas) <= 100
    assert quotas.usage(Client("busy", TIGHT), 0.0)["jobs_waiting"] == 1


def test_limits_are_checked_and_read_from_a_table() -> None:
    assert Limits.from_mapping({"max_waiting": "unlimited"}).max_waiting == math.inf
    assert Limits.unlimited().to_json()["max_in_flight"] is None
    assert Limits().to_json()["max_in_flight"] == 4
    with pytest.raises(ConfigError, match="unknown limit 'speed'"):
        Limits.from_mapping({"speed": 1})
    for bad in ({"max_in_flight": 0}, {"max_in_flight": 1.5}, {"requests_per_second": 0},
                {"request_burst": "lots"}, {"megapixel_steps_per_minute": math.nan},
                {"max_waiting": True}):  # fmt: skip
        with pytest.raises(ConfigError):
            Limits.from_mapping(bad)
    assert Limits(max_waiting=0).max_waiting == 0
