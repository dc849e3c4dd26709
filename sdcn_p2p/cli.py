"""The ``sdcn`` command.

Each subcommand is an ``_add_<name>`` function that declares its arguments and sets
``run`` to the function that carries it out; `build_parser` lists them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sdcn_p2p._version import __version__
from sdcn_p2p.errors import SdcnError
from sdcn_p2p.identity import default_key_path, load_or_create_identity

__all__ = ["build_parser", "main"]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOG_LEVELS = ("debug", "info", "warning", "error")


def main(argv: list[str] | None = None) -> int:
    """Run the ``sdcn`` command line (`argv` defaults to ``sys.argv[1:]``); return the exit code.

    Usage errors, ``--help`` and ``--version`` exit through argparse's SystemExit.
    """
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return args.run(args)
    except SdcnError as exc:
        print(f"sdcn: error: {exc}", file=sys.stderr)
        return 1


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
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add_command in (_add_keygen, _add_id):
        add_command(commands)
    return parser


def _configure_logging(level: str) -> None:
    """Log to stderr at `level` (a name such as ``"info"``), unless logging is set up already."""
    logging.basicConfig(level=level.upper(), format=_LOG_FORMAT)


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


if __name__ == "__main__":
    raise SystemExit(main())
