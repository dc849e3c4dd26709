"""The layers stay layers: the import-linter contracts in pyproject.toml hold.

The contracts say that the pure cores (wire/, the DHT's and gossip's state, the job schema)
import no I/O library and never reach the network stack, that protocols do not import the
Host, that the library never imports the gateway or bootstrap roles (but for the CLI and
devnet, which compose everything), and that no modules or packages import each other in a
cycle. `lint-imports` runs the same check from the command line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sdcn_p2p", "gateway", "bootstrap")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter over the packages under `root`, with `root`'s pyproject.toml."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports;"
            " sys.exit(lint_imports(no_cache=True, no_logo=True))",
        ],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contracts_hold() -> None:
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("sdcn_p2p/wire/yamux.py", "import trio", "import no I/O library"),
        ("sdcn_p2p/dht/routing.py", "import sdcn_p2p.host", "never reach the network stack"),
        ("sdcn_p2p/adverts.py", "import gateway.node", "never imports the gateway"),
        ("sdcn_p2p/identity.py", "import sdcn_p2p.records", "No import cycles"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # the forbidden import\n")
    run = lint_imports(tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    report = " ".join(run.stdout.split("Broken contracts", 1)[1].split())
    # The report names the contract and the import that broke it.
    assert contract in report and f"{Path(module).stem} ->" in report, run.stdout
