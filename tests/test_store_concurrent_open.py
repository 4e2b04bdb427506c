"""Opening one new database from several processes at the same moment, many times over.

SQLite answers a second connection's switch to WAL with "database is locked"
at once (no busy handler) when another connection holds a read lock at that
instant: about one round in a hundred of four simultaneous openers hit it
before `open_store` made openers take turns. This runs enough rounds to see
it, on tmpfs when there is one (the migrations' fsyncs are the slow part).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from msbd.db import schema

pytestmark = pytest.mark.slow
OPENERS, ROUNDS = 4, 300

# One opener: for each database path read from stdin, open it (creating and migrating
# it), close it, and answer one line: "ok" or the error.
OPENER = """
import sys
from pathlib import Path
import anyio
from msbd.db.store import open_store

async def open_once(path):
    async with open_store(path):
        pass

for line in sys.stdin:
    try:
        anyio.run(open_once, Path(line.strip()))
        print("ok", flush=True)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
"""


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="msbd-open-", dir=shm))
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def test_simultaneous_openers_in_several_processes_all_succeed(fast_dir: Path) -> None:
    openers = [subprocess.Popen([sys.executable, "-c", OPENER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for _ in range(OPENERS)]
    failures: list[str] = []
    try:
        for n in range(ROUNDS):
            path = fast_dir / f"{n}.db"
            for proc in openers:  # every opener gets the path before any answers
                assert proc.stdin is not None
                proc.stdin.write(f"{path}\n")
                proc.stdin.flush()
            for proc in openers:
                assert proc.stdout is not None
                answer = proc.stdout.readline().strip()
                if answer != "ok":
                    failures.append(f"round {n}: {answer}")
            with contextlib.closing(sqlite3.connect(path)) as db:
                assert db.execute("PRAGMA user_version").fetchone() == (schema.LATEST,)
                assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        for proc in openers:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in openers:
            proc.wait(timeout=60)
            assert proc.stdout is not None
            proc.stdout.close()
    assert failures == [], f"{len(failures)} of {OPENERS * ROUNDS} opens failed"
