"""Who is asking: API keys, tiers, and anonymous clients by address (pure but for reading the
keys file).

A request carries ``Authorization: Bearer <key>`` or nothing. Without a key, the client is
its address: an IPv4 address, or the /64 an IPv6 address is in (one host holds a whole /64).
With one, the client is the key: its SHA-256 is looked up among the keys file's entries, each
compared with `hmac.compare_digest` (every entry, so the time taken says nothing of which
matched). Keys themselves are never stored, logged, or shown again after `new_key`.

The keys file (``--api-keys FILE``, TOML, or JSON of the same shape) is the operator's::

    [tiers.priority]             # optional; built in: anonymous, standard (weight 1),
    weight = 4                   #   priority (weight 4)
    limits = { max_in_flight = 8, megapixel_steps_per_minute = 1200 }

    [[keys]]
    name = "alice"               # unique: what /v1/account and the logs call the key
    sha256 = "9f86d08..."        # hex SHA-256 of the key (`sdcn apikey new` prints it)
    tier = "priority"            # optional, default "standard"
    provider = "12D3KooW..."     # optional: the peer id of a provider this key's owner runs
    limits = { max_waiting = 500 }  # optional: over the tier's limits

Limit names and meanings are `gateway.limits.Limits`' fields; ``"unlimited"`` is no limit.
`AccessConfig.load` reads it and raises ConfigError naming what is wrong (a reload that
fails keeps the keys already loaded).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import Unauthorized
from gateway.limits import ANONYMOUS_WEIGHT, Client, Limits, Reason
from sdcn_p2p.errors import ConfigError
from sdcn_p2p.identity import PeerId

__all__ = [
    "BUILTIN_TIERS",
    "KEY_PREFIX",
    "AccessConfig",
    "ApiKey",
    "Tier",
    "add_key",
    "address_client_id",
    "hash_key",
    "key_entry",
    "new_key",
]

#: What every key `new_key` makes starts with (so a leaked one is easy to recognise).
KEY_PREFIX = "sdcn_"
_ANONYMOUS = "anonymous"
_STANDARD = "standard"


@dataclass(frozen=True, slots=True)
class Tier:
    """A class of clients: its `weight` in the fair share and its `limits`."""

    name: str
    weight: float = 1.0
    limits: Limits = field(default_factory=Limits)


#: The tiers every gateway knows; a keys file may redefine them or add others.
BUILTIN_TIERS = {
    _ANONYMOUS: Tier(_ANONYMOUS, ANONYMOUS_WEIGHT),
    _STANDARD: Tier(_STANDARD),
    "priority": Tier(
        "priority",
        4.0,
        Limits(
            requests_per_second=20,
            request_burst=80,
            max_in_flight=16,
            max_waiting=1000,
            megapixel_steps_per_minute=1200,
        ),
    ),
}


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One entry of the keys file."""

    name: str
    sha256: bytes
    tier: Tier
    limits: Limits
    providers: frozenset[str] = frozenset()


def new_key() -> str:
    """A new API key: KEY_PREFIX and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 of `key`, as the keys file holds it."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_entry(key: str, name: str, *, tier: str | None = None, provider: str | None = None) -> str:
    """The keys file entry (TOML) for `key`."""
    lines = ["[[keys]]"]
    lines += [
        f"{field} = {json.dumps(value)}" for field, value in _fields(key, name, tier, provider)
    ]
    return "\n".join(lines) + "\n"


def _fields(key: str, name: str, tier: str | None, provider: str | None) -> list[tuple[str, str]]:
    fields = [("name", name), ("sha256", hash_key(key))]
    fields += [(field, value) for field, value in (("tier", tier), ("provider", provider)) if value]
    return fields


def add_key(
    path: Path, key: str, name: str, *, tier: str | None = None, provider: str | None = None
) -> None:
    """Add `key`'s entry to the keys file at `path` (made with mode 0600 if there is none),
    checked first as the gateway would read the result: ConfigError, and the file left as it
    was, if it would not load (a name used already, an unknown tier, a bad peer id)."""
    try:
        old = path.read_text(encoding="utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"keys file {path}: cannot read it ({exc})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(old) if old.strip() else {}
        except ValueError as exc:
            raise ConfigError(f"keys file {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.setdefault("keys", []), list):
            raise ConfigError(f"keys file {path}: must be an object with a list of keys")
        data["keys"].append(
            tomllib.loads(key_entry(key, name, tier=tier, provider=provider))["keys"][0]
        )
        text, append = json.dumps(data, indent=2) + "\n", False
    else:
        gap = "" if not old else "\n" if old.endswith("\n") else "\n\n"
        added = gap + key_entry(key, name, tier=tier, provider=provider)
        text, append = old + added, True
    try:
        AccessConfig.from_mapping(json.loads(text) if not append else tomllib.loads(text))
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"keys file {path}: the new key would not load: {exc}") from None
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(added if append else text)
    except OSError as exc:
        raise ConfigError(f"keys file {path}: cannot write it ({exc})") from None


def address_client_id(address: str | None) -> str:
    """The id of an anonymous client at `address`: ``ip:A.B.C.D``, or ``ip:PREFIX/64``."""
    if not address:
        return "ip:unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"ip:{address[:64]}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ip:{ip.ipv4_mapped}"
        return f"ip:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"ip:{ip}"


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """The keys and tiers a gateway knows, and whether anonymous clients are served."""

    keys: tuple[ApiKey, ...] = ()
    tiers: dict[str, Tier] = field(default_factory=lambda: dict(BUILTIN_TIERS))
    #: Anonymous requests get 401 (``--require-key``).
    require_key: bool = False
    #: Where `keys` came from, for reloads (None: no file).
    path: Path | None = None

    @classmethod
    def load(cls, path: Path, *, require_key: bool = False) -> AccessConfig:
        """Read the keys file at `path` (TOML, or JSON if it ends in .json); ConfigError
        naming the problem if it cannot be used."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"keys file {path}: cannot read it ({exc})") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except ValueError as exc:  # JSONDecodeError, TOMLDecodeError
            raise ConfigError(f"keys file {path}: not valid {_format(path)} ({exc})") from None
        try:
            return cls.from_mapping(data, require_key=require_key, path=path)
        except ConfigError as exc:
            raise ConfigError(f"keys file {path}: {exc}") from None

    @classmethod
    def from_mapping(
        cls, data: Any, *, require_key: bool = False, path: Path | None = None
    ) -> AccessConfig:
        """The config `data` (the keys file, parsed) describes; ConfigError if it is bad."""
        if not isinstance(data, dict):
            raise ConfigError("must be a table of keys and tiers")
        unknown = sorted(set(data) - {"keys", "tiers"})
        if unknown:
            raise ConfigError(f"unknown section {unknown[0]!r} (known: keys, tiers)")
        tiers = dict(BUILTIN_TIERS)
        raw_tiers = data.get("tiers", {})
        if not isinstance(raw_tiers, dict):
            raise ConfigError("tiers: must be a table of tiers by name")
        for name, raw in raw_tiers.items():
            tiers[name] = _tier(name, raw, tiers.get(name))
        keys: list[ApiKey] = []
        names: set[str] = set()
        hashes: set[bytes] = set()
        raw_keys = data.get("keys", [])
        if not isinstance(raw_keys, list):
            raise ConfigError("keys: must be a list of [[keys]] entries")
        for index, raw in enumerate(raw_keys):
            key = _key(index, raw, tiers)
            if key.name in names:
                raise ConfigError(f"keys[{index}]: the name {key.name!r} is used twice")
            if key.sha256 in hashes:
                raise ConfigError(f"keys[{index}] ({key.name}): the same key as an earlier one")
            names.add(key.name)
            hashes.add(key.sha256)
            keys.append(key)
        return cls(tuple(keys), tiers, require_key, path)

    @classmethod
    def unlimited(cls) -> AccessConfig:
        """Everyone served without limits (a private gateway, tests): the built-in tiers
        with no limits."""
        unlimited = Limits.unlimited()
        tiers = {name: Tier(name, tier.weight, unlimited) for name, tier in BUILTIN_TIERS.items()}
        return cls(tiers=tiers)

    def reload(self) -> AccessConfig:
        """The config read again from `path` (ConfigError if it cannot be used)."""
        if self.path is None:
            return self
        return AccessConfig.load(self.path, require_key=self.require_key)

    def find(self, key: str) -> ApiKey | None:
        """The entry of `key`, or None. Compares the key's hash with every entry's in
        constant time and without stopping at a match."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for entry in self.keys:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found

    def identify(self, authorization: str | None, address: str | None) -> Client:
        """The client an ``Authorization`` header (or its absence) and the peer's address
        make. Raises Unauthorized for a key the gateway does not know, a header that is not
        a bearer key, or no key where one is required."""
        if authorization is None or not authorization.strip():
            if self.require_key:
                raise Unauthorized(
                    "this gateway serves only clients with an API key "
                    "(Authorization: Bearer <key>)",
                    Reason.NO_KEY,
                )
            tier = self.tiers[_ANONYMOUS]
            return Client(address_client_id(address), tier.limits, tier.weight, tier=tier.name)
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <key>'", Reason.BAD_KEY)
        entry = self.find(key.strip())
        if entry is None:
            raise Unauthorized("unknown API key", Reason.BAD_KEY)
        return Client(
            f"key:{entry.name}",
            entry.limits,
            entry.tier.weight,
            key=entry.name,
            tier=entry.tier.name,
            providers=entry.providers,
        )


def _format(path: Path) -> str:
    return "JSON" if path.suffix == ".json" else "TOML"


def _tier(name: str, raw: Any, base: Tier | None) -> Tier:
    where = f"tiers.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table (weight, limits)")
    unknown = sorted(set(raw) - {"weight", "limits"})
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: weight, limits)")
    weight = raw.get("weight", base.weight if base else 1.0)
    if (
        not isinstance(weight, int | float)
        or isinstance(weight, bool)
        or not math.isfinite(weight)
        or not 0.01 <= weight <= 1000
    ):
        raise ConfigError(f"{where}.weight: must be a number from 0.01 to 1000")
    limits = _limits(where, raw.get("limits", {}), base.limits if base else Limits())
    return Tier(name, float(weight), limits)


def _key(index: int, raw: Any, tiers: dict[str, Tier]) -> ApiKey:
    where = f"keys[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table (name, sha256, ...)")
    known = {"name", "sha256", "tier", "provider", "providers", "limits"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(known)})")
    name = raw.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
        raise ConfigError(f"{where}.name: must be 1 to 64 printable characters")
    where = f"{where} ({name})"
    digest = raw.get("sha256")
    try:
        sha256 = bytes.fromhex(digest) if isinstance(digest, str) else b""
    except ValueError:
        sha256 = b""
    if len(sha256) != 32:
        raise ConfigError(f"{where}.sha256: must be 64 hex digits (the key's SHA-256)")
    tier_name = raw.get("tier", _STANDARD)
    tier = tiers.get(tier_name) if isinstance(tier_name, str) else None
    if tier is None:
        raise ConfigError(f"{where}.tier: no tier {tier_name!r} (known: {', '.join(tiers)})")
    providers = raw.get("providers", [])
    if "provider" in raw:
        providers = [raw["provider"], *providers]
    if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
        raise ConfigError(f"{where}.provider: must be a peer id (or providers: a list of them)")
    for provider in providers:
        try:
            PeerId.from_string(provider)
        except ValueError as exc:
            raise ConfigError(f"{where}.provider: {provider!r} is not a peer id ({exc})") from None
    limits = _limits(f"{where}.limits", raw.get("limits", {}), tier.limits)
    return ApiKey(name, sha256, tier, limits, frozenset(providers))


def _limits(where: str, raw: Any, base: Limits) -> Limits:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table of limits")
    try:
        return Limits.from_mapping(raw, base=base)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
