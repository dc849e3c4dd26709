"""Callbacks and their subscriptions, as plain functions."""

from __future__ import annotations

from sdcn_p2p._subscriptions import Callbacks, Subscription


def test_callbacks_run_in_subscription_order_while_subscribed() -> None:
    callbacks: Callbacks[int] = Callbacks()
    heard: list[tuple[str, int]] = []
    first = callbacks.subscribe(lambda n: heard.append(("first", n)))
    with callbacks.subscribe(lambda n: heard.append(("second", n))):
        callbacks.emit(1)
    callbacks.emit(2)
    first.close()
    callbacks.emit(3)
    assert heard == [("first", 1), ("second", 1), ("first", 2)]
    assert len(callbacks) == 0


def test_one_function_subscribed_twice_is_called_twice_until_each_closes() -> None:
    callbacks: Callbacks[int] = Callbacks()
    heard: list[int] = []
    one, two = callbacks.subscribe(heard.append), callbacks.subscribe(heard.append)
    callbacks.emit(1)
    one.close()
    callbacks.emit(2)
    two.close()
    callbacks.emit(3)
    assert heard == [1, 1, 2]


def test_a_callback_unsubscribed_during_an_emit_is_skipped() -> None:
    callbacks: Callbacks[int] = Callbacks()
    heard: list[str] = []
    later: list[Subscription] = []
    callbacks.subscribe(lambda n: later[0].close())
    later.append(callbacks.subscribe(lambda n: heard.append("later")))
    callbacks.emit(1)
    assert heard == []


def test_a_joined_subscription_closes_all_of_its_parts() -> None:
    a: Callbacks[int] = Callbacks()
    b: Callbacks[int] = Callbacks()
    with Subscription.joined([a.subscribe(print), b.subscribe(print)]) as joined:
        assert len(a) == len(b) == 1
    assert joined.closed and len(a) == len(b) == 0
