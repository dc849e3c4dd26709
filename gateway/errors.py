"""Why a job the gateway dispatched did not run: one type per outcome a client must tell apart.

::

    DispatchError           a job that did not run (`message` says why)
    ├── Rejected            a provider found the request invalid (bad_request)
    ├── NoProvider          no provider offers the model, a LoRA, or the sampler, size or steps
    ├── ProviderFailed      the last provider tried failed in its backend
    ├── AllBusy             every capable provider stayed busy, or is banned or unreachable
    └── DeadlinePassed      the deadline passed

The dispatcher raises these; the HTTP layer alone chooses the status each is answered with.
"""

from __future__ import annotations

from sdcn_p2p.errors import SdcnError

__all__ = [
    "AllBusy",
    "DeadlinePassed",
    "DispatchError",
    "NoProvider",
    "ProviderFailed",
    "Rejected",
]


class DispatchError(SdcnError):
    """A job that did not run; `message` says why, in words for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Rejected(DispatchError):
    """A provider found the request invalid: no other provider would take it either."""


class NoProvider(DispatchError):
    """No provider offers the model, a LoRA, or the sampler, size or steps asked for."""


class ProviderFailed(DispatchError):
    """The last provider tried failed in its backend."""


class AllBusy(DispatchError):
    """Every capable provider stayed busy while the job waited, or is banned or unreachable,
    or the queue ahead would not let the job start within its wait.

    `retry_after`: seconds after which trying again is worth it, when the gateway can tell.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlinePassed(DispatchError):
    """The job's deadline passed before a provider finished it."""
