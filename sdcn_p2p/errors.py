"""The exception tree of SDCN p2p.

::

    SdcnError
    ├── ProtocolError          a peer's bytes broke the spec (codecs raise this)
    │   ├── HandshakeError     Noise failed, or the peer id is not the one dialled
    │   └── MessageTooLarge    a frame or message over its cap
    ├── RecordError            a signed record failed verification or is stale
    ├── MultiaddrError         a multiaddr we cannot parse or do not support
    ├── DialError              no address of the peer answered
    ├── StreamReset            the stream was reset (by either side)
    ├── UnsupportedProtocol    the remote peer has no handler for the protocol
    ├── ResourceLimitExceeded  a connection or stream limit refused the operation
    ├── JobError(code)         bad_request, busy, unsupported, backend_failed, timeout, cancelled
    ├── BackendUnavailable     a provider's backend (a webui) cannot be reached or answers nonsense
    └── ConfigError            bad local configuration (key file, flags)

Errors raised because of what a remote peer sent carry ``remote=True``; errors we caused
ourselves carry ``remote=False``.
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
    "MessageTooLarge",
    "MultiaddrError",
    "ProtocolError",
    "RecordError",
    "ResourceLimitExceeded",
    "SdcnError",
    "StreamReset",
    "UnsupportedProtocol",
]


class SdcnError(Exception):
    """Root of every error SDCN p2p raises on purpose."""


class ProtocolError(SdcnError):
    """The bytes we received (or were about to send) break the protocol.

    `remote` is True when the other side sent them.
    """

    def __init__(self, message: str, *, remote: bool = True) -> None:
        super().__init__(message)
        self.remote = remote


class HandshakeError(ProtocolError):
    """The secure-channel handshake failed, or authenticated an unexpected peer."""


class MessageTooLarge(ProtocolError):
    """A frame or message is larger than the cap for its protocol."""


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
