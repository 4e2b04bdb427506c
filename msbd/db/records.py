"""Rows to records: the SELECTs the store runs and how each row becomes a typed struct.

Pure functions over sqlite3 rows (tuples), no I/O, so the store's module is
only about transactions. A row that cannot be decoded (a spec written by a
newer msbd, a state this code does not know, a hand-edited file) raises
`Unreadable`; the store decides whether that fails the call (reading that one
sandbox) or only skips the row (listing, counting) so one bad record never
fails a call for everyone.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from msbd.errors import StoreError
from msbd.model import Event, LaunchSpec, Owner, Reason, RunInfo, SandboxInfo, State
from msbd.network import Network, PortMap

Row = Sequence[Any]  # a raw sqlite3 row (a tuple): the untyped edge

SPEC_DECODER: Final = msgspec.json.Decoder(LaunchSpec)
LABELS_DECODER: Final = msgspec.json.Decoder(dict[str, str])
GROUPS_DECODER: Final = msgspec.json.Decoder(tuple[int, ...])
PORTS_DECODER: Final = msgspec.json.Decoder(list[PortMap])
NETWORKS: Final = {n.value: n for n in Network}
ENCODER: Final = msgspec.json.Encoder()
STATES: Final = {s.value: s for s in State}
REASONS: Final = {r.value: r for r in Reason}
_UTC: Final = dt.UTC

# The columns of `sandbox_row`; `{spec}` is `s.spec` or NULL (list entries
# leave the spec out unless asked: decoding specs is most of a list's cost, so
# what every entry shows is kept in columns of its own: labels, network, ports).
SANDBOX_COLUMNS: Final = """
s.id, s.name, s.state, s.owner_uid, {spec}, s.labels, s.created_at, s.updated_at,
r.id, r.pid, r.started_at, r.ended_at, r.reason, r.exit_code, r.signal, r.detail,
s.network, s.ports
"""
SANDBOX_FROM: Final = " FROM sandboxes AS s LEFT JOIN runs AS r ON r.id = s.current_run "
SANDBOX_SELECT: Final = "SELECT" + SANDBOX_COLUMNS.format(spec="s.spec") + SANDBOX_FROM
EVENT_SELECT: Final = """
SELECT seq, time, sandbox, state, run_id, reason, exit_code, signal, detail, sandbox_id
FROM events
"""
INSERT_EVENT: Final = """
INSERT INTO events (time, sandbox, sandbox_id, owner_uid, state, run_id, reason, exit_code,
                    signal, detail)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


class Unreadable(StoreError):
    """One stored row cannot be decoded; `name` says whose."""

    def __init__(self, what: str, name: str, problem: object) -> None:
        super().__init__(f"the record of {what} is unreadable: {problem}",
                         data={"sandbox": name})
        self.name = name


def utc(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, _UTC)


def sandbox_row(row: Row) -> SandboxInfo:
    """A `SANDBOX_SELECT` row as a `SandboxInfo` (spec None if the row has none)."""
    (sandbox_id, name, state, owner_uid, spec_json, labels_json, created_at, updated_at,
     run_id, pid, started_at, ended_at, reason, exit_code, signal, detail, network,
     ports_json) = row
    try:
        spec = None if spec_json is None else SPEC_DECODER.decode(spec_json)
        labels = spec.labels if spec is not None else LABELS_DECODER.decode(labels_json)
        ports = spec.ports if spec is not None else PORTS_DECODER.decode(ports_json)
        run = None if run_id is None else RunInfo(
            id=run_id, pid=pid, started_at=utc(started_at),
            ended_at=None if ended_at is None else utc(ended_at),
            reason=None if reason is None else REASONS[reason],
            exit_code=exit_code, signal=signal, detail=detail)
        return SandboxInfo(id=sandbox_id, name=name, state=STATES[state], owner_uid=owner_uid,
                           spec=spec, created_at=utc(created_at), updated_at=utc(updated_at),
                           labels=labels, run=run,
                           network=None if network is None else NETWORKS[network], ports=ports)
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
        raise Unreadable(f"sandbox {name!r}", str(name), exc) from exc


def owner_row(uid: int, gid: int | None, groups_json: str | None) -> Owner:
    try:
        groups = None if groups_json is None else GROUPS_DECODER.decode(groups_json)
    except msgspec.DecodeError:
        groups = None  # unreadable: treated like a record from before groups were kept
    return Owner(uid=uid, gid=gid, groups=groups)


def event_row(row: Row) -> Event:
    seq, time, sandbox, state, run_id, reason, exit_code, signal, detail, sandbox_id = row
    try:
        return Event(seq=seq, time=utc(time), sandbox=sandbox, sandbox_id=sandbox_id,
                     state=STATES[state], run_id=run_id,
                     reason=None if reason is None else REASONS[reason],
                     exit_code=exit_code, signal=signal, detail=detail)
    except (KeyError, TypeError, ValueError) as exc:
        raise Unreadable(f"event {seq}", str(sandbox), exc) from exc


def event_values(event: Event, owner_uid: int, now: float) -> tuple[Any, ...]:
    """The `INSERT_EVENT` parameters of `event` (its `seq` is the database's to give)."""
    return (now, event.sandbox, event.sandbox_id, owner_uid, event.state.value, event.run_id,
            None if event.reason is None else event.reason.value, event.exit_code,
            event.signal, event.detail)
