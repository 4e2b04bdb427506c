"""The worker stays small: stdlib + msgspec + msbd.model/errors/contract/network/peer; ctypes
only in krun.py; and what it loads to start is kept to what a launch needs."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec
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


# Modules a worker's start must not load: each costs milliseconds of every launch
# (a burst of launches is bound by that CPU) and nothing on a launch's path needs it.
# argparse: only a worker run by hand has arguments (imported then); dataclasses
# pulls in inspect, ast, dis and tokenize; tempfile pulls in shutil, random, bz2
# and lzma; msgspec would import typing_extensions, and inspect with it, if it
# could (`python -m msbd.vm` blocks it before msgspec is first imported; importtime
# still lists the refused attempt, so inspect is what shows a block too late); the
# rest are big and unused.
NOT_AT_START = ("argparse", "gettext", "dataclasses", "inspect", "ast", "dis", "tokenize",
                "tempfile", "shutil", "random", "bz2", "lzma", "pathlib",
                "logging", "json", "subprocess", "asyncio", "concurrent", "email", "http",
                "urllib", "zipfile", "importlib.metadata", "locale")
_IMPORTED = re.compile(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)")


def worker_start_imports() -> set[str]:
    """Every module `python -m msbd.vm` imports before it can act on anything, as
    `-X importtime` lists them: the real entry point, without site (`-S`, with msbd
    and msgspec on PYTHONPATH), so nothing an installation's .pth files load hides a
    module the worker imports itself. Without its fds the worker then exits with 2."""
    roots = {str(REPO), str(Path(msgspec.__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-S", "-X", "importtime", "-m", "msbd.vm"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", ""),
                               "PYTHONPATH": os.pathsep.join(sorted(roots))})
    assert done.returncode == 2, done.stderr  # fd 98 missing: a failed check, after imports
    found = {m.group(1) for m in map(_IMPORTED.match, done.stderr.splitlines()) if m}
    assert {"msbd.vm.main", "msgspec", "ctypes"} <= found, "importtime listed nothing"
    return found


def test_worker_start_loads_nothing_it_does_not_need() -> None:
    loaded = worker_start_imports()
    heavy = sorted(m for m in loaded for n in NOT_AT_START if m == n or m.startswith(n + "."))
    assert not heavy, f"python -m msbd.vm loads {heavy} at start"


def test_a_worker_run_by_hand_still_parses_its_arguments() -> None:
    """argparse is imported when there are arguments: --help works and says so."""
    done = subprocess.run([sys.executable, "-m", "msbd.vm", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    assert "--spec-file" in done.stdout
