"""The store's one database connection: its lock, its transactions, its error edge.

The only user of aiosqlite and sqlite3 (with `opening`, which makes the
connection, and `memory`, which reads records back). One aiosqlite
connection (one thread) in WAL mode is shared by all the daemon's tasks;
`runs` and `store` build every write on `_change` (one change) and every
read of the events log on `_fetch` (one statement). Records are read from
memory (`memory.Records`, loaded at open), never from the file.

One hop for many changes: a change's body is a plain function that runs on
the connection's own thread (aiosqlite's, through `hop`), statements, checks
and the record read back all in one call, with its savepoint around it. A
change first joins a queue; whoever holds the lock next takes the whole queue
to the database thread in one hop (`_run_queued`). Each `await` of a
statement used to be a future, a queue put, a thread wake-up and a task step
on the event loop; under a burst of stops those round trips, seven per
transition, were most of the loop's time, and one hop per change still left
one per stop. Now a burst of N changes costs a handful of hops.

Concurrency: all statements on one connection share its transaction, so a
change made while another is open would join it. A fair `anyio.Lock`
therefore serialises every operation.

Group commit: changes that queue up together share one transaction and one
fsync. Each change runs as a savepoint of the open transaction (an error
undoes that change only); its caller then queues for the lock once more, and
the first caller of a group back at the lock commits every change made since
the group began. Under a burst of N changes that is one COMMIT instead of N,
and every caller is still answered only after the COMMIT that holds its
change. A read of the events log commits an open group first. A failed
COMMIT rolls the whole group back and every member gets the error.

Memory: what each change did to the records (`memory.Staged`) waits with the
group and goes into `records` only after its COMMIT; a failed COMMIT drops
it, so memory never holds a change the file does not.

Cancellation: a change's body and its commit run in shielded scopes (bounded
by `busy_timeout`): a cancelled caller never leaves the shared connection
inside a half-done transaction, though its change may have landed. A caller
cancelled while its change still waits in the queue takes it out again. sqlite3
errors become `StoreError` here, once.

Events: the events a group appended are handed to `on_event` after its
COMMIT (never for a rolled-back change), still under the lock, so subscribers
see them in `seq` order.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import aiosqlite
import anyio
import msgspec

from msbd.db.memory import BRIEF_SELECT, FULL_SELECT, Entry, Records, Staged
from msbd.db.records import ENCODER, INSERT_EVENT, Row, event_values
from msbd.errors import StoreError
from msbd.model import Event

T = TypeVar("T")

log = logging.getLogger("msbd.store")

Connection = sqlite3.Connection
"""The connection a change's body runs its statements on (on the database thread)."""

OnEvent = Callable[[Event, int], None]
"""Called with each committed event and its sandbox's owner uid, in `seq` order."""


def _read_entries(conn: sqlite3.Connection, ids: Iterable[int],
                 known: Callable[[int], Entry | None]) -> Staged:
    """The entries of `ids` as `conn` sees them now (on the database thread, inside the
    change's transaction); a spec is taken from the `known` entry, not decoded again."""
    ids = list(ids)
    old = {i: known(i) for i in ids}
    carried = all(e is not None for e in old.values())
    params: tuple[object, ...]
    if len(ids) == 1:
        where, params = "WHERE s.id = ?", (ids[0],)
    else:
        where, params = "WHERE s.id IN (SELECT value FROM json_each(?))", (
            ENCODER.encode(ids).decode(),)
    rows = conn.execute((BRIEF_SELECT if carried else FULL_SELECT) + where, params).fetchall()
    out: Staged = dict.fromkeys(ids)
    for row in rows:
        entry = old[row[0]]
        out[row[0]] = Entry(row, full=None if entry is None else entry.full)
    return out


def _load(conn: sqlite3.Connection) -> list[Entry]:
    return [Entry(row) for row in conn.execute(FULL_SELECT + "ORDER BY s.id")]


async def load_records(db: aiosqlite.Connection) -> Records:
    """Every record in the file (at open), in one hop."""
    try:
        return Records(await hop(db, _load))
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the records: {exc}") from exc


class _Group:
    """The changes of one transaction: how many, and the error that lost them, if any."""

    def __init__(self) -> None:
        self.members = 0
        self.error: Exception | None = None


class Draft:
    """What one change did, gathered by its body on the database thread."""

    def __init__(self, known: Callable[[int], Entry | None]) -> None:
        self._known = known
        self.events: list[tuple[Event, int]] = []
        self.staged: Staged = {}

    def append(self, db: Connection, now: float, owner_uid: int, event: Event) -> Event:
        """Insert `event` (its `seq` is ignored); return it with the `seq` it was given."""
        cursor = db.execute(INSERT_EVENT, event_values(event, owner_uid, now))
        assert cursor.lastrowid is not None
        event = msgspec.structs.replace(event, seq=cursor.lastrowid)
        self.events.append((event, owner_uid))
        return event

    def reread(self, db: Connection, ids: Iterable[int]) -> Staged:
        """The records of `ids` as this change left them, kept for after the COMMIT."""
        entries = _read_entries(db, ids, self._known)
        self.staged.update(entries)
        return entries

    def drop(self, sandbox_id: int) -> None:
        self.staged[sandbox_id] = None


Body = Callable[[Connection, Draft], T]
"""A change: its statements, on the database thread, inside the group's transaction."""


class _Failed:
    """A change's body raised (its savepoint is rolled back already)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Pending:
    """One change queued for a hop: its body, then what became of it."""

    __slots__ = ("body", "draft", "group", "outcome", "ran")

    def __init__(self, body: Body[Any]) -> None:
        self.body = body
        self.ran = False  # a hop ran it (with or without success)
        self.outcome: Any = None  # the body's result, or `_Failed`
        self.draft: Draft | None = None  # set if its change was kept
        self.group: _Group | None = None  # the group whose COMMIT holds it


def _run_queued(db: Connection, queued: list[_Pending], begin: bool,
                latest: Callable[[int], Entry | None]) -> bool:
    """Each queued body in turn, each in a savepoint of the group's transaction (opened here
    when `begin`). On the database thread. A body's error undoes that change only and is
    kept as `_Failed`; an error of the savepoints' own statements raises (the transaction
    is then in doubt). Returns whether any change was kept; when none was and the
    transaction was opened here, it is rolled back (nobody would come back to commit it)."""
    staged: Staged = {}  # what earlier bodies of this hop did: later ones read it

    def known(sandbox_id: int) -> Entry | None:
        return staged[sandbox_id] if sandbox_id in staged else latest(sandbox_id)

    if begin:
        db.execute("BEGIN IMMEDIATE")
    kept = False
    for change in queued:
        draft = Draft(known)
        db.execute("SAVEPOINT change")
        try:
            change.outcome = change.body(db, draft)
        except Exception as exc:  # noqa: BLE001 (any error undoes the change; its caller raises it)
            db.execute("ROLLBACK TO change")
            db.execute("RELEASE change")
            change.outcome = _Failed(exc)
            continue
        db.execute("RELEASE change")
        change.draft = draft
        staged.update(draft.staged)
        kept = True
    if begin and not kept:
        db.rollback()
    return kept


async def hop(db: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """`fn(connection, *args)` on the database thread, in one round trip. (aiosqlite has
    no public call for this; `_execute` is what its own methods queue through.)"""
    run: Callable[..., Awaitable[T]] = db._execute
    return await run(fn, db._conn, *args)


class Session:
    """The connection, its lock and transactions; `Store` is what callers use."""

    def __init__(self, db: aiosqlite.Connection, records: Records,
                 on_event: OnEvent | None = None) -> None:
        self._db = db
        self._lock = anyio.Lock()
        self._on_event = on_event
        self._appended: list[tuple[Event, int]] = []  # by the group under way
        self._staged: Staged = {}  # what the group under way did to the records
        self._group: _Group | None = None  # the open transaction's changes, if any
        self._queue: list[_Pending] = []  # changes waiting for the next hop
        self.records = records
        """Every sandbox's record as the last COMMIT left it."""
        self.commits = 0
        """COMMITs so far (each holds one group of changes)."""
        self.hops = 0
        """Trips to the database thread that ran changes (each runs every change queued)."""
        self.unreadable: dict[str, str] = {}
        """Sandboxes whose rows lists and counts skipped: name -> the problem."""

    def _latest(self, sandbox_id: int) -> Entry | None:
        """The record as the group under way left it (the committed one if untouched)."""
        if sandbox_id in self._staged:
            return self._staged[sandbox_id]
        return self.records.by_id.get(sandbox_id)

    async def _change(self, body: Body[T]) -> T:
        """One change, committed with whatever others queued with it (group commit).

        The change queues, then its caller waits for the lock; whoever holds the lock next
        runs every queued body in one hop (`_run_queued`), so a burst of N changes is a few
        hops, not N. A body's error rolls back that change only and raises in its caller.
        The caller resumes once the COMMIT holding its change is done: after the hop it
        queues for the lock again (the lock is fair), and the first member of a group to
        come back commits the group. A caller cancelled before its body ran leaves nothing
        behind; once it ran, its commit is waited for all the same.
        """
        me = _Pending(body)
        self._queue.append(me)
        try:
            async with self._lock:
                if not me.ran:
                    with anyio.CancelScope(shield=True):
                        await self._run_queue()
        except BaseException:
            if not me.ran:
                if me in self._queue:  # else a hop took it and failed as a whole
                    self._queue.remove(me)
                raise
            with anyio.CancelScope(shield=True):
                await self._commit_group(me.group)
            raise
        outcome = me.outcome
        if isinstance(outcome, _Failed):
            if isinstance(outcome.exc, sqlite3.Error):
                raise StoreError(f"database write failed: {outcome.exc}") from outcome.exc
            raise outcome.exc
        group = me.group
        assert group is not None
        with anyio.CancelScope(shield=True):
            await self._commit_group(group)
        if group.error is not None:
            raise StoreError(f"database write failed: {group.error}") from group.error
        result: T = outcome
        return result

    async def _run_queue(self) -> None:
        """Run every queued change in one hop (under the lock), into the open group."""
        queued, self._queue = self._queue, []
        first = self._group is None
        self.hops += 1
        try:
            kept = await hop(self._db, _run_queued, queued, first, self._latest)
        except Exception as exc:  # noqa: BLE001 (sqlite's, or the connection gone: all fail)
            await self._abort(exc)
            for change in queued:
                change.ran = True
                change.outcome = _Failed(StoreError(f"database write failed: {exc}"))
            return
        if kept and first:
            self._group = _Group()
        for change in queued:
            change.ran = True
            if change.draft is not None:
                assert self._group is not None
                change.group = self._group
                self._group.members += 1
                self._appended += change.draft.events
                self._staged.update(change.draft.staged)

    async def _commit_group(self, group: _Group | None) -> None:
        """Commit `group` unless another member did already (or it failed)."""
        async with self._lock:
            if group is not None and self._group is group:
                await self._commit()

    async def _commit(self) -> None:
        """COMMIT the open group (under the lock); then publish its events, in seq order."""
        group, self._group = self._group, None
        assert group is not None
        events, self._appended = self._appended, []
        staged, self._staged = self._staged, {}
        try:
            await self._db.commit()
        except sqlite3.Error as exc:
            group.error = exc
            await self._abort(exc)
            return
        self.commits += 1
        self.records.apply(staged)
        if self._on_event is not None:
            for event, owner_uid in events:
                self._on_event(event, owner_uid)

    async def _abort(self, exc: Exception) -> None:
        """Roll back the open group after `exc`: every change in it is lost and its
        members get the error."""
        group, self._group = self._group, None
        self._appended.clear()
        self._staged.clear()
        if group is not None:
            group.error = exc
        try:
            await self._db.rollback()
        except Exception as rollback_exc:  # noqa: BLE001 (sqlite's, or the connection gone)
            log.error("database rollback failed: %s", rollback_exc)

    async def on_thread(self, fn: Callable[[], T]) -> T:
        """`fn()` on the database thread (what is true of that thread, e.g. its
        scheduling policy, can only be set from it)."""
        return await hop(self._db, lambda _conn: fn())

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
