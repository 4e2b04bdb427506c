"""The store's one database connection: its lock, its transactions, its error edge.

The only user of aiosqlite and sqlite3 (with `opening`, which makes the
connection). One aiosqlite connection (one thread) in WAL mode is shared by
all the daemon's tasks; `runs` and `store` build every read and write on the
three primitives here: `_fetch` (one statement), `_write` (one change) and
`_append` (an event, inside a change).

Concurrency: all statements on one connection share its transaction, so a read
made while another task is inside one would see uncommitted rows (and a write
would join it). A fair `anyio.Lock` therefore serialises every operation,
reads included; each holds it for one statement (reads) or a handful (a
change's body).

Group commit: changes that queue up together share one transaction and one
fsync. Each change runs as a savepoint of the open transaction (an error
undoes that change only); its caller then queues for the lock once more, and
the first caller of a group back at the lock commits every change made since
the group began. Under a burst of N changes that is one COMMIT instead of N,
and every caller is still answered only after the COMMIT that holds its
change. A read commits an open group first, so it never sees an uncommitted
row. A failed COMMIT rolls the whole group back and every member gets the
error.

Cancellation: a change's body and its commit run in shielded scopes (bounded
by `busy_timeout`): a cancelled caller never leaves the shared connection
inside a half-done transaction, though its change may have landed. sqlite3
errors become `StoreError` here, once.

Events: the events a group appended are handed to `on_event` after its
COMMIT (never for a rolled-back change), still under the lock, so subscribers
see them in `seq` order.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite
import anyio
import msgspec

from msbd.db.records import INSERT_EVENT, SANDBOX_SELECT, Row, Unreadable, event_values, sandbox_row
from msbd.errors import NotFound, StoreError
from msbd.model import Event, SandboxInfo, SandboxRef

log = logging.getLogger("msbd.store")

Connection = aiosqlite.Connection
"""The connection a transaction's statements run on (what `_write` yields)."""

OnEvent = Callable[[Event, int], None]
"""Called with each committed event and its sandbox's owner uid, in `seq` order."""


class _Group:
    """The changes of one transaction: how many, and the error that lost them, if any."""

    def __init__(self) -> None:
        self.members = 0
        self.error: sqlite3.Error | None = None


class Session:
    """The connection, its lock and transactions; `Store` is what callers use."""

    def __init__(self, db: Connection, on_event: OnEvent | None = None) -> None:
        self._db = db
        self._lock = anyio.Lock()
        self._on_event = on_event
        self._appended: list[tuple[Event, int]] = []  # by the group under way
        self._group: _Group | None = None  # the open transaction's changes, if any
        self.commits = 0
        """COMMITs so far (each holds one group of changes)."""
        self.unreadable: dict[str, str] = {}
        """Sandboxes whose rows lists and counts skipped: name -> the problem."""

    async def _append(self, db: Connection, now: float, owner_uid: int,
                      event: Event) -> Event:
        """Insert `event` (its `seq` is ignored); return it with the `seq` it was given."""
        cursor = await db.execute(INSERT_EVENT, event_values(event, owner_uid, now))
        assert cursor.lastrowid is not None
        event = msgspec.structs.replace(event, seq=cursor.lastrowid)
        self._appended.append((event, owner_uid))
        return event

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[Connection]:
        """One change, committed with whatever others queued with it (group commit).

        The body runs in a savepoint of the group's transaction (the first change of a
        group needs none: it is the whole transaction so far): an error rolls back this
        change only and raises. The caller resumes once the COMMIT holding its change
        is done: after the body it queues for the lock again (the lock is fair), and
        the first member of a group to come back commits the group.
        """
        db = self._db
        async with self._lock:
            with anyio.CancelScope(shield=True):
                if self._group is None:
                    await self._execute("BEGIN IMMEDIATE")
                    self._group = _Group()
                group = self._group
                mark = len(self._appended)
                joined = group.members > 0
                if joined:
                    await self._execute("SAVEPOINT change")
                try:
                    yield db
                    if joined:
                        await self._execute("RELEASE change")
                except BaseException as exc:
                    del self._appended[mark:]
                    if joined:
                        await self._execute("ROLLBACK TO change")
                        await self._execute("RELEASE change")
                    else:  # nothing else in it, and nobody will come back to commit it
                        self._group = None
                        try:
                            await self._db.rollback()
                        except sqlite3.Error as rollback_exc:
                            log.error("database rollback failed: %s", rollback_exc)
                    if isinstance(exc, sqlite3.Error):
                        raise StoreError(f"database write failed: {exc}") from exc
                    raise
                group.members += 1
        with anyio.CancelScope(shield=True):
            async with self._lock:
                if self._group is group:
                    await self._commit()
        if group.error is not None:
            raise StoreError(f"database write failed: {group.error}") from group.error

    async def _execute(self, sql: str) -> None:
        try:
            await self._db.execute(sql)
        except sqlite3.Error as exc:
            await self._abort(exc)
            raise StoreError(f"database write failed: {exc}") from exc

    async def _commit(self) -> None:
        """COMMIT the open group (under the lock); then publish its events, in seq order."""
        group, self._group = self._group, None
        assert group is not None
        events, self._appended = self._appended, []
        try:
            await self._db.commit()
        except sqlite3.Error as exc:
            group.error = exc
            await self._abort(exc)
            return
        self.commits += 1
        if self._on_event is not None:
            for event, owner_uid in events:
                self._on_event(event, owner_uid)

    async def _abort(self, exc: sqlite3.Error) -> None:
        """Roll back the open group after `exc`: every change in it is lost and its
        members get the error."""
        group, self._group = self._group, None
        self._appended.clear()
        if group is not None:
            group.error = exc
        try:
            await self._db.rollback()
        except sqlite3.Error as rollback_exc:
            log.error("database rollback failed: %s", rollback_exc)

    async def _fetch(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        """A one-statement read (under the lock: see the module docstring), of committed
        rows only: a group still open is committed first."""
        async with self._lock:
            if self._group is not None:
                with anyio.CancelScope(shield=True):
                    await self._commit()
            try:
                return list(await self._db.execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise StoreError(f"database read failed: {exc}") from exc

    def _readable(self, rows: Iterable[Row]) -> list[SandboxInfo]:
        """Decode rows, skipping (and reporting once) the ones that cannot be read."""
        out: list[SandboxInfo] = []
        for row in rows:
            try:
                out.append(sandbox_row(row))
            except Unreadable as exc:
                if exc.name not in self.unreadable:
                    log.error("skipping an unreadable record: %s", exc)
                self.unreadable[exc.name] = exc.message
        return out

    @staticmethod
    async def _select(db: Connection, ref: SandboxRef) -> SandboxInfo:
        for row in await db.execute_fetchall(SANDBOX_SELECT + "WHERE s.id = ?", (ref.id,)):
            return sandbox_row(row)
        raise NotFound(ref.name)

