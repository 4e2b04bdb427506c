"""The worker stays small: stdlib + msgspec + msbd.model/errors/contract/network/peer; ctypes
only in krun.py."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from workerproc import REPO

VM = REPO / "msbd" / "vm"
ALLOWED_MSBD = {"msbd", "msbd.model", "msbd.errors", "msbd.contract", "msbd.network",
                "msbd.peer"}  # peer: stdlib only
FORBIDDEN = ("anyio", "uvloop", "aiosqlite", "sqlite3", "asyncio", "msbd.rpc", "msbd.db",
             "msbd.daemon", "msbd.config")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(VM.glob("*.py")), ids=lambda p: p.name)
def test_module_imports(path: Path) -> None:
    for name in imported(path):
        top = name.split(".")[0]
        if top == "msbd":
            assert name in ALLOWED_MSBD or name.startswith("msbd.vm"), f"{path.name}: {name}"
        else:
            assert top in sys.stdlib_module_names or top == "msgspec", f"{path.name}: {name}"
        assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
        if top == "ctypes":
            assert path.name == "krun.py", f"{path.name} uses ctypes"


def test_running_worker_loads_nothing_forbidden() -> None:
    code = ("import sys, json, msbd.vm.main, msbd.vm.doctor; "
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    loaded = json.loads(out)
    assert not [m for m in loaded if m.startswith(FORBIDDEN)]
