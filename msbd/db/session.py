"""The store's one database connection: its lock, its transactions, its error edge.

The only user of aiosqlite and sqlite3 (with `opening`, which makes the
connection). One aiosqlite connection (one thread) in WAL mode is shared by
all the daemon's tasks; `runs` and `store` build every read and write on the
three primitives here: `_fetch` (one statement), `_write` (one transaction)
and `_append` (an event, inside a transaction).

Concurrency: all statements on one connection share its transaction, so a read
made while another task is between BEGIN and COMMIT would see uncommitted rows
(and a write would join that transaction). An `anyio.Lock` therefore
serialises every operation, reads included; each holds it for one statement
(reads) or a handful (writes).

Cancellation: a write transaction that has begun runs to COMMIT or ROLLBACK in
a shielded scope (bounded by `busy_timeout`): a cancelled caller never leaves
the shared connection inside a half-done transaction, though its change may
have landed. sqlite3 errors become `StoreError` here, once.

Events: every event a transaction appends is handed to `on_event` after its
COMMIT (never for a rolled-back one), still under the lock, so subscribers
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


class Session:
    """The connection, its lock and transactions; `Store` is what callers use."""

    def __init__(self, db: Connection, on_event: OnEvent | None = None) -> None:
        self._db = db
        self._lock = anyio.Lock()
        self._on_event = on_event
        self._appended: list[tuple[Event, int]] = []  # by the transaction under way
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
        """One transaction: BEGIN IMMEDIATE, the body, COMMIT; ROLLBACK on any error."""
        db = self._db
        async with self._lock:
            self._appended.clear()
            with anyio.CancelScope(shield=True):
                try:
                    await db.execute("BEGIN IMMEDIATE")
                    yield db
                    await db.commit()
                except BaseException as exc:
                    self._appended.clear()
                    try:
                        await db.rollback()
                    except sqlite3.Error as rollback_exc:
                        raise StoreError(f"database rollback failed: {rollback_exc}") \
                            from rollback_exc
                    if isinstance(exc, sqlite3.Error):
                        raise StoreError(f"database write failed: {exc}") from exc
                    raise
            # Committed. Still under the lock, so events are published in seq order.
            if self._on_event is not None:
                for event, owner_uid in self._appended:
                    self._on_event(event, owner_uid)

    async def _fetch(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        """A one-statement read (under the lock: see the module docstring)."""
        async with self._lock:
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

