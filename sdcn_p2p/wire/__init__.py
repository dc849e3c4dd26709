"""Pure protocol cores: bytes in, events or bytes out; no I/O, no clock, no awaits.

- `varint`: unsigned LEB128 varints (multiformats).
- `messages`: length-prefixed strict msgpack with per-protocol size caps.
- `noise`: the Noise XX handshake (25519, ChaChaPoly, SHA256) with the libp2p payload, and
  the transport cipher states it yields.
- `yamux`: yamux frames, stream states and flow control.
"""
