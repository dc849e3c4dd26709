"""Why a job the gateway dispatched did not run: one type per outcome a client must tell apart.

::

    DispatchError           a job that did not run (`message` says why)
    ├── Rejected            a provider found the request invalid (bad_request)
    ├── NoProvider          no provider offers the model, a LoRA, or the sampler, size or steps
    ├── ProviderFailed      the last provider tried failed in its backend
    ├── AllBusy             every capable provider stayed busy, or is banned or unreachable
    └── DeadlinePassed      the deadline passed

The dispatcher raises these; the HTTP layer alone chooses the status each is answered with.

The job service (`gateway.jobservice`, `gateway.jobstore`) adds its own::

    JobServiceError         a request about a job that cannot be served (`message` says why)
    ├── UnknownJob          no job has that id
    ├── ResultGone          the job's record or result was deleted (retention, space, DELETE)
    ├── JobCancelled        the job was cancelled before it ended
    ├── TooManyJobs         the gateway holds as many unfinished jobs as it may
    └── StoreError          the data dir could not keep the job
        ├── StoreFull       the disk (or the store) is full
        └── StoreUnavailable  the data dir cannot be written (read-only, failing)

Who may ask, and how much (`gateway.access`, `gateway.limits`)::

    AccessError             a client refused before its request is served (`message`, `reason`)
    ├── Unauthorized        no API key where one is required, or a key the gateway does not know
    └── LimitExceeded       a client over one of its limits (`retry_after`: when to come back)
"""

from __future__ import annotations

from sdcn_p2p.errors import SdcnError

__all__ = [
    "AccessError",
    "AllBusy",
    "DeadlinePassed",
    "DispatchError",
    "JobCancelled",
    "JobServiceError",
    "LimitExceeded",
    "NoProvider",
    "ProviderFailed",
    "Rejected",
    "ResultGone",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "TooManyJobs",
    "Unauthorized",
    "UnknownJob",
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


class JobServiceError(SdcnError):
    """A request about a job that the job service cannot serve; `message` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownJob(JobServiceError):
    """No job has that id (or it was forgotten long ago)."""


class ResultGone(JobServiceError):
    """The job existed, but its result was deleted: past the retention, to make room, or by
    a DELETE."""


class JobCancelled(JobServiceError):
    """The job was cancelled (DELETE, or an A1111 interrupt) before it ended."""


class TooManyJobs(JobServiceError):
    """The gateway holds as many unfinished jobs as it may; `retry_after` (seconds) says
    when trying again is worth it."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreError(JobServiceError):
    """The data dir could not keep a job or its result."""


class StoreFull(StoreError):
    """The disk of the data dir, or the store, is full."""


class StoreUnavailable(StoreError):
    """The data dir cannot be written now: read-only, or failing."""


class AccessError(SdcnError):
    """A client refused before its request is served; `message` says why, and `reason` (one
    of `gateway.limits.REFUSAL_REASONS`) is what the refusal is counted as."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class Unauthorized(AccessError):
    """No API key where the gateway requires one (reason ``no_key``), or a key it does not know
    (``bad_key``)."""


class LimitExceeded(AccessError):
    """A client is over one of its limits (`reason` names it); `retry_after` (seconds) says
    when trying again is worth it."""

    def __init__(self, message: str, reason: str, retry_after: float) -> None:
        super().__init__(message, reason)
        self.retry_after = retry_after
