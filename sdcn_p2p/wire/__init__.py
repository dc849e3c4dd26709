"""Pure protocol cores: bytes in, events or bytes out; no I/O, no clock, no awaits.

- `varint`: unsigned LEB128 varints (multiformats).
- `messages`: length-prefixed strict msgpack with per-protocol size caps.
- `multistream`: multistream-select 1.0, a lazy dialer and a listener.
- `protobuf`: the protobuf wire format for the few messages below; `libp2p`: those messages
  (Noise handshake payload, Identify, signed envelope, peer record).
- `multiaddr`: binary multiaddrs.
- `noise`: the Noise XX handshake (25519, ChaChaPoly, SHA256) with the libp2p payload, its
  2-byte framing, and the transport cipher states it yields.
- `yamux`: yamux frames, stream states and flow control.
"""
