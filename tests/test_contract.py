"""The daemon<->worker contract is defined once: `msbd/contract.py`, and nowhere else.

The checks walk the source of msbd, the tests and the benchmarks with `ast`,
so a value copied back into one side (an fd number, a status word, an exit
status, the host-check record) fails here, naming the file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from msbd import contract
from msbd.contract import (
    LAUNCH_FAILURES,
    StatusWord,
    WorkerExit,
    fork_reply,
    parse_fork_reply,
    parse_status,
    status_line,
)

REPO = Path(__file__).resolve().parents[1]
CONTRACT = REPO / "msbd" / "contract.py"
# The contract's names, and the names its values had when they were copied around.
NAMES = {"SPEC_FD", "WATCHDOG_FD", "STATUS_FD", "STDIO_FDS", "StatusWord", "WorkerExit",
         "LAUNCH_FAILURES", "SIGNAL_EXIT_BASE", "CheckInfo", "HostReport",
         "LAUNCH_FAILURE_STATUSES", "DoctorReport", "signame"}
WORDS = {w.value for w in StatusWord}
FD_NUMBERS = {contract.SPEC_FD, contract.WATCHDOG_FD, contract.STATUS_FD}


def _sources() -> Iterator[tuple[Path, ast.AST]]:
    for top in ("msbd", "tests", "bench"):
        for path in sorted((REPO / top).rglob("*.py")):
            if path != CONTRACT:
                yield path, ast.parse(path.read_text(), str(path))


SOURCES = list(_sources())


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"


def _defined(node: ast.AST) -> list[str]:
    """The names a statement defines: a class, a function, an assignment's targets."""
    if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        return [node.name]
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign):
        targets = [node.target]
    names: list[str] = []
    for target in targets:
        elts = target.elts if isinstance(target, ast.Tuple) else [target]
        names += [e.id for e in elts if isinstance(e, ast.Name)]
    return names


def test_no_second_definition_of_a_contract_name() -> None:
    found = [f"{_where(path, node)} defines {name}" for path, tree in SOURCES
             for node in ast.walk(tree) for name in _defined(node) if name in NAMES]
    assert not found, found


def test_no_fd_number_of_the_map_given_a_name_elsewhere() -> None:
    """`X_FD = 97` (or a tuple of them) outside the contract is a copy of the fd map."""
    found = []
    for path, tree in SOURCES:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
                continue
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            numbers = {v.value for v in values if isinstance(v, ast.Constant)}
            if numbers & FD_NUMBERS and any(n.endswith("_FD") for n in _defined(node)):
                found.append(_where(path, node))
    assert not found, found


def _status_literal(node: ast.AST) -> bool:
    """A status word spelt out: compared with `==`, tested with `startswith`, or as bytes."""
    if isinstance(node, ast.Constant) and isinstance(node.value, bytes):
        head = node.value.split(b" ")[0].rstrip(b"\n").decode(errors="replace")
        return head in WORDS and node.value != head.encode()  # b"error " / b"entering\n"
    if isinstance(node, ast.Compare):
        return any(isinstance(c, ast.Constant) and c.value in WORDS
                   for c in [node.left, *node.comparators])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
            and node.func.attr == "startswith":
        return any(isinstance(a, ast.Constant) and a.value in WORDS for a in node.args)
    return False


def test_status_words_are_not_spelt_out_in_msbd() -> None:
    found = [_where(path, node) for path, tree in SOURCES
             if path.is_relative_to(REPO / "msbd")
             for node in ast.walk(tree) if _status_literal(node)]
    assert not found, found


def test_the_checker_sees_planted_copies(tmp_path: Path) -> None:
    """The walkers themselves work: each kind of copy is found in a planted module."""
    tree = ast.parse('STATUS_FD = 98\nclass HostReport: pass\nif line == "heartbeat": pass\n'
                     'x = b"entering\\n"\nline.startswith("error")\n')
    nodes = list(ast.walk(tree))
    assert {n for node in nodes for n in _defined(node)} >= {"STATUS_FD", "HostReport"}
    assert sum(_status_literal(node) for node in nodes) == 3


@pytest.mark.parametrize(("word", "text", "line"), [
    (StatusWord.ENTERING, b"", b"entering\n"),
    (StatusWord.HEARTBEAT, b"", b"heartbeat\n"),
    (StatusWord.ERROR, b"no libkrun", b"error no libkrun\n"),
    (StatusWord.ERROR, b"", b"error \n"),
])
def test_status_lines_round_trip(word: StatusWord, text: bytes, line: bytes) -> None:
    assert status_line(word, text) == line
    assert parse_status(line.decode().removesuffix("\n")) == (word, text.decode())


@pytest.mark.parametrize("line", ["", "hello", "entering now", "heartbeat 3", "errors x",
                                  "ENTERING"])
def test_what_is_not_a_status_line(line: str) -> None:
    assert parse_status(line) is None


def test_only_an_error_line_carries_text() -> None:
    with pytest.raises(ValueError, match="carries no text"):
        status_line(StatusWord.HEARTBEAT, b"x")


def test_launch_failures_are_the_statuses_2_to_5() -> None:
    assert sorted(LAUNCH_FAILURES) == [2, 3, 4, 5]
    assert WorkerExit.DAEMON_GONE not in LAUNCH_FAILURES


def test_a_fork_servers_answer_reads_back() -> None:
    assert parse_fork_reply(fork_reply(1234)) == 1234
    assert parse_fork_reply(fork_reply(None, "cannot fork: no memory")) == "cannot fork: no memory"
    assert parse_fork_reply(b"pid x") == "not an answer: b'pid x'"
    assert parse_fork_reply(b"") == "not an answer: b''"
