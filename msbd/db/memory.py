"""Every sandbox's current record, kept in memory: what the daemon's reads are served from.

Why: the daemon is the only writer of its database (the state directory is
locked, one daemon per file), so the file can only change through the
store. Reading it back through the database thread for every `get`, `list`
or `info`, and rebuilding structs row by row, cost far more than the reply
itself. So the store loads every record once, at open, and replaces a
record only after the COMMIT that holds its change (`session` applies a
group's records then, and drops them if the COMMIT fails): a reader never
sees an uncommitted change, and a failed commit leaves memory as the file is.

An `Entry` keeps what a row could be decoded into, in the two shapes readers
ask for: the record without its spec (a list's entries) and with it. A row
that cannot be decoded (`records.Unreadable`) keeps the error in place of
that shape, so lists skip it and a `get` of it fails exactly as when it was
read from the file; its raw state, owner and times still serve counts,
lenient reads and removal. Each shape's JSON is encoded once, on first use,
and kept with it (`json`): a list reply is then those bytes joined.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

import msgspec

from msbd.db.records import (
    ENCODER,
    SANDBOX_COLUMNS,
    SANDBOX_FROM,
    STATES,
    Row,
    Unreadable,
    owner_row,
    sandbox_row,
    utc,
)
from msbd.errors import NotFound
from msbd.model import LaunchSpec, Owner, SandboxInfo, SandboxRef, State

# The columns of `SANDBOX_COLUMNS`, then the owner's gid and groups.
OWNER_COLUMNS: Final = ", s.owner_gid, s.owner_groups"
FULL_SELECT: Final = "SELECT" + SANDBOX_COLUMNS.format(spec="s.spec") + OWNER_COLUMNS + SANDBOX_FROM
BRIEF_SELECT: Final = "SELECT" + SANDBOX_COLUMNS.format(spec="NULL") + OWNER_COLUMNS + SANDBOX_FROM


class Entry:
    """One sandbox's record as the last COMMIT left it (immutable once built)."""

    __slots__ = (
        "_json",
        "brief",
        "created_at",
        "full",
        "id",
        "name",
        "owner",
        "state",
        "updated_at",
    )

    def __init__(self, row: Row, *, full: SandboxInfo | Unreadable | None = None) -> None:
        """From a `FULL_SELECT` or `BRIEF_SELECT` row; `full` is the record with its spec, if known
        already (a spec never changes), else decoded from the row's spec."""
        (self.id, self.name, self.state, uid, _, _, created_at, updated_at) = row[:8]
        self.created_at: float = created_at
        self.updated_at: float = updated_at
        self.owner: Owner = owner_row(uid, row[-2], row[-1])
        brief: SandboxInfo | Unreadable
        try:
            brief = sandbox_row((*row[:4], None, *row[5:18]))
        except Unreadable as exc:
            brief = exc
        self.brief = brief
        if full is None:
            try:
                full = sandbox_row(row[:18])
            except Unreadable as exc:
                full = exc
        elif isinstance(brief, Unreadable):
            full = brief  # the row's own columns are what cannot be read now
        elif isinstance(full, SandboxInfo):
            spec = full.spec
            assert spec is not None
            full = msgspec.structs.replace(brief, spec=spec, labels=spec.labels,
                                           ports=spec.ports)
        # else: the known spec is unreadable, and a spec never changes
        self.full: SandboxInfo | Unreadable = full
        self._json: dict[bool, bytes] = {}

    @property
    def spec(self) -> LaunchSpec | None:
        return self.full.spec if isinstance(self.full, SandboxInfo) else None

    def info(self, *, with_spec: bool = True) -> SandboxInfo:
        """The record (its spec left out unless `with_spec`); `Unreadable` if it cannot be
        read in that shape."""
        shape = self.full if with_spec else self.brief
        if isinstance(shape, Unreadable):
            raise shape
        return shape

    def json(self, *, with_spec: bool) -> bytes:
        """`info(with_spec=…)` as JSON, encoded once."""
        out = self._json.get(with_spec)
        if out is None:
            out = self._json[with_spec] = ENCODER.encode(self.info(with_spec=with_spec))
        return out

    def lenient(self) -> SandboxInfo:
        """As much of the record as can be read: enough to see whose it is and remove it."""
        shape = self.full
        if isinstance(shape, SandboxInfo):
            return shape
        return SandboxInfo(id=self.id, name=self.name, state=STATES.get(self.state, State.STOPPED),
                           owner_uid=self.owner.uid, created_at=utc(self.created_at),
                           updated_at=utc(self.updated_at), labels={})


Staged = dict[int, Entry | None]
"""What a group of changes did to the records: id -> the new entry, or None (removed)."""


class Records:
    """The committed records, by id (creation order) and by name."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.by_id: dict[int, Entry] = {}
        self._by_name: dict[str, int] = {}
        self.apply({e.id: e for e in entries})

    def apply(self, staged: Staged) -> None:
        """Take in what a committed group did. A replaced record keeps its place and a new
        one goes last: ids only grow (AUTOINCREMENT), so `by_id` stays in id order."""
        for sandbox_id, entry in staged.items():
            if entry is None:
                old = self.by_id.pop(sandbox_id, None)
                if old is not None:
                    self._by_name.pop(old.name, None)
            else:
                self.by_id[sandbox_id] = entry
                self._by_name[entry.name] = sandbox_id

    def named(self, name: str) -> Entry:
        sandbox_id = self._by_name.get(name)
        if sandbox_id is None:
            raise NotFound(name)
        return self.by_id[sandbox_id]

    def of(self, ref: SandboxRef) -> Entry:
        entry = self.by_id.get(ref.id)
        if entry is None:
            raise NotFound(ref.name)
        return entry

    def select(self, *, state: State | None, label: tuple[str, str] | None,
               owner_uid: int | None, after: int) -> Iterator[Entry]:
        """The entries matching every filter given, by id, after id `after`."""
        want_state = None if state is None else state.value
        for sandbox_id, entry in self.by_id.items():
            if sandbox_id <= after:
                continue
            if want_state is not None and entry.state != want_state:
                continue
            if owner_uid is not None and entry.owner.uid != owner_uid:
                continue
            if label is not None and not _has_label(entry, *label):
                continue
            yield entry

    def counts(self, owner_uid: int | None) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in State), 0)
        for entry in self.by_id.values():
            if (owner_uid is None or entry.owner.uid == owner_uid) and entry.state in counts:
                counts[entry.state] += 1
        return counts


def _has_label(entry: Entry, key: str, value: str) -> bool:
    """Whether `entry` has the label; an entry that cannot be read at all is let through
    (the list skips it and reports it, as when the filter ran in SQL)."""
    shape = entry.brief
    return not isinstance(shape, SandboxInfo) or shape.labels.get(key) == value

