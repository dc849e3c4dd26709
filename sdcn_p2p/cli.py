"""The ``sdcn`` command.

Each subcommand is an ``_add_<name>`` function that declares its arguments and sets
``run`` to the function that carries it out; `build_parser` lists them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from sdcn_p2p._version import __version__
from sdcn_p2p.backends import Backend
from sdcn_p2p.backends.diffusers import DEVICES as DIFFUSERS_DEVICES
from sdcn_p2p.backends.diffusers import DTYPES as DIFFUSERS_DTYPES
from sdcn_p2p.backends.diffusers import (
    DiffusersConfig,
    open_diffusers_backend,
    require_diffusers,
)
from sdcn_p2p.backends.testcard import TestcardConfig, open_testcard_backend
from sdcn_p2p.errors import ConfigError, MultiaddrError, SdcnError
from sdcn_p2p.host import HostConfig, open_host
from sdcn_p2p.httpserver import parse_bind
from sdcn_p2p.identity import Identity, PeerId, default_key_path, load_or_create_identity
from sdcn_p2p.logs import LOG_FORMATS, configure_logging
from sdcn_p2p.metrics import open_metrics_server
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import Peer, PeerConfig, open_peer
from sdcn_p2p.provider import ProviderConfig, open_provider, run_until_signalled
from sdcn_p2p.records import Role

if TYPE_CHECKING:  # the gateway (FastAPI, pydantic) is imported only by commands that run one
    from gateway.access import AccessConfig
    from gateway.jobservice import JobsConfig
    from gateway.node import Gateway

__all__ = [
    "build_parser",
    "default_data_dir",
    "jobs_config_from_args",
    "main",
    "node_config_from_args",
    "open_backend_from_args",
    "open_peer_metrics",
    "peer_config_from_args",
    "ping_peer",
    "run_devnet",
    "run_gateway",
    "run_node",
]

log = logging.getLogger(__name__)

_LOG_LEVELS = ("debug", "info", "warning", "error")


def main(argv: list[str] | None = None) -> int:
    """Run the ``sdcn`` command line (`argv` defaults to ``sys.argv[1:]``); return the exit code.

    Usage errors, ``--help`` and ``--version`` exit through argparse's SystemExit.
    """
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return args.run(args)
    except SdcnError as exc:
        print(f"sdcn: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdcn", description="Share Stable Diffusion compute over a peer-to-peer network."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=_LOG_LEVELS,
        default="info",
        help="log messages of this level and above (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        default="text",
        help="text lines, or one JSON object per line (time, level, logger, message and "
        "fields such as job_id) for log shippers (default: %(default)s)",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add_command in (
        _add_keygen,
        _add_id,
        _add_node,
        _add_gateway,
        _add_bootstrap,
        _add_devnet,
        _add_ping,
        _add_apikey,
    ):
        add_command(commands)
    return parser


def _add_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key",
        type=Path,
        metavar="PATH",
        help=f"identity key file (default: {default_key_path()})",
    )


def _add_keygen(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "keygen",
        help="create an identity key if there is none, and print its peer id",
        description="Create an identity key (mode 0600) unless one exists; print the peer id. "
        "An existing key is never overwritten.",
    )
    _add_key_option(parser)
    parser.set_defaults(run=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    path = args.key or default_key_path()
    existed = path.exists()
    identity = load_or_create_identity(path)
    if existed:
        print(f"sdcn: kept the existing key at {path}", file=sys.stderr)
    else:
        print(f"sdcn: created a new key at {path}", file=sys.stderr)
    print(identity.peer_id)
    return 0


def _add_id(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "id",
        help="print the peer id of the identity key",
        description="Print the peer id of the identity key; fails if there is no key.",
    )
    _add_key_option(parser)
    parser.add_argument(
        "--cid", action="store_true", help="print the CIDv1 form (bafz...) instead of base58"
    )
    parser.set_defaults(run=_id)


def _id(args: argparse.Namespace) -> int:
    identity = load_or_create_identity(args.key, create=False)
    print(identity.peer_id.to_cid() if args.cid else identity.peer_id)
    return 0


def _multiaddr(text: str) -> Multiaddr:
    try:
        return Multiaddr.parse(text)
    except MultiaddrError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_peer_options(parser: argparse.ArgumentParser, *, default_listen: str | None) -> None:
    """The options every command that runs a peer takes."""
    _add_key_option(parser)
    parser.add_argument(
        "--listen",
        type=_multiaddr,
        action="append",
        metavar="MULTIADDR",
        help="address to listen on, e.g. /ip4/0.0.0.0/tcp/4001/ws (repeatable)"
        + (f"; default {default_listen}" if default_listen else "; default: none (outbound only)"),
    )
    parser.add_argument(
        "--announce",
        type=_multiaddr,
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="address other peers should dial instead of the listen addresses (repeatable)",
    )
    parser.add_argument(
        "--bootstrap",
        type=_multiaddr,
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="bootstrap peer to join through, /.../p2p/<peer id> (repeatable)",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_bind,
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    parser.add_argument(
        "--no-metrics",
        action="store_true",
        help="collect no metrics at all (a gateway's GET /metrics answers 404)",
    )
    parser.set_defaults(default_listen=default_listen)


def peer_config_from_args(args: argparse.Namespace, *, roles: tuple[str, ...] = ()) -> PeerConfig:
    """The PeerConfig a peer command runs with (also used by tests, to start peers alike)."""
    listen = args.listen or ([Multiaddr.parse(args.default_listen)] if args.default_listen else [])
    if args.metrics and args.no_metrics:
        raise ConfigError("--metrics and --no-metrics contradict each other")
    return PeerConfig(
        host=HostConfig(listen=tuple(listen), announce=tuple(args.announce), roles=roles),
        bootstrap=tuple(args.bootstrap),
        metrics=not args.no_metrics,
    )


@asynccontextmanager
async def open_peer_metrics(peer: Peer, bind: str | None) -> AsyncIterator[list[str]]:
    """Serve `peer`'s metrics on `bind` (``--metrics``) while the block runs, if it is given;
    yields the URLs served (none without `bind`)."""
    if bind is None:
        yield []
        return
    async with open_metrics_server(peer.metrics, bind) as urls:
        yield urls


def default_data_dir() -> Path:
    """Where a gateway keeps its jobs unless told (the platform's user data dir for sdcn)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("sdcn"))


def _duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``1h`` or ``2d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 90s, 30m or 1h, got {text!r}"
        ) from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"the duration must be positive, got {text!r}")
    return seconds


def _add_jobs_options(parser: argparse.ArgumentParser, *, data_dir_default: str) -> None:
    """The options of a gateway's job service."""
    group = parser.add_argument_group("jobs (the gateway's records and results)")
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help=f"where jobs and results are kept (default: {data_dir_default})",
    )
    group.add_argument(
        "--job-retention",
        type=_duration,
        default=3600.0,
        metavar="DURATION",
        help="how long finished results are kept, e.g. 30m, 1h, 2d (default 1h)",
    )
    group.add_argument(
        "--results-max-mb",
        type=int,
        default=2048,
        metavar="MB",
        help="most space results take; the oldest go first (default %(default)s)",
    )


def jobs_config_from_args(args: argparse.Namespace, *, default_dir: Path | None) -> JobsConfig:
    """The job service's configuration from ``--data-dir`` (else `default_dir`; None: a
    temporary dir), ``--job-retention`` and ``--results-max-mb``."""
    from gateway.jobservice import JobsConfig

    return JobsConfig(
        data_dir=args.data_dir or default_dir,
        retention=args.job_retention,
        results_max_mb=args.results_max_mb,
    )


def _add_access_options(parser: argparse.ArgumentParser) -> None:
    """The options of who may use a gateway, and how much."""
    group = parser.add_argument_group("clients (API keys and limits)")
    group.add_argument(
        "--api-keys",
        type=Path,
        metavar="FILE",
        help="the API keys, tiers and limits (TOML, or JSON if it ends in .json; see "
        "`sdcn apikey new`); read again on SIGHUP",
    )
    group.add_argument(
        "--require-key",
        action="store_true",
        help="serve only requests with an API key (others get 401)",
    )
    group.add_argument(
        "--no-limits",
        action="store_true",
        help="no per-client limits for anonymous and standard clients (a private gateway); "
        "by default each gets those the README names",
    )


def _add_trust_options(parser: argparse.ArgumentParser) -> None:
    """Whether a gateway checks its providers' pictures."""
    parser.add_argument(
        "--no-spot-checks",
        dest="spot_checks",
        action="store_false",
        help="run each job once and never check a provider's pictures on another provider "
        "(a private gateway whose providers you trust); `verify: true` is then answered with "
        "verified false. By default some jobs are run again, as the README's Trust section says",
    )


def access_config_from_args(args: argparse.Namespace) -> AccessConfig:
    """The gateway's keys and limits from the options (ConfigError if they cannot be used)."""
    from gateway.access import AccessConfig

    if args.require_key and args.api_keys is None:
        raise ConfigError("--require-key needs --api-keys FILE: no client could be served")
    if args.no_limits and args.api_keys is not None:
        raise ConfigError("--no-limits is for a gateway without --api-keys (set tiers there)")
    if args.api_keys is not None:
        return AccessConfig.load(args.api_keys, require_key=args.require_key)
    return AccessConfig.unlimited() if args.no_limits else AccessConfig()


async def reload_keys_on_sighup(gateway: Gateway) -> None:
    """Read the gateway's keys file again at each SIGHUP, until cancelled."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            gateway.reload_access()


def _add_apikey(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "apikey",
        help="make API keys for a gateway's clients",
        description="Make a new API key: print it (shown this once: the gateway keeps only "
        "its SHA-256) on the first line, then, unless --keys-file is given, the entry to add "
        "to the gateway's keys file; with --keys-file, add the entry there (the file is made "
        "with mode 0600 if need be). Then send the gateway SIGHUP.",
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    new = actions.add_parser("new", help="make a new key")
    new.add_argument("--name", required=True, help="what the gateway calls the key (unique)")
    new.add_argument("--keys-file", type=Path, metavar="FILE", help="add the entry to FILE")
    new.add_argument("--tier", help="its tier (default: standard; see the README)")
    new.add_argument(
        "--provider",
        metavar="PEER_ID",
        help="the peer id of a provider the key's owner runs (its work raises the key's share)",
    )
    new.set_defaults(run=_apikey_new)


def _apikey_new(args: argparse.Namespace) -> int:
    from gateway.access import add_key, key_entry, new_key

    if args.provider is not None:
        try:
            PeerId.from_string(args.provider)
        except ValueError as exc:
            raise ConfigError(f"--provider: not a peer id ({exc})") from None
    key = new_key()
    if args.keys_file is None:
        entry = key_entry(key, args.name, tier=args.tier, provider=args.provider)
        print(key)
        print(f"\n# add to the gateway's keys file, then send it SIGHUP:\n{entry}", end="")
        return 0
    add_key(args.keys_file, key, args.name, tier=args.tier, provider=args.provider)
    print(key)
    print(f"# added {args.name!r} to {args.keys_file}; send the gateway SIGHUP", file=sys.stderr)
    return 0


def _add_node(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "node",
        help="run a provider node: offer a GPU's Stable Diffusion to the network",
        description="Run a provider until interrupted: advertise what the backend can run and "
        "run jobs for the network. Without --listen the node is outbound-only: it dials the "
        "bootstrap peers and the gateways it learns of, and serves jobs over those "
        "connections. The first SIGINT/SIGTERM drains (finishes running jobs), a second stops.",
    )
    _add_peer_options(parser, default_listen=None)
    parser.add_argument(
        "--outbound-only",
        action="store_true",
        help="accept no connections even if --listen is given (behind NAT)",
    )
    parser.add_argument(
        "--backend", choices=("webui", "comfyui", "diffusers", "testcard"), required=True
    )
    webui = parser.add_argument_group("webui backend (AUTOMATIC1111, Forge, SD.Next)")
    webui.add_argument("--webui-url", metavar="URL", default="http://127.0.0.1:7860")
    webui.add_argument(
        "--webui-auth", metavar="USER:PASS", type=_user_pass, help="the webui's --api-auth"
    )
    comfy = parser.add_argument_group("comfyui backend (ComfyUI's own HTTP and WebSocket API)")
    comfy.add_argument(
        "--comfyui-url",
        metavar="URL",
        default="http://127.0.0.1:8188",
        help="ComfyUI's address, with a path behind a proxy (default: %(default)s)",
    )
    comfy.add_argument(
        "--comfyui-auth",
        metavar="USER:PASS|TOKEN",
        type=_comfyui_auth,
        default=os.environ.get("SDCN_COMFYUI_AUTH"),
        help="credentials of a proxy in front of ComfyUI: USER:PASS for HTTP Basic, else a "
        "bearer token (default: $SDCN_COMFYUI_AUTH)",
    )
    comfy.add_argument(
        "--comfyui-models-dir",
        metavar="DIR",
        type=Path,
        help="ComfyUI's models folder, if this node can read it: checkpoints and LoRAs are "
        "then advertised with their hashes",
    )
    local = parser.add_argument_group(
        "diffusers backend (runs the models itself; pip install 'sdcn-p2p[diffusers]')"
    )
    local.add_argument(
        "--models-dir",
        metavar="DIR",
        type=Path,
        help="diffusers folders and .safetensors/.ckpt checkpoints (SD 1.x, 2.x, XL)",
    )
    local.add_argument("--loras-dir", metavar="DIR", type=Path, help="LoRA .safetensors files")
    local.add_argument("--device", choices=DIFFUSERS_DEVICES, default="auto")
    local.add_argument("--dtype", choices=DIFFUSERS_DTYPES, default="auto")
    local.add_argument(
        "--vram-budget-mb",
        metavar="N",
        type=int,
        help="memory for cached pipelines (default: the GPU's total less 2 GiB)",
    )
    card = parser.add_argument_group("testcard backend (no GPU: a picture of the parameters)")
    card.add_argument("--testcard-models", metavar="A,B", type=_names, default=("testcard-v1",))
    card.add_argument("--testcard-loras", metavar="X,Y", type=_names, default=())
    card.add_argument(
        "--testcard-speed",
        metavar="IT_PER_S",
        type=float,
        help="pretend to run this many iterations per second at 512x512 (default: instant)",
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        type=_bind,
        help="also be a gateway: serve the SDCN and AUTOMATIC1111 HTTP APIs here",
    )
    _add_jobs_options(parser, data_dir_default=f"{default_data_dir()} (with --http)")
    _add_access_options(parser)
    _add_trust_options(parser)
    capacity = parser.add_argument_group("capacity")
    capacity.add_argument("--slots", type=int, default=1, help="jobs run at once (default 1)")
    capacity.add_argument(
        "--max-queue", type=int, default=8, help="jobs waiting beyond the slots (default 8)"
    )
    parser.set_defaults(run=_node)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return names


def _user_pass(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise argparse.ArgumentTypeError("expected USER:PASS")
    return user, password


def _comfyui_auth(text: str) -> tuple[str, str] | str:
    user, sep, password = text.partition(":")
    if not text or (sep and not user):
        raise argparse.ArgumentTypeError("expected USER:PASS or a bearer token")
    return (user, password) if sep else text


def node_config_from_args(args: argparse.Namespace) -> tuple[PeerConfig, ProviderConfig]:
    """The peer and provider configuration `sdcn node` runs with."""
    if args.outbound_only and args.listen:
        raise ConfigError("--outbound-only and --listen contradict each other")
    if args.slots < 1 or args.max_queue < 0:
        raise ConfigError("--slots must be at least 1 and --max-queue at least 0")
    if args.backend == "webui" and args.slots != 1:
        # Its progress and interrupt calls are global: two jobs at once would mix them up.
        raise ConfigError("a webui runs one job at a time: use --slots 1")
    if args.backend == "comfyui" and args.slots != 1:
        raise ConfigError("ComfyUI runs one prompt at a time: use --slots 1")
    if args.backend == "diffusers" and args.slots != 1:
        raise ConfigError("the diffusers backend runs one job at a time: use --slots 1")
    roles = (Role.PROVIDER, Role.GATEWAY) if args.http else (Role.PROVIDER,)
    return (
        peer_config_from_args(args, roles=roles),
        ProviderConfig(slots=args.slots, max_queue=args.max_queue, roles=roles),
    )


def open_backend_from_args(args: argparse.Namespace) -> AbstractAsyncContextManager[Backend]:
    """The backend `sdcn node --backend ...` asks for."""
    if args.backend == "webui":
        # Imported here: a test-card provider has no use for httpx.
        from sdcn_p2p.backends.webui import open_webui_backend

        return open_webui_backend(args.webui_url, auth=args.webui_auth)
    if args.backend == "comfyui":
        from sdcn_p2p.backends.comfyui import ComfyuiConfig, open_comfyui_backend

        comfyui_config = ComfyuiConfig(models_dir=args.comfyui_models_dir)
        return open_comfyui_backend(args.comfyui_url, args.comfyui_auth, config=comfyui_config)
    if args.backend == "diffusers":
        if args.models_dir is None:
            raise ConfigError("--backend diffusers needs --models-dir DIR")
        require_diffusers()
        diffusers_config = DiffusersConfig(
            models_dir=args.models_dir,
            loras_dir=args.loras_dir,
            device=args.device,
            dtype=args.dtype,
            vram_budget_mb=args.vram_budget_mb,
        )
        return open_diffusers_backend(diffusers_config)
    config = TestcardConfig(
        models=args.testcard_models, loras=args.testcard_loras, speed=args.testcard_speed
    )
    return open_testcard_backend(config)


def _node(args: argparse.Namespace) -> int:
    identity = load_or_create_identity(args.key)
    peer_config, provider_config = node_config_from_args(args)
    backend = open_backend_from_args(args)  # checks the backend options before starting
    jobs = jobs_config_from_args(args, default_dir=default_data_dir()) if args.http else None
    access = access_config_from_args(args) if args.http else None
    trio.run(
        partial(
            run_node,
            identity,
            peer_config,
            backend,
            provider_config,
            http=args.http,
            metrics=args.metrics,
            jobs=jobs,
            access=access,
            spot_checks=args.spot_checks,
        )
    )
    return 0


async def run_node(
    identity: Identity,
    peer_config: PeerConfig,
    backend: AbstractAsyncContextManager[Backend],
    provider_config: ProviderConfig,
    *,
    http: str | None = None,
    metrics: str | None = None,
    jobs: JobsConfig | None = None,
    access: AccessConfig | None = None,
    spot_checks: bool = True,
) -> None:
    """Run a provider node until signalled (what ``sdcn node`` does); with `http`, it is a
    gateway too, keeping its jobs as `jobs` says (default: in a temporary dir), serving
    clients as `access` says (default: without limits; its keys file is read again on
    SIGHUP) and checking providers' pictures unless not `spot_checks`; with `metrics`
    (``HOST:PORT``), it serves its metrics there.
    """
    async with (
        open_peer(identity, peer_config) as peer,
        open_peer_metrics(peer, metrics),
        backend as opened,
        open_provider(peer, opened, provider_config) as provider,
        AsyncExitStack() as stack,
    ):
        if http is not None:
            # Imported only here: FastAPI and pydantic cost a provider ~15 MB it does not need.
            from gateway.jobservice import JobsConfig
            from gateway.node import open_gateway
            from gateway.trust import TrustConfig

            # Jobs may run on our own provider; its advert carries the gateway role.
            gateway = await stack.enter_async_context(
                open_gateway(
                    peer,
                    http=http,
                    provider=provider,
                    jobs=jobs or JobsConfig(),
                    access=access,
                    trust=TrustConfig() if spot_checks else None,
                )
            )
        mode = "reachable" if peer.reachable else "outbound-only"
        log.info("provider %s (%s) on backend %s", peer.peer_id, mode, opened.name)
        async with trio.open_nursery() as nursery:
            if http is not None:
                nursery.start_soon(reload_keys_on_sighup, gateway)
            await run_until_signalled(provider)
            nursery.cancel_scope.cancel()


def _add_gateway(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "gateway",
        help="run a gateway: the HTTP APIs that route jobs to providers",
        description="Run a gateway until interrupted: serve the SDCN API (POST /txt2img, "
        "/img2img) and the AUTOMATIC1111-compatible API (/sdapi/v1/...) over HTTP, and send "
        "each job to the provider that will finish it soonest.",
    )
    _add_peer_options(parser, default_listen="/ip4/0.0.0.0/tcp/4002/ws")
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        type=_bind,
        default="127.0.0.1:8080",
        help="where to serve HTTP (default %(default)s)",
    )
    parser.add_argument(
        "--default-model",
        metavar="NAME",
        help="model for A1111 requests that name none (A1111's sd_model_checkpoint)",
    )
    _add_jobs_options(parser, data_dir_default=str(default_data_dir()))
    _add_access_options(parser)
    _add_trust_options(parser)
    parser.set_defaults(run=_gateway)


def _gateway(args: argparse.Namespace) -> int:
    identity = load_or_create_identity(args.key)
    config = peer_config_from_args(args, roles=(Role.GATEWAY,))
    jobs = jobs_config_from_args(args, default_dir=default_data_dir())
    access = access_config_from_args(args)
    trio.run(
        partial(
            run_gateway,
            identity,
            config,
            http=args.http,
            model=args.default_model,
            metrics=args.metrics,
            jobs=jobs,
            access=access,
            spot_checks=args.spot_checks,
        )
    )
    return 0


async def run_gateway(
    identity: Identity,
    config: PeerConfig,
    *,
    http: str,
    model: str | None = None,
    metrics: str | None = None,
    jobs: JobsConfig | None = None,
    access: AccessConfig | None = None,
    spot_checks: bool = True,
) -> None:
    """Run a gateway until interrupted (what ``sdcn gateway`` does), keeping its jobs as
    `jobs` says (default: in a temporary dir), serving clients as `access` says (default:
    the public limits; its keys file is read again on SIGHUP) and checking providers'
    pictures unless not `spot_checks`; with `metrics` (``HOST:PORT``), it serves its metrics
    there too, beside ``GET /metrics`` on `http`."""
    from gateway.access import AccessConfig
    from gateway.jobservice import JobsConfig
    from gateway.node import open_gateway
    from gateway.trust import TrustConfig

    async with (
        open_peer(identity, config) as peer,
        open_peer_metrics(peer, metrics),
        open_gateway(
            peer,
            http=http,
            default_model=model,
            jobs=jobs or JobsConfig(),
            access=access or AccessConfig(),
            trust=TrustConfig() if spot_checks else None,
        ) as gateway,
    ):
        await reload_keys_on_sighup(gateway)


def _add_devnet(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "devnet",
        help="run a whole network on this machine: bootstrap, test-card providers, gateway",
        description="Run a bootstrap peer, N test-card providers and a gateway in one process "
        "on loopback (real WebSockets), and print the gateway URL. With --demo, send "
        "examples/params-txt2img.json through the gateway, write the image and exit.",
    )
    parser.add_argument("--providers", type=int, default=3, help="providers (default 3)")
    parser.add_argument(
        "--http", metavar="HOST:PORT", type=_bind, default="127.0.0.1:8080", help="gateway HTTP"
    )
    parser.add_argument("--demo", metavar="OUT.png", type=Path, help="make one image and exit")
    _add_jobs_options(parser, data_dir_default="a temporary dir, deleted on exit")
    parser.set_defaults(run=_devnet)


def _devnet(args: argparse.Namespace) -> int:
    jobs = jobs_config_from_args(args, default_dir=None)
    trio.run(
        partial(run_devnet, providers=args.providers, http=args.http, demo=args.demo, jobs=jobs)
    )
    return 0


async def run_devnet(
    *, providers: int, http: str, demo: Path | None, jobs: JobsConfig | None = None
) -> None:
    """Run the devnet until interrupted, or make the demo image and stop; its gateway keeps
    jobs as `jobs` says (default: in a temporary dir)."""
    from sdcn_p2p.devnet import demo_params, describe, open_devnet, run_demo

    params = demo_params() if demo is not None else None
    async with open_devnet(providers=providers, http=http, jobs=jobs) as devnet:
        if params is not None and demo is not None:
            for path in await run_demo(devnet.url, demo, params):
                print(path)
            return
        print(describe(devnet), flush=True)
        await trio.sleep_forever()


def _add_bootstrap(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bootstrap",
        help="run a bootstrap peer: a DHT server that relays gossip",
        description="Run a bootstrap peer until interrupted: a DHT server that relays advert "
        "gossip, with an optional HTTP status API (GET /v1/network).",
    )
    _add_peer_options(parser, default_listen="/ip4/0.0.0.0/tcp/4001/ws")
    parser.add_argument(
        "--http", metavar="HOST:PORT", type=_bind, help="serve GET /v1/network on this address"
    )
    parser.set_defaults(run=_bootstrap)


def _bind(text: str) -> str:
    try:
        return parse_bind(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bootstrap(args: argparse.Namespace) -> int:
    from bootstrap.node import run_bootstrap

    identity = load_or_create_identity(args.key)
    config = peer_config_from_args(args)
    trio.run(partial(run_bootstrap, identity, config, http=args.http, metrics=args.metrics))
    return 0


def _add_ping(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "ping",
        help="dial a peer and print round-trip times",
        description="Dial MULTIADDR (with /p2p/<peer id> to check who answers) with a fresh "
        "identity and ping it over /ipfs/ping/1.0.0: any libp2p peer listening on /ws or /wss "
        "answers, not only SDCN peers.",
    )
    parser.add_argument("target", type=_multiaddr, metavar="MULTIADDR")
    parser.add_argument("--count", "-c", type=int, default=4, help="pings to send (default 4)")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between pings (default 1)"
    )
    parser.set_defaults(run=_ping)


def _ping(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise ConfigError("--count must be at least 1")
    rtts = trio.run(ping_peer, args.target, args.count, args.interval)
    ms = [rtt * 1000 for rtt in rtts]
    print(
        f"{len(ms)} pings: min {min(ms):.2f} ms, avg {sum(ms) / len(ms):.2f} ms, "
        f"max {max(ms):.2f} ms"
    )
    return 0


async def ping_peer(target: Multiaddr, count: int, interval: float) -> list[float]:
    """Dial `target` with a throwaway identity and ping it `count` times; print each RTT."""
    async with open_host(Identity.generate()) as host:
        conn = await host.connect(target)
        print(f"connected to {conn.peer_id} at {conn.remote_addr}")
        rtts = []
        for seq in range(1, count + 1):
            if seq > 1:
                await trio.sleep(interval)
            rtt = await host.ping(conn.peer_id)
            rtts.append(rtt)
            print(f"seq={seq} rtt={rtt * 1000:.2f} ms")
        return rtts


if __name__ == "__main__":
    raise SystemExit(main())
