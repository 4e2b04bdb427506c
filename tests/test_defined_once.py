"""What was once written twice or three times in msbd is defined in one module now: a
second definition anywhere in the package fails here (found with `ast`, so prose in
docstrings and comments does not count)."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "msbd"


def _is_class(*names: str) -> Callable[[ast.AST], bool]:
    return lambda node: isinstance(node, ast.ClassDef) and node.name in names


def _reads_attribute(name: str) -> Callable[[ast.AST], bool]:
    return lambda node: isinstance(node, ast.Attribute) and node.attr == name


def _uses_string(text: str) -> Callable[[ast.AST], bool]:
    return lambda node: (isinstance(node, ast.Constant) and isinstance(node.value, str)
                         and node.value == text)


def _assigns(fragment: str) -> Callable[[ast.AST], bool]:
    def found(node: ast.AST) -> bool:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        return any(isinstance(t, ast.Name) and fragment in t.id for t in targets)
    return found


def _splits_lines(node: ast.AST) -> bool:
    """A newline search on bytes: `x.find(b"\\n")`, `x.split(b"\\n")`, ..."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"find", "split", "index"} and bool(node.args)
            and isinstance(node.args[0], ast.Constant) and node.args[0].value == b"\n")


RULES: dict[str, tuple[Callable[[ast.AST], bool], set[str]]] = {
    "reads SO_PEERCRED": (_reads_attribute("SO_PEERCRED"), {"peer.py"}),
    "the client's errors": (_is_class("DaemonUnavailable", "Lagged"), {"errors.py"}),
    "the per-user runtime dir": (_uses_string("XDG_RUNTIME_DIR"), {"config.py"}),
    "the clients' read size": (_assigns("RECV"), {"rpc/client.py"}),
    # vm/control.py reads the guest's control lines: the worker may not import rpc.
    "newline framing": (_splits_lines, {"rpc/framing.py", "vm/control.py"}),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_defined_in_one_place(rule: str) -> None:
    matches, where = RULES[rule]
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(matches(node) for node in ast.walk(ast.parse(path.read_text(), str(path)))):
            found.add(path.relative_to(PACKAGE).as_posix())
    assert found == where


def test_the_rules_see_a_second_copy() -> None:
    tree = ast.parse('_RECV = 1\nclass Lagged(Exception): pass\nb.find(b"\\n")\n'
                     'socket.SO_PEERCRED\nenv.get("XDG_RUNTIME_DIR")\n')
    for rule, (matches, _) in RULES.items():
        assert any(matches(node) for node in ast.walk(tree)), rule
