"""Test support shipped for anyone to use, like `trio.testing`.

- `network` (re-exported here): in-memory networks of Hosts and Peers under MockClock,
  deterministic identities, a transport that tampers with what it sends, and waiting helpers;
  and providers dialling a peer over real WebSockets on loopback.
- `fakewebui`: a fake AUTOMATIC1111 webui speaking its HTTP API with its quirks (needs FastAPI,
  a core dependency); import it as ``sdcn_p2p.testing.fakewebui``.
- `fakecomfyui`: a fake ComfyUI speaking its HTTP and WebSocket API with its quirks (its
  cache, per-client events, history that stays ``{}`` until a prompt ends);
  ``sdcn_p2p.testing.fakecomfyui``, a package: its node specs, validator, execution, state and
  server.
- `tinysd`: a tiny, randomly initialised Stable Diffusion built offline, for the diffusers
  backend (needs the ``diffusers`` extra, imported when called); ``sdcn_p2p.testing.tinysd``.
- `trust`: backends that add a device's jitter to pictures, or return wrong ones, for the
  gateway's spot checks; ``sdcn_p2p.testing.trust``.
- `gated`: a test card whose jobs take each step only when the test allows it;
  ``sdcn_p2p.testing.gated``.
- `browser`: headless Chromium under Playwright (the ``test`` extra) for the gateway's pages,
  and a devnet run by trio in a thread beside it; ``sdcn_p2p.testing.browser``.
"""

from sdcn_p2p.testing.network import (
    MOCK_EPOCH,
    WAIT_TIMEOUT,
    Tamper,
    TamperingTransport,
    all_tasks,
    inline_threads,
    mock_wall_clock,
    open_loopback_providers,
    open_memory_hosts,
    open_memory_peers,
    open_memory_providers,
    small_job,
    test_identity,
    wait_advert,
)

__all__ = [
    "MOCK_EPOCH",
    "WAIT_TIMEOUT",
    "Tamper",
    "TamperingTransport",
    "all_tasks",
    "inline_threads",
    "mock_wall_clock",
    "open_loopback_providers",
    "open_memory_hosts",
    "open_memory_peers",
    "open_memory_providers",
    "small_job",
    "test_identity",
    "wait_advert",
]
