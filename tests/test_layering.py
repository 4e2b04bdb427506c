"""The import layering of docs/design.md, enforced: imports flow one way, each foreign
library is touched by the one module that owns it, and every module is small and opens by
saying its job."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "msbd"

# Which msbd modules each part may import (prefix match on dotted names).
ALLOWED: dict[str, tuple[str, ...]] = {
    "msbd.errors": (),
    # The daemon<->worker contract: both sides import it, it imports nothing of ours.
    "msbd.contract": (),
    "msbd.cmdline": ("msbd.errors",),
    "msbd.network": ("msbd.errors",),
    "msbd.model": ("msbd.errors", "msbd.cmdline", "msbd.network"),
    "msbd.config": ("msbd.errors",),
    # The sandbox state table: the law the store applies and the daemon asks.
    "msbd.states": ("msbd.model", "msbd.errors", "msbd.contract"),
    "msbd.log": (),
    "msbd.peer": (),  # stdlib only: the worker reads its control channel's peer with it
    "msbd.rpc": ("msbd.rpc", "msbd.model", "msbd.network", "msbd.errors", "msbd.config",
                 "msbd.log", "msbd.contract", "msbd.peer"),
    # Inside rpc, the server's modules import downward only:
    # server -> protocol -> calls -> {state, flow, framing, limits} -> handler -> codec.
    "msbd.rpc.framing": ("msbd.errors",),
    "msbd.rpc.limits": (),
    "msbd.rpc.flow": (),
    "msbd.rpc.handler": ("msbd.rpc.codec", "msbd.model", "msbd.errors", "msbd.peer"),
    "msbd.rpc.state": ("msbd.rpc.handler", "msbd.rpc.limits"),
    "msbd.rpc.protocol": ("msbd.rpc.calls", "msbd.rpc.codec", "msbd.rpc.flow",
                          "msbd.rpc.framing", "msbd.rpc.handler", "msbd.rpc.limits",
                          "msbd.rpc.state", "msbd.peer"),
    "msbd.rpc.calls": ("msbd.rpc.codec", "msbd.rpc.handler", "msbd.rpc.limits",
                       "msbd.rpc.state"),
    "msbd.rpc.replies": ("msbd.rpc.codec", "msbd.errors"),
    "msbd.db": ("msbd.db", "msbd.model", "msbd.network", "msbd.errors", "msbd.config",
                "msbd.log", "msbd.states"),
    "msbd.daemon": ("msbd.daemon", "msbd.rpc", "msbd.db", "msbd.model", "msbd.network",
                    "msbd.errors", "msbd.config", "msbd.log", "msbd.contract", "msbd.states",
                    "msbd.peer", "msbd"),
    # msbd.cmdline only through msbd.model (the checks of a launch spec).
    "msbd.vm": ("msbd.vm", "msbd.model", "msbd.network", "msbd.errors", "msbd.contract",
                "msbd.peer"),
    "msbd.ctl": ("msbd.model", "msbd.network", "msbd.errors", "msbd.rpc.client",
                 "msbd.rpc.codec", "msbd.rpc.methods", "msbd.ctlfmt", "msbd.ctlspec", "msbd"),
    "msbd.ctlfmt": ("msbd.contract",),
    "msbd.ctlspec": ("msbd.model", "msbd.network", "msbd.errors"),
    # `msbd doctor` asks the daemon (msbd.rpc.client), else finds the tree itself.
    "msbd.cli": ("msbd.config", "msbd.errors", "msbd.daemon.app", "msbd.daemon.cgroups",
                 "msbd.rpc.client", "msbd"),
}
# Foreign modules owned by exactly one of ours.
OWNERS = {
    "aiosqlite": {"msbd.db.session", "msbd.db.opening"},
    "sqlite3": {"msbd.db.session", "msbd.db.opening"},
    # the worker's libkrun; the daemon's one prctl (PR_SET_CHILD_SUBREAPER: no os.prctl)
    "ctypes": {"msbd.vm.krun", "msbd.daemon.reaper"},
}
# What each process-facing entry point must never load, even indirectly.
NEVER_LOADED = {
    "msbd.vm.main": ("anyio", "uvloop", "aiosqlite", "sqlite3", "msbd.daemon", "msbd.rpc",
                     "msbd.db"),
    "msbd.ctl": ("anyio", "uvloop", "aiosqlite", "sqlite3", "msbd.daemon", "msbd.db"),
    "msbd.rpc.client": ("anyio", "uvloop", "aiosqlite", "asyncio"),
}
_IO = ("anyio", "asyncio", "socket", "uvloop", "os", "select", "msbd.rpc.server")
PURE = {m: _IO for m in ("msbd.rpc.codec", "msbd.rpc.replies", "msbd.rpc.framing",
                         "msbd.rpc.limits")}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.rsplit(".", node.level)[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names
                      if f"{target}.{alias.name}" in _modules()}
    return found


def _part(module: str) -> str:
    for part in sorted(ALLOWED, key=len, reverse=True):
        if module == part or module.startswith(part + "."):
            return part
    return module


MODULES = _modules()


def test_every_module_belongs_to_a_part() -> None:
    for module in MODULES:
        if module == "msbd":
            continue
        assert _part(module) in ALLOWED, f"{module} is in no part of the layering table"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "msbd"))
def test_imports_flow_one_way(module: str) -> None:
    allowed = ALLOWED[_part(module)]
    for target in _imports(module, MODULES[module]):
        if not target.startswith("msbd"):
            continue
        ok = any(target == a or target.startswith(a + ".") for a in allowed if a != "msbd") \
            or (target == "msbd" and "msbd" in allowed)
        assert ok, f"{module} imports {target}, which its part ({_part(module)}) may not"


@pytest.mark.parametrize("foreign", sorted(OWNERS))
def test_foreign_library_has_one_owner(foreign: str) -> None:
    users = {m for m, p in MODULES.items()
             if any(t == foreign or t.startswith(foreign + ".") for t in _imports(m, p))}
    assert users <= OWNERS[foreign], f"{foreign} is imported by {sorted(users - OWNERS[foreign])}"
    assert users, f"no module imports {foreign}: the table is stale"


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_do_no_io(module: str) -> None:
    imported = _imports(module, MODULES[module])
    bad = {t for t in imported for f in PURE[module] if t == f or t.startswith(f + ".")}
    assert not bad, f"{module} must stay pure but imports {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(NEVER_LOADED))
def test_entry_points_never_load(module: str) -> None:
    """Checked in a fresh interpreter, so indirect imports count too."""
    banned = NEVER_LOADED[module]
    code = (f"import sys, {module}\n"
            f"bad = [m for m in sys.modules for b in {banned!r} if m == b or "
            f"m.startswith(b + '.')]\n"
            f"print(','.join(sorted(bad)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"importing {module} loads {out}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small_and_says_its_job(module: str) -> None:
    """Under MAX_LINES, and a docstring whose first line says what the module is for.
    An empty `__init__.py` only marks a package and is exempt."""
    text = MODULES[module].read_text()
    if not text and MODULES[module].name == "__init__.py":
        return
    lines = len(text.splitlines())
    assert lines < MAX_LINES, f"{module} has {lines} lines: split it by job"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and doc.splitlines()[0].strip(), f"{module} opens with no docstring"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if (found := visit(target)) is not None:
                return found
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if (found := visit(module)) is not None:
            return found
    return None


def test_no_import_cycle() -> None:
    """Not even a type-only one: imports under `if TYPE_CHECKING:` count too."""
    graph = {m: {t for t in _imports(m, p) if t in MODULES and t != m}
             for m, p in MODULES.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The walker itself works: a planted bad import is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from msbd.daemon import app\nimport ctypes\n")
    found = _imports("msbd.vm.bad", bad)
    assert "msbd.daemon" in found and "ctypes" in found
