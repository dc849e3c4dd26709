"""The exception tree of SDCN p2p.

::

    SdcnError
    ├── ProtocolError              a protocol was broken (catch it for either side)
    │   ├── LocalProtocolError     we were about to break it; nothing was sent
    │   └── RemoteProtocolError    the peer's bytes broke it (codecs raise this)
    │       ├── HandshakeError     Noise failed, or the peer id is not the one dialled
    │       └── MessageTooLarge    a frame or message over its cap
    ├── RecordError            a signed record failed verification or is stale
    ├── MultiaddrError         a multiaddr we cannot parse or do not support
    ├── DialError              no address of the peer answered
    ├── StreamReset            the stream was reset (by either side)
    ├── UnsupportedProtocol    the remote peer has no handler for the protocol
    ├── ResourceLimitExceeded  a connection or stream limit refused the operation
    ├── JobError(code)         bad_request, busy, unsupported, backend_failed, timeout, cancelled
    ├── BackendUnavailable     a provider's backend (a webui) cannot be reached or answers nonsense
    └── ConfigError            bad local configuration (key file, flags)

As in h11 and httpx, whose fault a protocol error was is its type: a `RemoteProtocolError`
means the other side sent bytes that break the spec (that stream or connection is over); a
`LocalProtocolError` means we were about to (our caller's bug, or a message over the cap we
send), and nothing went out.
"""

from __future__ import annotations

import enum

import trio

__all__ = [
    "NETWORK_ERRORS",
    "BackendUnavailable",
    "ConfigError",
    "DialError",
    "HandshakeError",
    "JobError",
    "JobErrorCode",
    "LocalProtocolError",
    "MessageTooLarge",
    "MultiaddrError",
    "ProtocolError",
    "RecordError",
    "RemoteProtocolError",
    "ResourceLimitExceeded",
    "SdcnError",
    "StreamReset",
    "UnsupportedProtocol",
]


class SdcnError(Exception):
    """Root of every error SDCN p2p raises on purpose."""


class ProtocolError(SdcnError):
    """A protocol was broken; the subclass says by whom."""


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (a message over its cap, a call out of turn).

    Nothing was sent; the connection is as it was.
    """


class RemoteProtocolError(ProtocolError):
    """The bytes the other side sent break the protocol."""


class HandshakeError(RemoteProtocolError):
    """The secure-channel handshake failed, or authenticated an unexpected peer."""


class MessageTooLarge(RemoteProtocolError):
    """A frame or message the other side sent is larger than the cap for its protocol."""


class RecordError(SdcnError):
    """A signed record is forged, tampered, mis-keyed, for another domain, or stale."""


class MultiaddrError(SdcnError, ValueError):
    """A multiaddr that is malformed or uses a protocol we do not support."""


class DialError(SdcnError):
    """A dial failed: no address answered, or the handshake failed."""


class StreamReset(SdcnError, trio.BrokenResourceError):
    """The stream was reset, by the remote peer or locally; no more data will flow.

    Also a trio.BrokenResourceError, so streams keep trio's stream contract.
    """


class UnsupportedProtocol(SdcnError):
    """The remote peer has no handler for the protocol a stream asked for."""


class ResourceLimitExceeded(SdcnError):
    """A connection or stream limit refused the operation."""


class JobErrorCode(enum.StrEnum):
    """How a job failed, as the job protocol sends it (the values are the wire strings)."""

    BAD_REQUEST = "bad_request"  # the request is invalid: no provider will run it
    BUSY = "busy"  # no room now (or draining): try another provider, or later
    UNSUPPORTED = "unsupported"  # the model, a LoRA, the sampler or the size is not offered
    BACKEND_FAILED = "backend_failed"  # the backend broke running it
    TIMEOUT = "timeout"  # the deadline passed
    CANCELLED = "cancelled"


class JobError(SdcnError):
    """A job failed; `code` says how, for the gateway to decide whether to retry.

    Raises ValueError for a code that is not a JobErrorCode.
    """

    CODES = frozenset(JobErrorCode)

    def __init__(self, code: JobErrorCode | str, message: str) -> None:
        if code not in self.CODES:
            raise ValueError(f"unknown job error code {code!r}")
        code = JobErrorCode(code)
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def bad_request(cls, field: str, problem: str) -> JobError:
        """A ``bad_request`` error naming the field at fault: ``"<field>: <problem>"``."""
        return cls(JobErrorCode.BAD_REQUEST, f"{field}: {problem}")


class BackendUnavailable(SdcnError):
    """A backend cannot tell what it offers: its server is down, refuses us, or answers nonsense."""


class ConfigError(SdcnError):
    """Bad local configuration: a flag, a key file, an address to listen on."""


#: What talking to another peer raises in normal operation, through its fault or the
#: network's: catch these around remote calls and handlers, and let anything else (a bug)
#: propagate.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    SdcnError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.EndOfChannel,
)
