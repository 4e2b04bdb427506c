"""The SQLite store of sandboxes, runs and events: what the daemon reads and writes.

How it works: `Store` is the one class callers use. Its parts: the shared
connection with its lock and transactions (`session`), runs and state
transitions (`runs`), the records kept in memory (`memory`), and here the
sandbox records and the event log. Every change is one function on the
database thread, committed with the changes queued with it, that also
appends its event, so a state and its event are never seen apart. Records
are read from memory, which takes each change only after its COMMIT; the
event log is read from the file. Writes take `now` (unix seconds) from the
caller; the store never reads the clock.

Records are named by their immutable id (`SandboxRef`) in every write: a
caller that read sandbox `x`, waited, then acts, acts on that record or gets
`NotFound`, never on a newer sandbox that took the name meanwhile. Only
`get_sandbox` and `create_sandbox` take a name.

Concurrency and cancellation: see `session`.

One unreadable row (see `records`) fails only a call about that sandbox:
lists and counts skip it, log it once, and keep it in `unreadable` for admins.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from msbd.db.memory import Entry
from msbd.db.opening import connect
from msbd.db.records import ENCODER, EVENT_SELECT, STATES, Unreadable, event_row, utc
from msbd.db.runs import LiveRun, RunEnd, Runs
from msbd.db.session import Connection, Draft, OnEvent, load_records
from msbd.errors import Conflict, LimitReached, NotFound
from msbd.model import Event, LaunchSpec, Owner, SandboxInfo, SandboxRef, State

__all__ = ["LiveRun", "OnEvent", "RunEnd", "Store", "open_store"]

log = logging.getLogger("msbd.store")


def _create(db: Connection, draft: Draft, spec: LaunchSpec, *, owner: Owner, now: float,
            max_owned: int | None) -> tuple[SandboxInfo, Event]:
    """`create_sandbox`'s statements, on the database thread."""
    name = spec.name
    if db.execute("SELECT 1 FROM sandboxes WHERE name = ?", (name,)).fetchall():
        raise Conflict(f"sandbox {name!r} already exists", data={"sandbox": name})
    if max_owned is not None:
        [(owned,)] = db.execute("SELECT count(*) FROM sandboxes WHERE owner_uid = ?",
                                (owner.uid,)).fetchall()
        if owned >= max_owned:
            raise LimitReached(
                f"limit reached: uid {owner.uid} has {max_owned} sandboxes "
                "(max_sandboxes_per_user); remove some first",
                data={"sandbox": name, "limit": "max_sandboxes_per_user"})
    groups = None if owner.groups is None else ENCODER.encode(owner.groups).decode()
    # ON CONFLICT DO NOTHING + rowcount says "taken" without parsing error text.
    cursor = db.execute(
        "INSERT INTO sandboxes (name, owner_uid, owner_gid, owner_groups, state, spec,"
        " labels, network, ports, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        (name, owner.uid, owner.gid, groups, State.CREATED.value, ENCODER.encode(spec),
         ENCODER.encode(spec.labels).decode(),  # TEXT, for json_each
         spec.network, ENCODER.encode(spec.ports).decode(), now, now))
    if cursor.rowcount != 1:
        raise Conflict(f"sandbox {name!r} already exists", data={"sandbox": name})
    assert cursor.lastrowid is not None
    sandbox_id = cursor.lastrowid
    created = utc(now)
    event = draft.append(db, now, owner.uid, Event(
        seq=0, time=created, sandbox=name, sandbox_id=sandbox_id, state=State.CREATED))
    entry = draft.reread(db, [sandbox_id])[sandbox_id]
    assert entry is not None
    return entry.info(), event


def _remove(db: Connection, draft: Draft, ref: SandboxRef, *, now: float,
            expect: Collection[State] | None, known: Entry | None,
            ) -> tuple[SandboxInfo, Event]:
    """`remove_sandbox`'s statements, on the database thread."""
    rows = db.execute("SELECT owner_uid, state, current_run FROM sandboxes WHERE id = ?",
                      (ref.id,)).fetchall()
    if not rows:
        raise NotFound(ref.name)
    owner_uid, state_value, run_id = rows[0]
    state = STATES.get(state_value, State.STOPPED)
    if expect is not None and state_value not in {s.value for s in expect}:
        raise Conflict(f"sandbox {ref.name!r} is {state_value}",
                       data={"sandbox": ref.name, "state": state_value})
    entry = known if known is not None else draft.reread(db, [ref.id])[ref.id]
    assert entry is not None
    info = entry.lenient()  # an unreadable record can still be removed
    db.execute("DELETE FROM sandboxes WHERE id = ?", (ref.id,))
    draft.drop(ref.id)
    event = draft.append(db, now, owner_uid, Event(
        seq=0, time=utc(now), sandbox=ref.name, sandbox_id=ref.id, state=state,
        run_id=run_id, detail="removed"))
    return info, event


class Store(Runs):
    """Typed access to the database; build it with `open_store`."""

    # --- sandboxes -----------------------------------------------------------

    async def create_sandbox(self, spec: LaunchSpec, *, owner: Owner, now: float,
                             max_owned: int | None = None) -> tuple[SandboxInfo, Event]:
        """Record a new sandbox in state `created`.

        `Conflict` if the name is taken; `LimitReached` if `owner` already has
        `max_owned` sandboxes (counted in the same transaction).
        """
        return await self._change(functools.partial(_create, spec=spec, owner=owner, now=now,
                                                    max_owned=max_owned))

    def entry(self, name: str) -> Entry:
        """The committed record named `name`, as memory holds it; `NotFound` if none."""
        return self.records.named(name)

    def lookup(self, name: str, *, lenient: bool = False) -> SandboxInfo:
        """The sandbox named `name`, from memory. An unreadable record raises `Unreadable`,
        or with `lenient` comes back as far as it can be read (no spec, no run, no labels):
        enough to see whose it is and to remove it."""
        entry = self.records.named(name)
        return entry.lenient() if lenient else entry.info()

    async def get_sandbox(self, name: str, *, lenient: bool = False) -> SandboxInfo:
        """`lookup`, for callers that await."""
        return self.lookup(name, lenient=lenient)

    async def get(self, ref: SandboxRef) -> SandboxInfo:
        """The record `ref` names; `NotFound` if it is gone (even if its name is reused)."""
        return self.records.of(ref).info()

    def entries(self, *, state: State | None = None, label: tuple[str, str] | None = None,
                owner_uid: int | None = None, after: int = 0, limit: int | None = None,
                with_spec: bool = True) -> list[Entry]:
        """Up to `limit` entries readable in the shape asked for (`with_spec`), matching
        every filter given, by id (creation order), after id `after`. Unreadable ones are
        skipped, do not count, and are reported once (`unreadable`)."""
        out: list[Entry] = []
        if limit is not None and limit <= 0:
            return out
        for entry in self.records.select(state=state, label=label, owner_uid=owner_uid,
                                         after=after):
            shape = entry.full if with_spec else entry.brief
            if isinstance(shape, Unreadable):
                if shape.name not in self.unreadable:
                    log.error("skipping an unreadable record: %s", shape)
                self.unreadable[shape.name] = shape.message
                continue
            out.append(entry)
            if limit is not None and len(out) >= limit:
                break
        return out

    async def list_sandboxes(self, *, state: State | None = None,
                             label: tuple[str, str] | None = None,
                             owner_uid: int | None = None, after: int = 0,
                             limit: int | None = None, with_spec: bool = True,
                             ) -> list[SandboxInfo]:
        """`entries`, as records."""
        return [e.info(with_spec=with_spec)
                for e in self.entries(state=state, label=label, owner_uid=owner_uid,
                                      after=after, limit=limit, with_spec=with_spec)]

    async def owner(self, ref: SandboxRef) -> Owner:
        """Who owns `ref`, with the gid and groups recorded when it was created."""
        return self.records.of(ref).owner

    async def remove_sandbox(self, ref: SandboxRef, *, now: float,
                             expect: Collection[State] | None = None,
                             ) -> tuple[SandboxInfo, Event]:
        """Delete a sandbox and its runs; return what it was.

        There is no "removed" state: the event carries the sandbox's last
        state, its current run and `detail="removed"`. With `expect`, a state
        outside it is a `Conflict` (checked in the same transaction). A live
        run's record goes too: stop its worker first.
        """
        info, event = await self._change(functools.partial(
            _remove, ref=ref, now=now, expect=expect, known=self._latest(ref.id)))
        self.unreadable.pop(ref.name, None)
        return info, event

    def counts(self, owner_uid: int | None = None) -> dict[str, int]:
        """Number of sandboxes in each state (of `owner_uid`'s); every state is present."""
        return self.records.counts(owner_uid)

    async def counts_by_state(self, owner_uid: int | None = None) -> dict[str, int]:
        """`counts`, for callers that await."""
        return self.counts(owner_uid)

    async def sandbox_ids(self) -> set[int]:
        """The id of every sandbox on record (to find console logs that belong to none)."""
        return set(self.records.by_id)

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

        def prune(db: Connection, draft: Draft) -> int:
            return db.execute("DELETE FROM events WHERE seq <= (SELECT seq FROM events"
                              " ORDER BY seq DESC LIMIT 1 OFFSET ?)", (keep,)).rowcount
        return await self._change(prune)


@asynccontextmanager
async def open_store(path: Path, *, on_event: OnEvent | None = None) -> AsyncIterator[Store]:
    """Open (creating and migrating if needed) the database at `path`; close it on exit.

    `on_event`, if given, is called after each COMMIT with every event that
    transaction appended (never for a rolled-back one), in `seq` order; it
    must neither block nor raise (the change is already on disk).
    """
    db = await connect(path)
    try:
        yield Store(db, await load_records(db), on_event)
    finally:
        with anyio.CancelScope(shield=True):
            await db.close()
