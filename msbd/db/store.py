"""The SQLite store of sandboxes, runs and events: the only user of aiosqlite/sqlite3.

How it works: one aiosqlite connection (one thread) in WAL mode, shared by all
the daemon's tasks. Every change is one short `BEGIN IMMEDIATE … COMMIT` that
also appends its event, so a state and its event are never seen apart. Writes
take `now` (unix seconds) from the caller; the store never reads the clock.

Concurrency: all statements on one connection share its transaction, so a read
made while another task is between BEGIN and COMMIT would see uncommitted rows
(and a write would join that transaction). An `anyio.Lock` therefore
serialises every operation, reads included; each holds it for one statement
(reads) or a handful (writes). A second, read-only connection would avoid
that, at the price of "one connection".

Cancellation: a write transaction that has begun runs to COMMIT or ROLLBACK in
a shielded scope (bounded by `busy_timeout`): a cancelled caller never leaves
the shared connection inside a half-done transaction, though its change may
have landed. sqlite3 errors become `StoreError` here, once.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import aiosqlite
import anyio
import msgspec

from msbd.db import schema
from msbd.errors import Conflict, NotFound, StoreError
from msbd.model import LIVE_STATES, Event, LaunchSpec, Reason, RunInfo, SandboxInfo, State

__all__ = ["LiveRun", "OnEvent", "RunEnd", "Store", "open_store"]

_Row = Sequence[Any]  # a raw sqlite3 row (a tuple): the untyped edge
OnEvent = Callable[[Event, int], None]
"""Called with each committed event and its sandbox's owner uid, in `seq` order."""

_SPEC_DECODER: Final = msgspec.json.Decoder(LaunchSpec)
_ENCODER: Final = msgspec.json.Encoder()
_STATES: Final = {s.value: s for s in State}
_REASONS: Final = {r.value: r for r in Reason}
_UTC: Final = dt.UTC


class RunEnd(msgspec.Struct, frozen=True, kw_only=True):
    """How a run ended, written on the transition that closes it."""

    reason: Reason
    exit_code: int | None = None
    signal: int | None = None
    detail: str | None = None


class LiveRun(msgspec.Struct, frozen=True, kw_only=True):
    """A run the database believes alive: what restart reconciliation checks."""

    name: str
    run_id: int
    state: State
    pid: int | None
    proc_start: int | None
    boot_id: str | None
    started_at: dt.datetime


# --- rows to records -------------------------------------------------------------

_SANDBOX_SELECT: Final = """
SELECT s.name, s.state, s.owner_uid, s.spec, s.created_at, s.updated_at,
       r.id, r.pid, r.started_at, r.ended_at, r.reason, r.exit_code, r.signal, r.detail
FROM sandboxes AS s LEFT JOIN runs AS r ON r.id = s.current_run
"""
_EVENT_SELECT: Final = """
SELECT seq, time, sandbox, state, run_id, reason, exit_code, signal, detail FROM events
"""
_INSERT_EVENT: Final = """
INSERT INTO events (time, sandbox, owner_uid, state, run_id, reason, exit_code, signal, detail)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_LIVE_VALUES: Final = tuple(sorted(s.value for s in LIVE_STATES))
_LIVE_SELECT: Final = f"""
SELECT s.name, r.id, s.state, r.pid, r.proc_start, r.boot_id, r.started_at
FROM sandboxes AS s JOIN runs AS r ON r.id = s.current_run
WHERE s.state IN ({", ".join("?" * len(_LIVE_VALUES))}) ORDER BY r.id
"""


def _time(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, _UTC)


def _sandbox(row: _Row) -> SandboxInfo:
    (name, state, owner_uid, spec_json, created_at, updated_at,
     run_id, pid, started_at, ended_at, reason, exit_code, signal, detail) = row
    try:
        spec = _SPEC_DECODER.decode(spec_json)
        run = None if run_id is None else RunInfo(
            id=run_id, pid=pid, started_at=_time(started_at),
            ended_at=None if ended_at is None else _time(ended_at),
            reason=None if reason is None else _REASONS[reason],
            exit_code=exit_code, signal=signal, detail=detail)
        return SandboxInfo(name=name, state=_STATES[state], owner_uid=owner_uid, spec=spec,
                           created_at=_time(created_at), updated_at=_time(updated_at),
                           labels=spec.labels, run=run)
    except (msgspec.DecodeError, KeyError) as exc:
        raise StoreError(f"the record of sandbox {name!r} is unreadable: {exc}",
                         data={"sandbox": name}) from exc


def _event(row: _Row) -> Event:
    seq, time, sandbox, state, run_id, reason, exit_code, signal, detail = row
    try:
        return Event(seq=seq, time=_time(time), sandbox=sandbox, state=_STATES[state],
                     run_id=run_id, reason=None if reason is None else _REASONS[reason],
                     exit_code=exit_code, signal=signal, detail=detail)
    except KeyError as exc:
        raise StoreError(f"event {seq} is unreadable: {exc}", data={"seq": seq}) from exc


def _wrong_state(name: str, state: State) -> Conflict:
    return Conflict(f"sandbox {name!r} is {state}", data={"sandbox": name, "state": state.value})


# --- the store -------------------------------------------------------------------


class Store:
    """Typed access to the database; build it with `open_store`."""

    def __init__(self, db: aiosqlite.Connection, on_event: OnEvent | None = None) -> None:
        self._db = db
        self._lock = anyio.Lock()
        self._on_event = on_event
        self._appended: list[tuple[Event, int]] = []  # by the transaction under way

    async def _append(self, db: aiosqlite.Connection, now: float, owner_uid: int,
                      event: Event) -> Event:
        """Insert `event` (its `seq` is ignored); return it with the `seq` it was given."""
        cursor = await db.execute(_INSERT_EVENT, (
            now, event.sandbox, owner_uid, event.state.value, event.run_id,
            None if event.reason is None else event.reason.value,
            event.exit_code, event.signal, event.detail))
        assert cursor.lastrowid is not None
        event = msgspec.structs.replace(event, seq=cursor.lastrowid)
        self._appended.append((event, owner_uid))
        return event

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
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

    async def _fetch(self, sql: str, params: Iterable[Any] = ()) -> list[_Row]:
        """A one-statement read (under the lock: see the module docstring)."""
        async with self._lock:
            try:
                return list(await self._db.execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise StoreError(f"database read failed: {exc}") from exc

    @staticmethod
    async def _select_sandbox(db: aiosqlite.Connection, name: str) -> SandboxInfo:
        for row in await db.execute_fetchall(_SANDBOX_SELECT + "WHERE s.name = ?", (name,)):
            return _sandbox(row)
        raise NotFound(name)

    # --- sandboxes -----------------------------------------------------------

    async def create_sandbox(self, spec: LaunchSpec, *, owner_uid: int,
                             now: float) -> tuple[SandboxInfo, Event]:
        """Record a new sandbox in state `created`; `Conflict` if the name is taken."""
        name = spec.name
        spec_json = _ENCODER.encode(spec)
        labels_json = _ENCODER.encode(spec.labels).decode()  # TEXT, for json_each
        async with self._write() as db:
            # ON CONFLICT DO NOTHING + rowcount says "taken" without parsing error text.
            cursor = await db.execute(
                "INSERT INTO sandboxes (name, owner_uid, state, spec, labels, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (name, owner_uid, State.CREATED.value, spec_json, labels_json, now, now))
            if cursor.rowcount != 1:
                raise Conflict(f"sandbox {name!r} already exists", data={"sandbox": name})
            created = _time(now)
            event = await self._append(db, now, owner_uid, Event(
                seq=0, time=created, sandbox=name, state=State.CREATED))
        info = SandboxInfo(name=name, state=State.CREATED, owner_uid=owner_uid, spec=spec,
                           created_at=created, updated_at=created, labels=spec.labels)
        return info, event

    async def get_sandbox(self, name: str) -> SandboxInfo:
        for row in await self._fetch(_SANDBOX_SELECT + "WHERE s.name = ?", (name,)):
            return _sandbox(row)
        raise NotFound(name)

    async def list_sandboxes(self, *, state: State | None = None,
                             label: tuple[str, str] | None = None,
                             owner_uid: int | None = None) -> list[SandboxInfo]:
        """Sandboxes matching every filter given, oldest first (then by name)."""
        filters = [  # fixed SQL with placeholders; values only ever go in as parameters
            ("s.state = ?", None if state is None else (state.value,)),
            ("EXISTS (SELECT 1 FROM json_each(s.labels) WHERE key = ? AND value = ?)", label),
            ("s.owner_uid = ?", None if owner_uid is None else (owner_uid,))]
        used = [(sql, args) for sql, args in filters if args is not None]
        where = " AND ".join(["TRUE", *(sql for sql, _ in used)])
        rows = await self._fetch(f"{_SANDBOX_SELECT} WHERE {where} ORDER BY s.created_at, s.name",
                                 [arg for _, args in used for arg in args])
        return [_sandbox(row) for row in rows]

    async def remove_sandbox(self, name: str, *, now: float,
                             expect: Collection[State] | None = None,
                             ) -> tuple[SandboxInfo, Event]:
        """Delete a sandbox and its runs; return what it was.

        There is no "removed" state: the event carries the sandbox's last
        state, its current run and `detail="removed"`. With `expect`, a state
        outside it is a `Conflict` (checked in the same transaction). A live
        run's record goes too: stop its worker first.
        """
        async with self._write() as db:
            info = await self._select_sandbox(db, name)
            if expect is not None and info.state not in expect:
                raise _wrong_state(name, info.state)
            await db.execute("DELETE FROM sandboxes WHERE name = ?", (name,))
            event = await self._append(db, now, info.owner_uid, Event(
                seq=0, time=_time(now), sandbox=name, state=info.state,
                run_id=None if info.run is None else info.run.id, detail="removed"))
        return info, event

    async def transition(self, name: str, to: State, *, now: float, expect: Collection[State],
                         start_run: bool = False, pid: int | None = None,
                         proc_start: int | None = None, boot_id: str | None = None,
                         end: RunEnd | None = None, detail: str | None = None,
                         ) -> tuple[SandboxInfo, Event]:
        """Move a sandbox to `to` in one transaction and record one event.

        `Conflict` unless the current state is in `expect`. `start_run` opens a
        new run (started at `now`) and makes it current; otherwise `pid`,
        `proc_start`, `boot_id` (when given) update the current run. `end`
        closes the current run at `now`. The event's `detail` is `detail`, or
        else `end.detail`.

        Invariant, checked before anything is written (`StoreError` if broken,
        a caller's bug): a sandbox in a live state (starting, running,
        stopping) has an open current run, and one in any other state has none.
        """
        async with self._write() as db:
            return await self._transition(
                db, name, to, now=now, expect=expect, start_run=start_run, pid=pid,
                proc_start=proc_start, boot_id=boot_id, end=end, detail=detail)

    async def end_runs(self, ends: Iterable[tuple[str, RunEnd]], *, now: float,
                       to: State = State.STOPPED) -> list[tuple[SandboxInfo, Event]]:
        """End the current run of each named live sandbox and move it to `to`.

        All in one transaction (restart reconciliation: all or nothing), one
        event each; `Conflict` if one of them is not live. Set-based (a few
        statements for any number of runs), so reconciling a thousand runs
        costs milliseconds, not a thousand round trips to the database thread.
        """
        todo = list(ends)
        if not todo:
            return []
        names = [name for name, _ in todo]
        wanted = _ENCODER.encode(names).decode()
        async with self._write() as db:
            rows = await db.execute_fetchall(
                "SELECT s.name, s.state, s.owner_uid, s.current_run, r.ended_at IS NULL"
                " FROM sandboxes AS s LEFT JOIN runs AS r ON r.id = s.current_run"
                " WHERE s.name IN (SELECT value FROM json_each(?))", (wanted,))
            found = {row[0]: row for row in rows}
            for name in names:
                if name not in found:
                    raise NotFound(name)
                _, state_value, _, run_id, run_open = found[name]
                if _STATES[state_value] not in LIVE_STATES:
                    raise _wrong_state(name, _STATES[state_value])
                if run_id is None or not run_open:
                    raise StoreError(f"cannot end the run of {name!r}: it has no open run",
                                     data={"sandbox": name})
            await db.executemany(
                "UPDATE runs SET ended_at = ?, reason = ?, exit_code = ?, signal = ?,"
                " detail = ? WHERE id = ?",
                [(now, end.reason.value, end.exit_code, end.signal, end.detail, found[name][3])
                 for name, end in todo])
            await db.executemany(
                "UPDATE sandboxes SET state = ?, updated_at = ? WHERE name = ?",
                [(to.value, now, name) for name in names])
            events = [Event(seq=0, time=_time(now), sandbox=name, state=to,
                            run_id=found[name][3], reason=end.reason, exit_code=end.exit_code,
                            signal=end.signal, detail=end.detail) for name, end in todo]
            before = await db.execute_fetchall(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'")
            first = (next(iter(before))[0] if before else 0) + 1
            await db.executemany(_INSERT_EVENT, [
                (now, e.sandbox, found[e.sandbox][2], e.state.value, e.run_id,
                 None if e.reason is None else e.reason.value, e.exit_code, e.signal, e.detail)
                for e in events])
            # One writer inside BEGIN IMMEDIATE: AUTOINCREMENT gave consecutive numbers.
            events = [msgspec.structs.replace(e, seq=first + i) for i, e in enumerate(events)]
            self._appended.extend((e, found[e.sandbox][2]) for e in events)
            infos = {info.name: info for info in map(_sandbox, await db.execute_fetchall(
                _SANDBOX_SELECT + "WHERE s.name IN (SELECT value FROM json_each(?))",
                (wanted,)))}
        return [(infos[e.sandbox], e) for e in events]

    async def set_run_process(self, name: str, run_id: int, *, pid: int,
                              proc_start: int | None, boot_id: str | None) -> None:
        """Record which process run `run_id` of `name` is, once it is spawned.

        Not a state change, so no event. The run may have ended already (the
        worker died at once); its record still gets the pid. `NotFound` if the
        sandbox (or that run of it) is gone.
        """
        async with self._write() as db:
            cursor = await db.execute(
                "UPDATE runs SET pid = ?, proc_start = ?, boot_id = ?"
                " WHERE id = ? AND sandbox = ?", (pid, proc_start, boot_id, run_id, name))
            if cursor.rowcount != 1:
                raise NotFound(name)

    async def _transition(self, db: aiosqlite.Connection, name: str, to: State, *, now: float,
                          expect: Collection[State], start_run: bool = False,
                          pid: int | None = None, proc_start: int | None = None,
                          boot_id: str | None = None, end: RunEnd | None = None,
                          detail: str | None = None) -> tuple[SandboxInfo, Event]:
        """`transition`'s work, inside the caller's transaction."""
        rows = list(await db.execute_fetchall(
            "SELECT s.state, s.owner_uid, s.current_run, r.ended_at IS NULL"
            " FROM sandboxes AS s LEFT JOIN runs AS r ON r.id = s.current_run"
            " WHERE s.name = ?", (name,)))
        if not rows:
            raise NotFound(name)
        state_value, owner_uid, run_id, run_open = rows[0]
        state = _STATES[state_value]
        if state not in expect:
            raise _wrong_state(name, state)
        run_open = run_id is not None and bool(run_open)
        updates_run = pid is not None or proc_start is not None or boot_id is not None
        problem = None
        if start_run and run_open:
            problem = f"run {run_id} is still open"
        elif not start_run and (updates_run or end is not None) and not run_open:
            problem = "there is no open run to update"
        elif (to in LIVE_STATES) != ((start_run or run_open) and end is None):
            problem = (f"a {to} sandbox must have an open run" if to in LIVE_STATES
                       else f"a {to} sandbox must not have an open run")
        if problem is not None:
            raise StoreError(f"cannot move sandbox {name!r} from {state} to {to}: {problem}",
                             data={"sandbox": name, "state": state.value, "to": to.value})

        if start_run:
            cursor = await db.execute(
                "INSERT INTO runs (sandbox, pid, proc_start, boot_id, started_at)"
                " VALUES (?, ?, ?, ?, ?)", (name, pid, proc_start, boot_id, now))
            run_id = cursor.lastrowid
        elif updates_run:
            await db.execute(
                "UPDATE runs SET pid = coalesce(?, pid), proc_start = coalesce(?, proc_start),"
                " boot_id = coalesce(?, boot_id) WHERE id = ?",
                (pid, proc_start, boot_id, run_id))
        if end is not None:
            await db.execute(
                "UPDATE runs SET ended_at = ?, reason = ?, exit_code = ?, signal = ?,"
                " detail = ? WHERE id = ?",
                (now, end.reason.value, end.exit_code, end.signal, end.detail, run_id))
        await db.execute(
            "UPDATE sandboxes SET state = ?, updated_at = ?, current_run = ? WHERE name = ?",
            (to.value, now, run_id, name))
        event = Event(seq=0, time=_time(now), sandbox=name, state=to, run_id=run_id,
                      detail=detail)
        if end is not None:
            event = msgspec.structs.replace(
                event, reason=end.reason, exit_code=end.exit_code, signal=end.signal,
                detail=end.detail if detail is None else detail)
        event = await self._append(db, now, owner_uid, event)
        info = await self._select_sandbox(db, name)
        return info, event

    async def counts_by_state(self) -> dict[str, int]:
        """Number of sandboxes in each state; every state is present."""
        counts = dict.fromkeys((s.value for s in State), 0)
        for state, count in await self._fetch(
                "SELECT state, count(*) FROM sandboxes GROUP BY state"):
            counts[state] = count
        return counts

    async def live_runs(self) -> list[LiveRun]:
        """Current runs of sandboxes in starting, running or stopping, by run id."""
        rows = await self._fetch(_LIVE_SELECT, _LIVE_VALUES)
        return [LiveRun(name=name, run_id=run_id, state=_STATES[state], pid=pid,
                        proc_start=proc_start, boot_id=boot_id, started_at=_time(started_at))
                for name, run_id, state, pid, proc_start, boot_id, started_at in rows]

    # --- events ----------------------------------------------------------------

    async def events_since(self, seq: int, *, limit: int = 1000,
                           owner_uid: int | None = None) -> list[Event]:
        """Events after `seq`, oldest first, at most `limit` (of `owner_uid`'s sandboxes)."""
        sql, params = "WHERE seq > ?", [seq]
        if owner_uid is not None:
            sql, params = sql + " AND owner_uid = ?", [seq, owner_uid]
        rows = await self._fetch(_EVENT_SELECT + sql + " ORDER BY seq LIMIT ?", [*params, limit])
        return [_event(row) for row in rows]

    async def last_seq(self) -> int:
        """The last sequence number ever given to an event (0 for none), pruned or not."""
        rows = await self._fetch(
            "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)")
        return int(rows[0][0])

    async def prune_events(self, *, keep: int) -> int:
        """Delete all but the newest `keep` events; return how many went."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, not {keep}")
        async with self._write() as db:
            cursor = await db.execute(
                "DELETE FROM events WHERE seq <= "
                "(SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?)", (keep,))
            return cursor.rowcount


# --- opening -----------------------------------------------------------------------

_PRAGMAS: Final = (
    "PRAGMA foreign_keys = ON",  # runs go with their sandbox (ON DELETE CASCADE)
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
    await _migrate(db, str(path))


async def _connect(path: Path) -> aiosqlite.Connection:
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


@asynccontextmanager
async def open_store(path: Path, *, on_event: OnEvent | None = None) -> AsyncIterator[Store]:
    """Open (creating and migrating if needed) the database at `path`; close it on exit.

    `on_event`, if given, is called after each COMMIT with every event that
    transaction appended (never for a rolled-back one), in `seq` order; it
    must neither block nor raise (the change is already on disk).
    """
    db = await _connect(path)
    try:
        yield Store(db, on_event)
    finally:
        with anyio.CancelScope(shield=True):
            await db.close()
