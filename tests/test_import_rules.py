"""The direction of imports between our packages, checked statically.

clients -> nothing of ours; tuners_store -> nothing of ours (and never torch);
restuning -> tuners_store (and clients from its CLI adapter only, for ``train --push``);
server -> restuning, tuners_store.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"clients", "tuners_store", "restuning", "server"}
ALLOWED: dict[str, set[str]] = {
    "clients": set(),
    "tuners_store": set(),
    "restuning": {"tuners_store"},
    "server": {"restuning", "tuners_store"},
}
# module path (relative to ROOT) -> extra packages it may import
EXCEPTIONS: dict[str, set[str]] = {"restuning/cli.py": {"clients"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED[package] | {package} | EXCEPTIONS.get(rel, set())
        bad = imported_packages(path) - allowed
        if bad:
            offenders.append(f"{rel} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_tuners_store_never_imports_torch() -> None:
    code = (
        "import sys, tuners_store, tuners_store.config\n"
        "import importlib, pkgutil\n"
        "for m in pkgutil.walk_packages(tuners_store.__path__, 'tuners_store.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
