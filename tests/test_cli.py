from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sdcn_p2p.cli import main
from sdcn_p2p.identity import PeerId, default_key_path, load_or_create_identity


@pytest.fixture
def key_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default key path, redirected into tmp_path (XDG on Linux, HOME elsewhere)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = default_key_path()
    assert path.is_relative_to(tmp_path)
    return path


def test_keygen_creates_a_0600_key_and_prints_its_peer_id(key_path: Path, capsys) -> None:
    assert main(["keygen"]) == 0
    out, err = capsys.readouterr()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert PeerId.from_string(out.strip()) == load_or_create_identity(key_path).peer_id
    assert "created" in err


def test_keygen_twice_keeps_the_key(key_path: Path, capsys) -> None:
    assert main(["keygen"]) == 0
    first = capsys.readouterr().out
    pem = key_path.read_bytes()
    assert main(["keygen"]) == 0
    out, err = capsys.readouterr()
    assert out == first
    assert key_path.read_bytes() == pem
    assert f"kept the existing key at {key_path}" in err


def test_keygen_does_not_overwrite_a_corrupt_key(key_path: Path, capsys) -> None:
    key_path.parent.mkdir(parents=True)
    key_path.write_bytes(b"not a key")
    assert main(["keygen"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"sdcn: error: bad key file {key_path}")
    assert key_path.read_bytes() == b"not a key"


def test_keygen_and_id_with_explicit_key_path(tmp_path: Path, capsys) -> None:
    path = tmp_path / "keys" / "node.key"
    assert main(["keygen", "--key", str(path)]) == 0
    created = capsys.readouterr().out
    assert main(["id", "--key", str(path)]) == 0
    assert capsys.readouterr().out == created


def test_id_prints_the_peer_id_and_cid(key_path: Path, capsys) -> None:
    peer_id = load_or_create_identity(key_path).peer_id
    assert main(["id"]) == 0
    assert capsys.readouterr().out == f"{peer_id}\n"
    assert main(["id", "--cid"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bafz")
    assert PeerId.from_string(out.strip()) == peer_id


def test_id_without_a_key_fails_cleanly(key_path: Path, capsys) -> None:
    assert main(["id"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"sdcn: error: no key file at {key_path} (run `sdcn keygen` first)\n"
    assert not key_path.exists()


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--version"])
    assert exc_info.value.code == 0
    assert capsys.readouterr().out.startswith("sdcn ")


@pytest.mark.parametrize(
    "argv", [[], ["frobnicate"], ["--log-level", "loud", "id"], ["id", "--bogus"]]
)
def test_usage_errors_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    assert exc_info.value.code == 2
    assert "usage: sdcn" in capsys.readouterr().err


def test_log_level_is_case_insensitive(key_path: Path) -> None:
    assert main(["--log-level", "DEBUG", "keygen"]) == 0


def test_module_runs_as_a_script(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}

    def sdcn(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sdcn_p2p.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )

    missing = sdcn("id", "--key", str(path))
    assert missing.returncode == 1
    assert missing.stderr.startswith("sdcn: error: no key file")
    assert "Traceback" not in missing.stderr

    created = sdcn("keygen", "--key", str(path))
    assert created.returncode == 0
    assert PeerId.from_string(created.stdout.strip()) == load_or_create_identity(path).peer_id
