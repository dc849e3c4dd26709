"""Who is asking: the keys file, API keys, anonymous clients by address, `sdcn apikey new`."""

from __future__ import annotations

import hmac
import json
import stat
from pathlib import Path

import pytest

from gateway.access import (
    KEY_PREFIX,
    AccessConfig,
    add_key,
    address_client_id,
    hash_key,
    new_key,
)
from gateway.errors import Unauthorized
from gateway.limits import Limits, Reason
from sdcn_p2p.cli import main
from sdcn_p2p.errors import ConfigError
from sdcn_p2p.identity import Identity

PROVIDER = str(Identity.from_seed(bytes(32)).peer_id)
KEYS = f"""
[tiers.friends]
weight = 2
limits = {{ max_in_flight = 8 }}

[[keys]]
name = "alice"
sha256 = "{hash_key("sdcn_alice")}"
tier = "friends"
provider = "{PROVIDER}"

[[keys]]
name = "bob"
sha256 = "{hash_key("sdcn_bob")}"
limits = {{ max_waiting = "unlimited" }}
"""


def test_keys_file_gives_each_key_its_tier_limits_and_providers(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    access = AccessConfig.load(path)
    alice = access.identify("Bearer sdcn_alice", "192.0.2.7")
    assert (alice.id, alice.key, alice.tier, alice.weight) == ("key:alice", "alice", "friends", 2)
    assert alice.limits == Limits(max_in_flight=8) and alice.providers == {PROVIDER}
    bob = access.identify("bearer  sdcn_bob ", None)
    assert bob.tier == "standard" and bob.limits.max_waiting == float("inf")
    anonymous = access.identify(None, "192.0.2.7")
    assert (anonymous.id, anonymous.key, anonymous.limits) == ("ip:192.0.2.7", None, Limits())


def test_the_same_keys_as_json(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "carol", "sha256": hash_key("k")}]}))
    assert AccessConfig.load(path).identify("Bearer k", None).key == "carol"


def test_anonymous_clients_are_their_address_ipv6_by_its_64() -> None:
    assert address_client_id("2001:db8:1:2:aaaa::1") == "ip:2001:db8:1:2::/64"
    assert address_client_id("2001:db8:1:2:bbbb::9") == "ip:2001:db8:1:2::/64"
    assert address_client_id("::ffff:192.0.2.1") == "ip:192.0.2.1"
    assert address_client_id("198.51.100.4") == "ip:198.51.100.4"
    assert address_client_id(None) == "ip:unknown"


def test_a_bad_key_or_no_key_where_one_is_required_is_unauthorized(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    access = AccessConfig.load(path, require_key=True)
    for header, reason in [
        (None, Reason.NO_KEY),
        ("", Reason.NO_KEY),
        ("Bearer sdcn_mallory", Reason.BAD_KEY),
        ("Basic YWxpY2U6cHc=", Reason.BAD_KEY),
        ("Bearer", Reason.BAD_KEY),
    ]:
        with pytest.raises(Unauthorized) as refused:
            access.identify(header, "192.0.2.1")
        assert refused.value.reason == reason
        assert "sdcn_mallory" not in refused.value.message


def test_keys_are_compared_in_constant_time_against_every_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    access = AccessConfig.load(path)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert access.find("sdcn_alice") is access.keys[0]  # the first matches: both compared
    assert len(calls) == 2
    assert access.find("sdcn_nobody") is None and len(calls) == 4


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("keys = 3", "keys: must be a list"),
        ("[[keys]]\nname = 'x'\nsha256 = 'abc'", "sha256: must be 64 hex digits"),
        (f"[[keys]]\nname = 'x'\nsha256 = '{hash_key('a')}'\ntier = 'gold'", "no tier 'gold'"),
        (f"[[keys]]\nname = 'x'\nsha256 = '{hash_key('a')}'\nprovider = 'nope'", "not a peer id"),
        (f"[[keys]]\nname = 'x'\nsha256 = '{hash_key('a')}'\ncolour = 1", "unknown field"),
        (f"[[keys]]\nname = 'x'\nsha256 = '{hash_key('a')}'\nlimits = {{ speed = 1 }}", "speed"),
        (
            f"[[keys]]\nname = 'x'\nsha256 = '{hash_key('a')}'\n"
            f"[[keys]]\nname = 'x'\nsha256 = '{hash_key('b')}'",
            "used twice",
        ),
        ("[tiers.x]\nweight = 0", "weight: must be a number"),
        ("[extra]", "unknown section"),
        ("keys = [", "not valid TOML"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        AccessConfig.load(path)


def test_reload_reads_the_file_again(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    access = AccessConfig.load(path, require_key=True)
    add_key(path, "sdcn_dave", "dave")
    reloaded = access.reload()
    assert reloaded.identify("Bearer sdcn_dave", None).key == "dave" and reloaded.require_key
    path.write_text("keys = [")
    with pytest.raises(ConfigError):
        access.reload()


def test_new_keys_are_long_random_and_recognisable() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100 and all(k.startswith(KEY_PREFIX) and len(k) > 40 for k in keys)


def test_add_key_makes_a_0600_file_and_refuses_a_name_used_already(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    add_key(path, "sdcn_one", "one", tier="priority", provider=PROVIDER)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_text()
    with pytest.raises(ConfigError, match="used twice"):
        add_key(path, "sdcn_two", "one")
    with pytest.raises(ConfigError, match="no tier"):
        add_key(path, "sdcn_two", "two", tier="gold")
    assert path.read_text() == before
    one = AccessConfig.load(path).identify("Bearer sdcn_one", None)
    assert one.tier == "priority" and one.providers == {PROVIDER}
    json_path = tmp_path / "keys.json"
    add_key(json_path, "sdcn_a", "a")
    add_key(json_path, "sdcn_b", "b")
    assert [k.name for k in AccessConfig.load(json_path).keys] == ["a", "b"]


def test_apikey_new_prints_the_key_first_then_the_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["apikey", "new", "--name", "erin", "--provider", PROVIDER]) == 0
    key, *entry = capsys.readouterr().out.splitlines()
    assert key.startswith(KEY_PREFIX)
    assert f'sha256 = "{hash_key(key)}"' in entry and f'provider = "{PROVIDER}"' in entry
    path = tmp_path / "keys.toml"
    assert main(["apikey", "new", "--name", "erin", "--keys-file", str(path)]) == 0
    out, err = capsys.readouterr()
    assert AccessConfig.load(path).identify(f"Bearer {out.strip()}", None).key == "erin"
    assert "erin" in err and out.count("\n") == 1
    assert main(["apikey", "new", "--name", "erin", "--keys-file", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "used twice" in err
