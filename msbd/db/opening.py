"""Opening the database file: create it privately, switch to WAL, migrate; one opener at a time.

Split from `msbd.db.session` (which runs the transactions) because opening has
concerns of its own: the file's mode before SQLite ever sees it, the journal
mode, the schema's migrations, and turns between processes that open the
same new file at once (see `_wait_for_opening_turn`). `msbd.db.store.open_store`
is the way in; nothing else here is public.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path
from typing import Final

import aiosqlite
import anyio

from msbd.db import schema
from msbd.errors import StoreError

_PRAGMAS: Final = (
    # FULL, not WAL's usual NORMAL: with NORMAL a commit is durable across a
    # crash of msbd but not across power loss or a kernel crash. The daemon
    # answers "created" only after COMMIT returns, and a client may act on that
    # answer at once, so COMMIT must mean "on disk": FULL fsyncs the WAL on
    # every commit. Writes are rare (state changes), so the cost is small.
    "PRAGMA synchronous = FULL",
)


def _prepare_files(path: Path) -> None:
    """Parent dir 0700 if we create it; the db file 0600 before SQLite opens it."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
    # Created here, not by SQLite, so it is never world-readable even for an
    # instant; SQLite gives its -wal and -shm files the same mode.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _wait_for_opening_turn(path: Path) -> int:
    """Block until no other `open_store` of `path` (in any process) is opening it, then
    hold that turn until the returned fd is closed.

    Why a lock of our own: SQLite does not wait for a switch to WAL. The
    connection switching already holds a read lock when it asks for the
    exclusive one, and SQLite answers such an upgrade at once with "database is
    locked" rather than call the busy handler (two upgraders would deadlock),
    so `busy_timeout` never covers it; two openers of a new file fail that way
    about once in a hundred. A retry loop would have to poll with sleeps; an
    `flock` queues the openers in the kernel instead. It is a separate file
    because SQLite's own locks on the database are `fcntl` locks, which `flock`
    emulation on some file systems would collide with. Other programs (the
    sqlite3 CLI) do not take it, but only the first open of a new file switches
    modes, and msbd creates its files itself.
    """
    fd = os.open(path.with_name(path.name + ".open-lock"),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _migrate(db: aiosqlite.Connection, where: str) -> None:
    rows = list(await db.execute_fetchall("PRAGMA user_version"))
    for migration in schema.pending(rows[0][0], where=where):
        with anyio.CancelScope(shield=True):
            await db.execute("BEGIN IMMEDIATE")
            try:
                rows = list(await db.execute_fetchall("PRAGMA user_version"))
                if rows[0][0] < migration.version:  # not applied by another process meanwhile
                    for statement in migration.statements:
                        await db.execute(statement)
                    await db.execute(f"PRAGMA user_version = {int(migration.version)}")
                await db.commit()
            except BaseException:
                await db.rollback()
                raise


async def _configure(db: aiosqlite.Connection, path: Path) -> None:
    # First, so that another process holding the file (a second msbd starting,
    # the sqlite3 CLI) is waited for where SQLite can wait.
    await db.execute("PRAGMA busy_timeout = 5000")
    rows = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
    if str(rows[0][0]).lower() != "wal":
        raise StoreError(f"the database {path} cannot use WAL mode "
                         f"(journal_mode is {rows[0][0]})", data={"path": str(path)})
    for pragma in _PRAGMAS:
        await db.execute(pragma)
    # Off while migrating (SQLite's default, said out loud): a migration that
    # rebuilds a table drops the old one while the new one refers to its name.
    await db.execute("PRAGMA foreign_keys = OFF")
    await _migrate(db, str(path))
    await db.execute("PRAGMA foreign_keys = ON")  # runs go with their sandbox


async def connect(path: Path) -> aiosqlite.Connection:
    """A connection in WAL mode with every migration applied; opening, switching and
    migrating take turns with every other opener of `path` (`_wait_for_opening_turn`)."""
    try:
        await anyio.to_thread.run_sync(_prepare_files, path)
        # Not abandoned on cancellation: the fd comes back, and is closed below.
        turn = await anyio.to_thread.run_sync(_wait_for_opening_turn, path)
    except OSError as exc:
        raise StoreError(f"cannot create the database {path}: {exc}",
                         data={"path": str(path)}) from exc
    try:
        # isolation_level=None: the sqlite3 module never opens transactions on its
        # own; the store says BEGIN IMMEDIATE itself.
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {path}: {exc}",
                             data={"path": str(path)}) from exc
        try:
            await _configure(db, path)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await db.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open the database {path}: {exc}",
                                 data={"path": str(path)}) from exc
            raise
        return db
    finally:
        os.close(turn)
