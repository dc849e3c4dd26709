"""Synchronous callbacks that stay registered only while their subscription is open.

`Callbacks.subscribe(fn)` registers `fn` at once and returns a `Subscription`; closing it, or
leaving its ``with`` block, unregisters `fn`. Pure: no tasks, no I/O. A callback runs inside
the code that emits, so it must be quick and must not raise; one that needs to await starts a
task in a nursery of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Generic, TypeVar

__all__ = ["Callbacks", "Subscription"]

_T = TypeVar("_T")


class Subscription:
    """Callbacks registered until `close()` or the end of the ``with`` block they open."""

    def __init__(self, unsubscribe: Iterable[Callable[[], None]]) -> None:
        """`unsubscribe`: what `close()` calls, once each."""
        self._unsubscribe = list(unsubscribe)

    @classmethod
    def joined(cls, subscriptions: Iterable[Subscription]) -> Subscription:
        """One subscription that closes all of `subscriptions`."""
        return cls([subscription.close for subscription in subscriptions])

    @property
    def closed(self) -> bool:
        return not self._unsubscribe

    def close(self) -> None:
        """Unregister the callbacks; closing twice does nothing."""
        unsubscribe, self._unsubscribe = self._unsubscribe, []
        for undo in unsubscribe:
            undo()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Callbacks(Generic[_T]):
    """The callbacks subscribed to one kind of event, called in the order they subscribed."""

    def __init__(self) -> None:
        # Keyed by subscription, not by function: the same function may be subscribed twice.
        self._callbacks: dict[int, Callable[[_T], None]] = {}
        self._keys = itertools.count()

    def subscribe(self, callback: Callable[[_T], None]) -> Subscription:
        """Call `callback(event)` for every event emitted until the subscription closes."""
        key = next(self._keys)
        self._callbacks[key] = callback

        def remove() -> None:
            self._callbacks.pop(key, None)

        return Subscription([remove])

    def emit(self, event: _T) -> None:
        """Call every subscribed callback with `event`; one unsubscribed meanwhile is skipped."""
        for key, callback in list(self._callbacks.items()):
            if key in self._callbacks:
                callback(event)

    def __len__(self) -> int:
        return len(self._callbacks)
