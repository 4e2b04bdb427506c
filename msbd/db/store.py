"""The SQLite store of sandboxes, runs and events: what the daemon reads and writes.

How it works: `Store` is the one class callers use. Its parts: the shared
connection with its lock and transactions (`session`), runs and state
transitions (`runs`), and here the sandbox records and the event log. Every
change is one short `BEGIN IMMEDIATE … COMMIT` that also appends its event,
so a state and its event are never seen apart. Writes take `now` (unix
seconds) from the caller; the store never reads the clock.

Records are named by their immutable id (`SandboxRef`) in every write: a
caller that read sandbox `x`, waited, then acts, acts on that record or gets
`NotFound`, never on a newer sandbox that took the name meanwhile. Only
`get_sandbox` and `create_sandbox` take a name.

Concurrency and cancellation: see `session`.

One unreadable row (see `records`) fails only a call about that sandbox:
lists and counts skip it, log it once, and keep it in `unreadable` for admins.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from msbd.db.opening import connect
from msbd.db.records import (
    ENCODER,
    EVENT_SELECT,
    SANDBOX_COLUMNS,
    SANDBOX_FROM,
    SANDBOX_SELECT,
    STATES,
    Unreadable,
    event_row,
    owner_row,
    sandbox_row,
    utc,
)
from msbd.db.runs import LiveRun, RunEnd, Runs
from msbd.db.session import OnEvent
from msbd.errors import Conflict, LimitReached, NotFound
from msbd.model import Event, LaunchSpec, Owner, SandboxInfo, SandboxRef, State

__all__ = ["LiveRun", "OnEvent", "RunEnd", "Store", "open_store"]

log = logging.getLogger("msbd.store")


class Store(Runs):
    """Typed access to the database; build it with `open_store`."""

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
                " labels, network, ports, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (name, owner.uid, owner.gid, groups, State.CREATED.value, spec_json,
                 labels_json, spec.network, ENCODER.encode(spec.ports).decode(), now, now))
            if cursor.rowcount != 1:
                raise Conflict(f"sandbox {name!r} already exists", data={"sandbox": name})
            assert cursor.lastrowid is not None
            sandbox_id = cursor.lastrowid
            created = utc(now)
            event = await self._append(db, now, owner.uid, Event(
                seq=0, time=created, sandbox=name, sandbox_id=sandbox_id, state=State.CREATED))
        info = SandboxInfo(id=sandbox_id, name=name, state=State.CREATED, owner_uid=owner.uid,
                           spec=spec, created_at=created, updated_at=created, labels=spec.labels,
                           network=spec.network, ports=spec.ports)
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
