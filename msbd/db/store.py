"""The SQLite store of sandboxes, runs and events: the only user of aiosqlite/sqlite3.

How it works: one aiosqlite connection (one thread) in WAL mode, shared by all
the daemon's tasks. Every change is one short `BEGIN IMMEDIATE … COMMIT` that
also appends its event, so a state and its event are never seen apart. Writes
take `now` (unix seconds) from the caller; the store never reads the clock.

Records are named by their immutable id (`SandboxRef`) in every write: a
caller that read sandbox `x`, waited, then acts, acts on that record or gets
`NotFound`, never on a newer sandbox that took the name meanwhile. Only
`get_sandbox` and `create_sandbox` take a name.

Concurrency: all statements on one connection share its transaction, so a read
made while another task is between BEGIN and COMMIT would see uncommitted rows
(and a write would join that transaction). An `anyio.Lock` therefore
serialises every operation, reads included; each holds it for one statement
(reads) or a handful (writes).

Cancellation: a write transaction that has begun runs to COMMIT or ROLLBACK in
a shielded scope (bounded by `busy_timeout`): a cancelled caller never leaves
the shared connection inside a half-done transaction, though its change may
have landed. sqlite3 errors become `StoreError` here, once.

One unreadable row (see `records`) fails only a call about that sandbox:
lists and counts skip it, log it once, and keep it in `unreadable` for admins.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import aiosqlite
import anyio
import msgspec

from msbd.db.opening import connect
from msbd.db.records import (
    ENCODER,
    EVENT_SELECT,
    INSERT_EVENT,
    SANDBOX_COLUMNS,
    SANDBOX_FROM,
    SANDBOX_SELECT,
    STATES,
    Row,
    Unreadable,
    event_row,
    event_values,
    owner_row,
    sandbox_row,
    utc,
)
from msbd.errors import Conflict, LimitReached, NotFound, StoreError
from msbd.model import LIVE_STATES, Event, LaunchSpec, Owner, Reason, SandboxInfo, SandboxRef, State
from msbd.states import check_transition

__all__ = ["LiveRun", "OnEvent", "RunEnd", "Store", "open_store"]

log = logging.getLogger("msbd.store")

OnEvent = Callable[[Event, int], None]
"""Called with each committed event and its sandbox's owner uid, in `seq` order."""

_LIVE_VALUES: Final = tuple(sorted(s.value for s in LIVE_STATES))
_LIVE_SELECT: Final = f"""
SELECT s.id, s.name, r.id, s.state, r.pid, r.proc_start, r.boot_id, r.started_at
FROM sandboxes AS s JOIN runs AS r ON r.id = s.current_run
WHERE s.state IN ({", ".join("?" * len(_LIVE_VALUES))}) ORDER BY r.id
"""
# A transition's statements, shared by `transition` and `end_runs`: read the
# current state and run, close the run, set the state.
_CURRENT: Final = ("SELECT s.id, s.state, s.owner_uid, s.current_run, r.ended_at IS NULL"
                   " FROM sandboxes AS s LEFT JOIN runs AS r ON r.id = s.current_run WHERE ")
_END_RUN: Final = ("UPDATE runs SET ended_at = ?, reason = ?, exit_code = ?, signal = ?,"
                   " detail = ? WHERE id = ?")
_SET_STATE: Final = "UPDATE sandboxes SET state = ?, updated_at = ?, current_run = ? WHERE id = ?"


class RunEnd(msgspec.Struct, frozen=True, kw_only=True):
    """How a run ended, written on the transition that closes it."""

    reason: Reason
    exit_code: int | None = None
    signal: int | None = None
    detail: str | None = None

    def values(self, now: float, run_id: int | None) -> tuple[Any, ...]:
        """The parameters of `_END_RUN`."""
        return (now, self.reason.value, self.exit_code, self.signal, self.detail, run_id)


class LiveRun(msgspec.Struct, frozen=True, kw_only=True):
    """A run the database believes alive: what restart reconciliation checks."""

    ref: SandboxRef
    run_id: int
    state: State
    pid: int | None
    proc_start: int | None
    boot_id: str | None
    started_at: dt.datetime


def _check(ref: SandboxRef, current: Mapping[int, Row], to: State, *, start_run: bool = False,
           end: RunEnd | None = None) -> tuple[int, int | None]:
    """(owner uid, current run) of `ref`, if moving it to `to` is legal; raises otherwise.

    `current` maps sandbox ids to their `_CURRENT` rows. `NotFound` if `ref` is
    not there; `Conflict` if the state table forbids the move; `StoreError`
    (a caller's bug, or a damaged record) if the move would break the run
    invariant: a sandbox in a live state (starting, running, stopping) has an
    open current run, and one in any other state has none.
    """
    if ref.id not in current:
        raise NotFound(ref.name)
    _, state_value, owner_uid, run_id, run_open = current[ref.id]
    state = STATES.get(state_value)
    if state is None:
        raise Unreadable(f"sandbox {ref.name!r}", ref.name, f"unknown state {state_value!r}")
    check_transition(state, to, name=ref.name)
    run_open = run_id is not None and bool(run_open)
    problem = None
    if start_run and run_open:
        problem = f"run {run_id} is still open"
    elif not start_run and end is not None and not run_open:
        problem = "there is no open run to end"
    elif (to in LIVE_STATES) != ((start_run or run_open) and end is None):
        problem = (f"a {to} sandbox must have an open run" if to in LIVE_STATES
                   else f"a {to} sandbox must not have an open run")
    if problem is not None:
        raise StoreError(f"cannot move sandbox {ref.name!r} from {state} to {to}: {problem}",
                         data={"sandbox": ref.name, "state": state.value, "to": to.value})
    return owner_uid, run_id


def _event(ref: SandboxRef, to: State, *, now: float, run_id: int | None,
           end: RunEnd | None, detail: str | None = None) -> Event:
    """The event of a transition: `detail`, or else the run end's own."""
    event = Event(seq=0, time=utc(now), sandbox=ref.name, sandbox_id=ref.id, state=to,
                  run_id=run_id, detail=detail)
    if end is None:
        return event
    return msgspec.structs.replace(event, reason=end.reason, exit_code=end.exit_code,
                                   signal=end.signal,
                                   detail=end.detail if detail is None else detail)


class Store:
    """Typed access to the database; build it with `open_store`."""

    def __init__(self, db: aiosqlite.Connection, on_event: OnEvent | None = None) -> None:
        self._db = db
        self._lock = anyio.Lock()
        self._on_event = on_event
        self._appended: list[tuple[Event, int]] = []  # by the transaction under way
        self.unreadable: dict[str, str] = {}
        """Sandboxes whose rows lists and counts skipped: name -> the problem."""

    async def _append(self, db: aiosqlite.Connection, now: float, owner_uid: int,
                      event: Event) -> Event:
        """Insert `event` (its `seq` is ignored); return it with the `seq` it was given."""
        cursor = await db.execute(INSERT_EVENT, event_values(event, owner_uid, now))
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
    async def _select(db: aiosqlite.Connection, ref: SandboxRef) -> SandboxInfo:
        for row in await db.execute_fetchall(SANDBOX_SELECT + "WHERE s.id = ?", (ref.id,)):
            return sandbox_row(row)
        raise NotFound(ref.name)

    # --- sandboxes -----------------------------------------------------------

    async def create_sandbox(self, spec: LaunchSpec, *, owner: Owner, now: float,
                             max_owned: int | None = None) -> tuple[SandboxInfo, Event]:
        """Record a new sandbox in state `created`.

        `Conflict` if the name is taken; `LimitReached` if `owner` already has
        `max_owned` sandboxes (counted in the same transaction).
        """
        name = spec.name
        spec_json = ENCODER.encode(spec)
        labels_json = ENCODER.encode(spec.labels).decode()  # TEXT, for json_each
        groups = None if owner.groups is None else ENCODER.encode(owner.groups).decode()
        async with self._write() as db:
            taken = await db.execute_fetchall("SELECT 1 FROM sandboxes WHERE name = ?", (name,))
            if list(taken):
                raise Conflict(f"sandbox {name!r} already exists", data={"sandbox": name})
            if max_owned is not None:
                rows = await db.execute_fetchall(
                    "SELECT count(*) FROM sandboxes WHERE owner_uid = ?", (owner.uid,))
                if next(iter(rows))[0] >= max_owned:
                    raise LimitReached(
                        f"limit reached: uid {owner.uid} has {max_owned} sandboxes "
                        "(max_sandboxes_per_user); remove some first",
                        data={"sandbox": name, "limit": "max_sandboxes_per_user"})
            # ON CONFLICT DO NOTHING + rowcount says "taken" without parsing error text.
            cursor = await db.execute(
                "INSERT INTO sandboxes (name, owner_uid, owner_gid, owner_groups, state, spec,"
                " labels, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (name, owner.uid, owner.gid, groups, State.CREATED.value, spec_json,
                 labels_json, now, now))
            if cursor.rowcount != 1:
                raise Conflict(f"sandbox {name!r} already exists", data={"sandbox": name})
            assert cursor.lastrowid is not None
            sandbox_id = cursor.lastrowid
            created = utc(now)
            event = await self._append(db, now, owner.uid, Event(
                seq=0, time=created, sandbox=name, sandbox_id=sandbox_id, state=State.CREATED))
        info = SandboxInfo(id=sandbox_id, name=name, state=State.CREATED, owner_uid=owner.uid,
                           spec=spec, created_at=created, updated_at=created, labels=spec.labels)
        return info, event

    async def get_sandbox(self, name: str, *, lenient: bool = False) -> SandboxInfo:
        """The sandbox named `name`. An unreadable record raises `Unreadable`, or with
        `lenient` comes back as far as it can be read (no spec, no run, no labels): enough
        to see whose it is and to remove it."""
        for row in await self._fetch(SANDBOX_SELECT + "WHERE s.name = ?", (name,)):
            try:
                return sandbox_row(row)
            except Unreadable:
                if not lenient:
                    raise
                sandbox_id, _, state, owner_uid, _, _, created_at, updated_at = row[:8]
                return SandboxInfo(id=sandbox_id, name=name,
                                   state=STATES.get(state, State.STOPPED), owner_uid=owner_uid,
                                   created_at=utc(created_at), updated_at=utc(updated_at),
                                   labels={})
        raise NotFound(name)

    async def get(self, ref: SandboxRef) -> SandboxInfo:
        """The record `ref` names; `NotFound` if it is gone (even if its name is reused)."""
        for row in await self._fetch(SANDBOX_SELECT + "WHERE s.id = ?", (ref.id,)):
            return sandbox_row(row)
        raise NotFound(ref.name)

    async def list_sandboxes(self, *, state: State | None = None,
                             label: tuple[str, str] | None = None,
                             owner_uid: int | None = None, after: int = 0,
                             limit: int | None = None, with_spec: bool = True,
                             ) -> list[SandboxInfo]:
        """Up to `limit` readable sandboxes matching every filter given, by id (creation
        order), after id `after`. Unreadable rows are skipped and do not count."""
        filters = [  # fixed SQL with placeholders; values only ever go in as parameters
            ("s.state = ?", None if state is None else (state.value,)),
            ("EXISTS (SELECT 1 FROM json_each(s.labels) WHERE key = ? AND value = ?)", label),
            ("s.owner_uid = ?", None if owner_uid is None else (owner_uid,))]
        used = [(sql, args) for sql, args in filters if args is not None]
        where = " AND ".join(["s.id > ?", *(sql for sql, _ in used)])
        sql = ("SELECT" + SANDBOX_COLUMNS.format(spec="s.spec" if with_spec else "NULL")
               + SANDBOX_FROM + f"WHERE {where} ORDER BY s.id")
        fixed: list[Any] = [arg for _, args in used for arg in args]
        if limit is None:
            return self._readable(await self._fetch(sql, [after, *fixed]))
        out: list[SandboxInfo] = []
        while len(out) < limit:
            want = limit - len(out)
            rows = await self._fetch(sql + " LIMIT ?", [after, *fixed, want])
            out += self._readable(rows)
            if len(rows) < want:
                break
            after = rows[-1][0]  # go on after the last row read, readable or not
        return out

    async def owner(self, ref: SandboxRef) -> Owner:
        """Who owns `ref`, with the gid and groups recorded when it was created."""
        rows = await self._fetch(
            "SELECT owner_uid, owner_gid, owner_groups FROM sandboxes WHERE id = ?", (ref.id,))
        for uid, gid, groups in rows:
            return owner_row(uid, gid, groups)
        raise NotFound(ref.name)

    async def remove_sandbox(self, ref: SandboxRef, *, now: float,
                             expect: Collection[State] | None = None,
                             ) -> tuple[SandboxInfo, Event]:
        """Delete a sandbox and its runs; return what it was.

        There is no "removed" state: the event carries the sandbox's last
        state, its current run and `detail="removed"`. With `expect`, a state
        outside it is a `Conflict` (checked in the same transaction). A live
        run's record goes too: stop its worker first.
        """
        async with self._write() as db:
            rows = list(await db.execute_fetchall(
                "SELECT owner_uid, state, current_run, created_at, updated_at"
                " FROM sandboxes WHERE id = ?", (ref.id,)))
            if not rows:
                raise NotFound(ref.name)
            owner_uid, state_value, run_id, created_at, updated_at = rows[0]
            state = STATES.get(state_value, State.STOPPED)
            if expect is not None and state_value not in {s.value for s in expect}:
                raise Conflict(f"sandbox {ref.name!r} is {state_value}",
                               data={"sandbox": ref.name, "state": state_value})
            try:
                info = await self._select(db, ref)
            except Unreadable:  # an unreadable record can still be removed
                info = SandboxInfo(id=ref.id, name=ref.name, state=state, owner_uid=owner_uid,
                                   created_at=utc(created_at), updated_at=utc(updated_at),
                                   labels={})
            await db.execute("DELETE FROM sandboxes WHERE id = ?", (ref.id,))
            event = await self._append(db, now, owner_uid, Event(
                seq=0, time=utc(now), sandbox=ref.name, sandbox_id=ref.id, state=state,
                run_id=run_id, detail="removed"))
        self.unreadable.pop(ref.name, None)
        return info, event

    async def begin_run(self, ref: SandboxRef, *, now: float) -> tuple[SandboxInfo, Owner]:
        """Open a new run and move the sandbox to `starting` (`Conflict` unless the state
        table allows it from the current state).

        Returns the record as read inside that same transaction, with its
        owner: what gets launched is exactly what this transaction saw.
        """
        async with self._write() as db:
            info, _ = await self._transition(db, ref, State.STARTING, now=now, start_run=True)
            rows = await db.execute_fetchall(
                "SELECT owner_uid, owner_gid, owner_groups FROM sandboxes WHERE id = ?",
                (ref.id,))
            uid, gid, groups = next(iter(rows))
        return info, owner_row(uid, gid, groups)

    async def transition(self, ref: SandboxRef, to: State, *, now: float,
                         end: RunEnd | None = None, detail: str | None = None,
                         ) -> tuple[SandboxInfo, Event]:
        """Move a sandbox to `to` in one transaction and record one event.

        `Conflict` unless `msbd.states.TRANSITIONS` allows the move from the
        current state. `end` closes the current run at `now`. The event's
        `detail` is `detail`, or else `end.detail`.

        Invariant, checked before anything is written (`StoreError` if broken,
        a caller's bug): a sandbox in a live state (starting, running,
        stopping) has an open current run, and one in any other state has none.
        """
        async with self._write() as db:
            return await self._transition(db, ref, to, now=now, end=end, detail=detail)

    async def _transition(self, db: aiosqlite.Connection, ref: SandboxRef, to: State, *,
                          now: float, start_run: bool = False, end: RunEnd | None = None,
                          detail: str | None = None) -> tuple[SandboxInfo, Event]:
        """`transition`'s work, inside the caller's transaction."""
        rows = await db.execute_fetchall(_CURRENT + "s.id = ?", (ref.id,))
        current = {row[0]: row for row in rows}
        owner_uid, run_id = _check(ref, current, to, start_run=start_run, end=end)
        if start_run:
            cursor = await db.execute(
                "INSERT INTO runs (sandbox_id, started_at) VALUES (?, ?)", (ref.id, now))
            run_id = cursor.lastrowid
        if end is not None:
            await db.execute(_END_RUN, end.values(now, run_id))
        await db.execute(_SET_STATE, (to.value, now, run_id, ref.id))
        event = await self._append(db, now, owner_uid,
                                   _event(ref, to, now=now, run_id=run_id, end=end,
                                          detail=detail))
        return await self._select(db, ref), event

    async def end_runs(self, ends: Iterable[tuple[SandboxRef, RunEnd]], *,
                       now: float) -> list[Event]:
        """End the current run of each named live sandbox and move it to `stopped`.

        All in one transaction (restart reconciliation: all or nothing), one
        event each; the same checks and statements as `transition`, but
        set-based (a few statements for any number of runs), so reconciling a
        thousand runs costs milliseconds, not a thousand round trips to the
        database thread.
        """
        todo = list(ends)
        if not todo:
            return []
        to = State.STOPPED
        wanted = ENCODER.encode([ref.id for ref, _ in todo]).decode()
        async with self._write() as db:
            rows = await db.execute_fetchall(
                _CURRENT + "s.id IN (SELECT value FROM json_each(?))", (wanted,))
            current = {row[0]: row for row in rows}
            checked = [(ref, end, *_check(ref, current, to, end=end)) for ref, end in todo]
            await db.executemany(_END_RUN, [end.values(now, run_id)
                                            for _, end, _, run_id in checked])
            await db.executemany(_SET_STATE, [(to.value, now, run_id, ref.id)
                                              for ref, _, _, run_id in checked])
            events = [_event(ref, to, now=now, run_id=run_id, end=end)
                      for ref, end, _, run_id in checked]
            owners = [owner_uid for _, _, owner_uid, _ in checked]
            before = await db.execute_fetchall(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'")
            first = (next(iter(before))[0] if before else 0) + 1
            await db.executemany(INSERT_EVENT, [event_values(e, owner, now)
                                                for e, owner in zip(events, owners, strict=True)])
            # One writer inside BEGIN IMMEDIATE: AUTOINCREMENT gave consecutive numbers.
            events = [msgspec.structs.replace(e, seq=first + i) for i, e in enumerate(events)]
            self._appended.extend(zip(events, owners, strict=True))
        return events

    async def set_run_process(self, ref: SandboxRef, run_id: int, *, pid: int,
                              proc_start: int | None, boot_id: str | None) -> None:
        """Record which process run `run_id` of `ref` is, once it is spawned.

        Not a state change, so no event. The run may have ended already (the
        worker died at once); its record still gets the pid. `NotFound` if the
        sandbox (or that run of it) is gone.
        """
        async with self._write() as db:
            cursor = await db.execute(
                "UPDATE runs SET pid = ?, proc_start = ?, boot_id = ?"
                " WHERE id = ? AND sandbox_id = ?", (pid, proc_start, boot_id, run_id, ref.id))
            if cursor.rowcount != 1:
                raise NotFound(ref.name)

    async def counts_by_state(self, owner_uid: int | None = None) -> dict[str, int]:
        """Number of sandboxes in each state (of `owner_uid`'s); every state is present."""
        counts = dict.fromkeys((s.value for s in State), 0)
        sql, params = "SELECT state, count(*) FROM sandboxes", []
        if owner_uid is not None:
            sql, params = sql + " WHERE owner_uid = ?", [owner_uid]
        for state, count in await self._fetch(sql + " GROUP BY state", params):
            if state in counts:
                counts[state] = count
        return counts

    async def live_runs(self) -> list[LiveRun]:
        """Current runs of sandboxes in starting, running or stopping, by run id."""
        rows = await self._fetch(_LIVE_SELECT, _LIVE_VALUES)
        return [LiveRun(ref=SandboxRef(sandbox_id, name), run_id=run_id, state=STATES[state],
                        pid=pid, proc_start=proc_start, boot_id=boot_id,
                        started_at=utc(started_at))
                for sandbox_id, name, run_id, state, pid, proc_start, boot_id, started_at
                in rows]

    async def sandbox_ids(self) -> set[int]:
        """The id of every sandbox on record (to find console logs that belong to none)."""
        return {row[0] for row in await self._fetch("SELECT id FROM sandboxes")}

    # --- events ----------------------------------------------------------------

    async def events_since(self, seq: int, *, limit: int = 1000,
                           owner_uid: int | None = None) -> list[Event]:
        """Events after `seq`, oldest first, at most `limit` (of `owner_uid`'s sandboxes)."""
        sql, params = "WHERE seq > ?", [seq]
        if owner_uid is not None:
            sql, params = sql + " AND owner_uid = ?", [seq, owner_uid]
        rows = await self._fetch(EVENT_SELECT + sql + " ORDER BY seq LIMIT ?", [*params, limit])
        events: list[Event] = []
        for row in rows:
            try:
                events.append(event_row(row))
            except Unreadable as exc:
                log.error("skipping an unreadable event: %s", exc)
        return events

    async def last_seq(self, owner_uid: int | None = None) -> int:
        """The last sequence number given to an event (0 for none), pruned or not;
        with `owner_uid`, the last one of that owner's events still kept."""
        if owner_uid is not None:
            rows = await self._fetch(
                "SELECT coalesce(max(seq), 0) FROM events WHERE owner_uid = ?", (owner_uid,))
        else:
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


@asynccontextmanager
async def open_store(path: Path, *, on_event: OnEvent | None = None) -> AsyncIterator[Store]:
    """Open (creating and migrating if needed) the database at `path`; close it on exit.

    `on_event`, if given, is called after each COMMIT with every event that
    transaction appended (never for a rolled-back one), in `seq` order; it
    must neither block nor raise (the change is already on disk).
    """
    db = await connect(path)
    try:
        yield Store(db, on_event)
    finally:
        with anyio.CancelScope(shield=True):
            await db.close()
