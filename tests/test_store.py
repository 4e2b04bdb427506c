"""The SQLite store against a real database file under tmp_path."""

from __future__ import annotations

import datetime as dt
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from msbd.db import schema
from msbd.db.store import LiveRun, RunEnd, Store, open_store
from msbd.errors import Conflict, NotFound, StoreError
from msbd.model import LIVE_STATES, Event, LaunchSpec, Reason, State

T0 = 1_700_000_000.0


def spec(name: str, **labels: str) -> LaunchSpec:
    return LaunchSpec(name=name, exec="/bin/sh", rootfs="/srv/root", args=["-c", "true"],
                      env={"A": "1"}, labels=labels)


def utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "msbd.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    async with open_store(db_path) as store:
        yield store


async def start(store: Store, name: str, now: float, pid: int = 4242) -> None:
    await store.transition(name, State.STARTING, now=now, expect={State.CREATED, State.STOPPED},
                           start_run=True, pid=pid, proc_start=777, boot_id="boot-a")
    await store.transition(name, State.RUNNING, now=now + 1, expect={State.STARTING})


def sql(path: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(query).fetchall()
    conn.close()
    return rows


# --- create, get, list, remove ----------------------------------------------------


async def test_create_then_get(store: Store) -> None:
    launch = spec("web-1", team="a")
    info, event = await store.create_sandbox(launch, owner_uid=1000, now=T0)
    assert info.name == "web-1"
    assert info.state is State.CREATED
    assert info.owner_uid == 1000
    assert info.spec == launch
    assert info.labels == {"team": "a"}
    assert info.created_at == info.updated_at == utc(T0)
    assert info.created_at.tzinfo is dt.UTC
    assert info.run is None
    assert event == Event(seq=1, time=utc(T0), sandbox="web-1", state=State.CREATED)
    assert await store.get_sandbox("web-1") == info


async def test_get_unknown_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound) as err:
        await store.get_sandbox("nope")
    assert err.value.data == {"sandbox": "nope"}


async def test_duplicate_name_is_conflict_and_first_record_untouched(store: Store) -> None:
    first, _ = await store.create_sandbox(spec("dup", v="1"), owner_uid=1000, now=T0)
    with pytest.raises(Conflict) as err:
        await store.create_sandbox(spec("dup", v="2"), owner_uid=2000, now=T0 + 5)
    assert str(err.value) == "sandbox 'dup' already exists"
    assert err.value.data == {"sandbox": "dup"}
    assert await store.get_sandbox("dup") == first
    assert [e.seq for e in await store.events_since(0)] == [1]


async def test_list_filters_and_order(store: Store) -> None:
    await store.create_sandbox(spec("b", team="x"), owner_uid=1000, now=T0 + 1)
    await store.create_sandbox(spec("a", team="x"), owner_uid=1000, now=T0 + 1)
    await store.create_sandbox(spec("c", team="y"), owner_uid=2000, now=T0)
    await start(store, "b", T0 + 10)

    async def names(**filters: object) -> list[str]:
        return [i.name for i in await store.list_sandboxes(**filters)]  # type: ignore[arg-type]

    assert await names() == ["c", "a", "b"]  # by created_at, then name
    assert await names(state=State.CREATED) == ["c", "a"]
    assert await names(state=State.RUNNING) == ["b"]
    assert await names(state=State.FAILED) == []
    assert await names(label=("team", "x")) == ["a", "b"]
    assert await names(label=("team", "z")) == []
    assert await names(label=("nope", "x")) == []
    assert await names(owner_uid=2000) == ["c"]
    assert await names(owner_uid=1000, label=("team", "x"), state=State.CREATED) == ["a"]
    running = (await store.list_sandboxes(state=State.RUNNING))[0]
    assert running == await store.get_sandbox("b")
    assert running.run is not None


@pytest.mark.parametrize(("key", "value"), [
    ("app.kubernetes.io/name", "web"),
    ("a.b", 'say "hi"'),
    ("quote", "it's"),
    ("path", "$.team"),
    ("like", "%_*"),
    ("slash", "a/b\\c"),
    ("num", "1"),
    ("empty", ""),
    ("unicode", "žluťoučký 🐎"),
])
async def test_label_filter_with_odd_characters(store: Store, key: str, value: str) -> None:
    await store.create_sandbox(spec("odd", **{key: value, "a": "b"}), owner_uid=1, now=T0)
    await store.create_sandbox(spec("near", **{key: value + "x", key + "x": value}),
                               owner_uid=1, now=T0 + 1)
    assert [i.name for i in await store.list_sandboxes(label=(key, value))] == ["odd"]
    assert (await store.get_sandbox("odd")).labels == {key: value, "a": "b"}


async def test_label_key_is_not_a_json_path(store: Store) -> None:
    await store.create_sandbox(spec("nested", a="b"), owner_uid=1, now=T0)
    await store.create_sandbox(spec("dotted", **{"a.b": "c"}), owner_uid=1, now=T0)
    assert [i.name for i in await store.list_sandboxes(label=("a.b", "c"))] == ["dotted"]
    assert [i.name for i in await store.list_sandboxes(label=("a", "b"))] == ["nested"]


async def test_remove(store: Store, db_path: Path) -> None:
    await store.create_sandbox(spec("gone", k="v"), owner_uid=1000, now=T0)
    await start(store, "gone", T0 + 1)
    await store.transition("gone", State.STOPPED, now=T0 + 3, expect={State.RUNNING},
                           end=RunEnd(reason=Reason.EXITED, exit_code=0))
    last = await store.get_sandbox("gone")
    assert last.run is not None

    info, event = await store.remove_sandbox("gone", now=T0 + 9)
    assert info == last
    assert event == Event(seq=5, time=utc(T0 + 9), sandbox="gone", state=State.STOPPED,
                          run_id=last.run.id, detail="removed")
    with pytest.raises(NotFound):
        await store.get_sandbox("gone")
    assert await store.list_sandboxes() == []
    assert sql(db_path, "SELECT count(*) FROM runs") == [(0,)]  # cascaded
    # Events are history: they outlive the sandbox.
    assert [e.seq for e in await store.events_since(0)] == [1, 2, 3, 4, 5]
    assert (await store.events_since(4)) == [event]


async def test_remove_unknown_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.remove_sandbox("ghost", now=T0)
    assert await store.last_seq() == 0


async def test_remove_with_wrong_state_is_conflict_and_keeps_it(store: Store) -> None:
    await store.create_sandbox(spec("live"), owner_uid=1000, now=T0)
    await start(store, "live", T0 + 1)
    with pytest.raises(Conflict) as err:
        await store.remove_sandbox("live", now=T0 + 2, expect={State.CREATED, State.STOPPED})
    assert str(err.value) == "sandbox 'live' is running"
    assert err.value.data == {"sandbox": "live", "state": "running"}
    assert (await store.get_sandbox("live")).state is State.RUNNING
    assert await store.last_seq() == 3


async def test_records_survive_close_and_reopen(db_path: Path) -> None:
    async with open_store(db_path) as store:
        created, _ = await store.create_sandbox(spec("keep", x="1"), owner_uid=7, now=T0)
        await start(store, "keep", T0 + 1)
        before = await store.get_sandbox("keep")
    async with open_store(db_path) as store:
        assert await store.get_sandbox("keep") == before
        assert before.spec == created.spec
        assert await store.last_seq() == 3
        _, event = await store.create_sandbox(spec("next"), owner_uid=7, now=T0 + 2)
        assert event.seq == 4


# --- migrations --------------------------------------------------------------------


async def test_new_database_is_at_latest_version_and_reopen_is_idempotent(
        db_path: Path) -> None:
    async with open_store(db_path) as store:
        await store.create_sandbox(spec("one"), owner_uid=1, now=T0)
    assert sql(db_path, "PRAGMA user_version") == [(schema.LATEST,)]
    tables = sql(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'"
                          " AND name NOT LIKE 'sqlite_%' ORDER BY name")
    assert tables == [("events",), ("runs",), ("sandboxes",)]
    async with open_store(db_path) as store:
        assert [i.name for i in await store.list_sandboxes()] == ["one"]
    assert sql(db_path, "PRAGMA user_version") == [(schema.LATEST,)]
    assert sql(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_database_newer_than_code_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir()
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {schema.LATEST + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this msbd"):
        async with open_store(db_path):
            pytest.fail("opened a database from the future")
    assert sql(db_path, "PRAGMA user_version") == [(schema.LATEST + 1,)]
    assert sql(db_path, "SELECT count(*) FROM sqlite_master") == [(0,)]


async def test_a_file_that_is_not_a_database_is_a_store_error(db_path: Path) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the database"):
        async with open_store(db_path):
            pytest.fail("opened garbage")


async def test_file_modes(db_path: Path) -> None:
    async with open_store(db_path) as store:
        await store.create_sandbox(spec("m"), owner_uid=1, now=T0)
        wal = db_path.with_name(db_path.name + "-wal")
        assert wal.exists()
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


async def test_integrity_after_a_busy_life(db_path: Path) -> None:
    async with open_store(db_path) as store:
        for i in range(20):
            await store.create_sandbox(spec(f"s{i}", i=str(i)), owner_uid=i % 3, now=T0 + i)
            await start(store, f"s{i}", T0 + i)
        for i in range(0, 20, 2):
            await store.transition(f"s{i}", State.STOPPED, now=T0 + 50, expect={State.RUNNING},
                                   end=RunEnd(reason=Reason.KILLED, signal=9))
            await store.remove_sandbox(f"s{i}", now=T0 + 60)
        await store.prune_events(keep=10)
    assert sql(db_path, "PRAGMA integrity_check") == [("ok",)]
    assert sql(db_path, "PRAGMA foreign_key_check") == []


# --- transitions -------------------------------------------------------------------


async def test_run_lifecycle(store: Store) -> None:
    await store.create_sandbox(spec("vm"), owner_uid=1000, now=T0)
    info, event = await store.transition("vm", State.STARTING, now=T0 + 1,
                                         expect={State.CREATED}, start_run=True, pid=4242)
    assert info.state is State.STARTING
    assert info.updated_at == utc(T0 + 1)
    assert info.created_at == utc(T0)
    assert info.run is not None
    run_id = info.run.id
    assert (info.run.pid, info.run.started_at, info.run.ended_at) == (4242, utc(T0 + 1), None)
    assert event == Event(seq=2, time=utc(T0 + 1), sandbox="vm", state=State.STARTING,
                          run_id=run_id)
    assert await store.live_runs() == [LiveRun(
        name="vm", run_id=run_id, state=State.STARTING, pid=4242, proc_start=None,
        boot_id=None, started_at=utc(T0 + 1))]

    info, _ = await store.transition("vm", State.RUNNING, now=T0 + 2, expect={State.STARTING},
                                     proc_start=98765, boot_id="b-1")
    assert info.run is not None
    assert info.run.pid == 4242  # kept: only what is given changes
    assert (await store.live_runs())[0].proc_start == 98765
    assert (await store.live_runs())[0].boot_id == "b-1"

    info, event = await store.transition(
        "vm", State.STOPPED, now=T0 + 3, expect={State.RUNNING, State.STOPPING},
        end=RunEnd(reason=Reason.KILLED, exit_code=None, signal=9, detail="SIGKILL"))
    assert info.state is State.STOPPED
    assert info.run is not None
    assert info.run.id == run_id
    assert info.run.ended_at == utc(T0 + 3)
    assert (info.run.reason, info.run.exit_code, info.run.signal, info.run.detail) == (
        Reason.KILLED, None, 9, "SIGKILL")
    assert event == Event(seq=4, time=utc(T0 + 3), sandbox="vm", state=State.STOPPED,
                          run_id=run_id, reason=Reason.KILLED, signal=9, detail="SIGKILL")
    assert await store.live_runs() == []
    assert await store.get_sandbox("vm") == info

    # A restart is a new run; the sandbox points at it.
    info, _ = await store.transition("vm", State.STARTING, now=T0 + 4, expect={State.STOPPED},
                                     start_run=True, pid=5555)
    assert info.run is not None
    assert info.run.id > run_id
    assert (info.run.pid, info.run.ended_at, info.run.reason) == (5555, None, None)


async def test_event_detail_prefers_the_transition_detail(store: Store) -> None:
    await store.create_sandbox(spec("d"), owner_uid=1, now=T0)
    await store.transition("d", State.STARTING, now=T0, expect={State.CREATED}, start_run=True)
    _, event = await store.transition(
        "d", State.FAILED, now=T0 + 1, expect={State.STARTING}, detail="no libkrun",
        end=RunEnd(reason=Reason.LAUNCH_FAILED, exit_code=2, detail="fd 96: missing"))
    assert (event.detail, event.reason, event.exit_code) == (
        "no libkrun", Reason.LAUNCH_FAILED, 2)
    run = (await store.get_sandbox("d")).run
    assert run is not None
    assert run.detail == "fd 96: missing"


async def test_wrong_expected_state_is_conflict_and_writes_nothing(store: Store) -> None:
    await store.create_sandbox(spec("w"), owner_uid=1, now=T0)
    before = await store.get_sandbox("w")
    with pytest.raises(Conflict) as err:
        await store.transition("w", State.STOPPING, now=T0 + 1, expect={State.RUNNING})
    assert str(err.value) == "sandbox 'w' is created"
    assert err.value.data == {"sandbox": "w", "state": "created"}
    with pytest.raises(Conflict):
        await store.transition("w", State.STARTING, now=T0 + 1, expect=(), start_run=True)
    assert await store.get_sandbox("w") == before
    assert await store.last_seq() == 1
    assert await store.live_runs() == []


async def test_transition_of_unknown_sandbox_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.transition("x", State.STARTING, now=T0, expect={State.CREATED})


@pytest.mark.parametrize(("setup_running", "to", "kwargs", "problem"), [
    (False, State.STARTING, {}, "must have an open run"),
    (False, State.STOPPED, {"pid": 1}, "no open run"),
    (False, State.STOPPED, {"end": RunEnd(reason=Reason.EXITED)}, "no open run"),
    (True, State.STARTING, {"start_run": True}, "still open"),
    (True, State.STOPPED, {}, "must not have an open run"),
    (True, State.STOPPING, {"end": RunEnd(reason=Reason.EXITED)}, "must have an open run"),
])
async def test_run_invariant_violations_are_refused(
        store: Store, setup_running: bool, to: State, kwargs: dict[str, object],
        problem: str) -> None:
    await store.create_sandbox(spec("inv"), owner_uid=1, now=T0)
    if setup_running:
        await start(store, "inv", T0)
    before = await store.get_sandbox("inv")
    seq = await store.last_seq()
    with pytest.raises(StoreError, match=problem):
        await store.transition("inv", to, now=T0 + 5, expect=set(State),
                               **kwargs)  # type: ignore[arg-type]
    assert await store.get_sandbox("inv") == before
    assert await store.last_seq() == seq


# --- events --------------------------------------------------------------------------


async def test_events_since_returns_exactly_the_missed_ones(store: Store) -> None:
    assert await store.last_seq() == 0
    assert await store.events_since(0) == []
    await store.create_sandbox(spec("e1"), owner_uid=1, now=T0)
    await store.create_sandbox(spec("e2"), owner_uid=2, now=T0 + 1)
    seen = await store.last_seq()
    await start(store, "e1", T0 + 2)
    _, removed = await store.remove_sandbox("e2", now=T0 + 5)
    missed = await store.events_since(seen)
    assert [(e.seq, e.sandbox, e.state) for e in missed] == [
        (3, "e1", State.STARTING), (4, "e1", State.RUNNING), (5, "e2", State.CREATED)]
    assert missed[-1] == removed
    assert await store.last_seq() == 5
    assert await store.events_since(5) == []
    assert [e.seq for e in await store.events_since(0, limit=2)] == [1, 2]
    assert [e.seq for e in await store.events_since(1, owner_uid=2)] == [2, 5]
    assert [e.seq for e in await store.events_since(0, owner_uid=3)] == []


async def test_prune_keeps_the_newest_and_never_reuses_seqs(store: Store) -> None:
    for i in range(10):
        await store.create_sandbox(spec(f"p{i}"), owner_uid=1, now=T0 + i)
    assert await store.prune_events(keep=3) == 7
    assert [e.seq for e in await store.events_since(0)] == [8, 9, 10]
    assert await store.prune_events(keep=3) == 0
    assert await store.prune_events(keep=0) == 3
    assert await store.events_since(0) == []
    assert await store.last_seq() == 10
    _, event = await store.create_sandbox(spec("after"), owner_uid=1, now=T0 + 20)
    assert event.seq == 11
    with pytest.raises(ValueError, match="keep"):
        await store.prune_events(keep=-1)


async def test_concurrent_transitions_all_land_with_gap_free_seqs(store: Store) -> None:
    names = [f"c{i:02}" for i in range(50)]
    for i, name in enumerate(names):
        await store.create_sandbox(spec(name), owner_uid=1, now=T0 + i)
    events: list[Event] = []

    async def life(name: str, i: int) -> None:
        _, e1 = await store.transition(name, State.STARTING, now=T0 + 100, expect={State.CREATED},
                                       start_run=True, pid=10_000 + i)
        _, e2 = await store.transition(name, State.RUNNING, now=T0 + 101,
                                       expect={State.STARTING})
        events.extend((e1, e2))

    async with anyio.create_task_group() as tg:
        for i, name in enumerate(names):
            tg.start_soon(life, name, i)

    assert sorted(e.seq for e in events) == list(range(51, 151))
    logged = await store.events_since(0, limit=10_000)
    assert [e.seq for e in logged] == list(range(1, 151))
    assert await store.counts_by_state() == {
        "created": 0, "starting": 0, "running": 50, "stopping": 0, "stopped": 0, "failed": 0}
    runs = await store.live_runs()
    assert sorted((r.name, r.pid) for r in runs) == [(n, 10_000 + i) for i, n in enumerate(names)]
    assert len({r.run_id for r in runs}) == 50


async def test_racing_transitions_on_one_sandbox_have_one_winner(store: Store) -> None:
    await store.create_sandbox(spec("race"), owner_uid=1, now=T0)
    outcomes: list[str] = []

    async def try_start(i: int) -> None:
        try:
            await store.transition("race", State.STARTING, now=T0 + 1, expect={State.CREATED},
                                   start_run=True, pid=i)
        except Conflict:
            outcomes.append("conflict")
        else:
            outcomes.append("won")

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(try_start, i)
    assert sorted(outcomes) == ["conflict"] * 49 + ["won"]
    assert await store.last_seq() == 2
    assert len(await store.live_runs()) == 1


@pytest.mark.parametrize("checkpoints", range(12))
async def test_cancelled_writer_leaves_all_or_nothing(store: Store, checkpoints: int) -> None:
    await store.create_sandbox(spec("cx"), owner_uid=1, now=T0)

    async def cancel_after(scope: anyio.CancelScope) -> None:
        for _ in range(checkpoints):
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_after, tg.cancel_scope)
        await store.transition("cx", State.STARTING, now=T0 + 1, expect={State.CREATED},
                               start_run=True, pid=1)
        await anyio.sleep_forever()

    info = await store.get_sandbox("cx")
    seqs = [e.seq for e in await store.events_since(0)]
    if info.state is State.CREATED:
        assert (info.run, seqs) == (None, [1])
    else:
        assert info.state is State.STARTING
        assert info.run is not None
        assert seqs == [1, 2]
    # The shared connection is not stuck inside a half-done transaction.
    _, event = await store.create_sandbox(spec("after"), owner_uid=1, now=T0 + 2)
    assert event.seq == seqs[-1] + 1


# --- reconciliation and counts ------------------------------------------------------------


async def test_live_runs_and_counts(store: Store) -> None:
    assert await store.live_runs() == []
    assert await store.counts_by_state() == {s.value: 0 for s in State}
    for name in ("idle", "up", "going", "done"):
        await store.create_sandbox(spec(name), owner_uid=1, now=T0)
    await store.transition("up", State.STARTING, now=T0 + 1, expect={State.CREATED},
                           start_run=True, pid=11, proc_start=111, boot_id="bt")
    await start(store, "going", T0 + 2, pid=22)
    await store.transition("going", State.STOPPING, now=T0 + 3, expect={State.RUNNING})
    await start(store, "done", T0 + 4, pid=33)
    await store.transition("done", State.STOPPED, now=T0 + 5, expect={State.RUNNING},
                           end=RunEnd(reason=Reason.EXITED, exit_code=0))

    live = await store.live_runs()
    assert [(r.name, r.state, r.pid) for r in live] == [
        ("up", State.STARTING, 11), ("going", State.STOPPING, 22)]
    assert (live[0].proc_start, live[0].boot_id, live[0].started_at) == (111, "bt", utc(T0 + 1))
    assert {r.state for r in live} <= LIVE_STATES
    assert await store.counts_by_state() == {
        "created": 1, "starting": 1, "running": 0, "stopping": 1, "stopped": 1, "failed": 0}


async def test_concurrent_opens_of_one_file_migrate_once(db_path: Path) -> None:
    opened: list[Store] = []
    all_open = anyio.Event()

    async def hold() -> None:
        async with open_store(db_path) as store:
            opened.append(store)
            if len(opened) == 4:
                all_open.set()
            await all_open.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(hold)
    assert sql(db_path, "PRAGMA user_version") == [(schema.LATEST,)]


async def test_caller_cancelled_before_the_transaction_writes_nothing(store: Store) -> None:
    await store.create_sandbox(spec("pre"), owner_uid=1, now=T0)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.transition("pre", State.STARTING, now=T0 + 1, expect={State.CREATED},
                               start_run=True, pid=1)
    assert scope.cancelled_caught
    assert (await store.get_sandbox("pre")).state is State.CREATED
    assert await store.last_seq() == 1


async def test_set_run_process_records_the_pid_without_an_event(store: Store) -> None:
    await store.create_sandbox(spec("sp"), owner_uid=1, now=T0)
    info, _ = await store.transition("sp", State.STARTING, now=T0 + 1, expect={State.CREATED},
                                     start_run=True)
    assert info.run is not None
    assert info.run.pid is None
    await store.set_run_process("sp", info.run.id, pid=321, proc_start=5000, boot_id="bb")
    assert await store.live_runs() == [LiveRun(
        name="sp", run_id=info.run.id, state=State.STARTING, pid=321, proc_start=5000,
        boot_id="bb", started_at=utc(T0 + 1))]
    assert await store.last_seq() == 2
    with pytest.raises(NotFound):
        await store.set_run_process("sp", info.run.id + 1, pid=1, proc_start=None, boot_id=None)
    with pytest.raises(NotFound):
        await store.set_run_process("other", info.run.id, pid=1, proc_start=None, boot_id=None)
    # A worker that died at once: the ended run still learns its pid.
    await store.transition("sp", State.FAILED, now=T0 + 2, expect={State.STARTING},
                           end=RunEnd(reason=Reason.LAUNCH_FAILED, exit_code=3))
    await store.set_run_process("sp", info.run.id, pid=999, proc_start=1, boot_id="bb")
    run = (await store.get_sandbox("sp")).run
    assert run is not None
    assert (run.pid, run.reason, run.exit_code) == (999, Reason.LAUNCH_FAILED, 3)


async def test_end_runs_closes_every_live_run_in_one_go(store: Store) -> None:
    for name in ("r1", "r2", "idle"):
        await store.create_sandbox(spec(name), owner_uid=1, now=T0)
    await start(store, "r1", T0 + 1)
    await store.transition("r2", State.STARTING, now=T0 + 2, expect={State.CREATED},
                           start_run=True)
    lost = RunEnd(reason=Reason.DAEMON_LOST, detail="worker gone")
    results = await store.end_runs([("r1", lost), ("r2", lost)], now=T0 + 10)
    assert [(i.name, i.state, e.state, e.reason, e.detail) for i, e in results] == [
        ("r1", State.STOPPED, State.STOPPED, Reason.DAEMON_LOST, "worker gone"),
        ("r2", State.STOPPED, State.STOPPED, Reason.DAEMON_LOST, "worker gone")]
    for info, _ in results:
        assert info.run is not None
        assert info.run.ended_at == utc(T0 + 10)
    assert await store.live_runs() == []
    assert await store.end_runs([], now=T0 + 11) == []


async def test_end_runs_is_all_or_nothing(store: Store) -> None:
    for name in ("live", "idle"):
        await store.create_sandbox(spec(name), owner_uid=1, now=T0)
    await start(store, "live", T0 + 1)
    seq = await store.last_seq()
    lost = RunEnd(reason=Reason.DAEMON_LOST)
    with pytest.raises(Conflict, match="'idle' is created"):
        await store.end_runs([("live", lost), ("idle", lost)], now=T0 + 10)
    assert (await store.get_sandbox("live")).state is State.RUNNING
    assert len(await store.live_runs()) == 1
    assert await store.last_seq() == seq


async def test_on_event_sees_committed_events_in_seq_order(db_path: Path) -> None:
    published: list[tuple[int, str, State, int]] = []

    def on_event(event: Event, owner_uid: int) -> None:
        published.append((event.seq, event.sandbox, event.state, owner_uid))

    async with open_store(db_path, on_event=on_event) as store:
        await store.create_sandbox(spec("o1"), owner_uid=10, now=T0)
        with pytest.raises(Conflict):
            await store.create_sandbox(spec("o1"), owner_uid=20, now=T0)
        with pytest.raises(Conflict):
            await store.transition("o1", State.RUNNING, now=T0, expect={State.STARTING})
        assert published == [(1, "o1", State.CREATED, 10)]

        async def create(i: int) -> None:
            await store.create_sandbox(spec(f"p{i}"), owner_uid=i, now=T0 + 1)

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(create, i)
        await store.remove_sandbox("o1", now=T0 + 2)
    assert [seq for seq, *_ in published] == list(range(1, 33))
    assert published[-1] == (32, "o1", State.CREATED, 10)
    assert {(name, uid) for _, name, _, uid in published[1:-1]} == {
        (f"p{i}", i) for i in range(30)}


async def test_end_runs_returns_the_events_as_stored(store: Store) -> None:
    for i in range(5):
        await store.create_sandbox(spec(f"s{i}"), owner_uid=1, now=T0)
        await start(store, f"s{i}", T0 + 1)
    before = await store.last_seq()
    results = await store.end_runs([(f"s{i}", RunEnd(reason=Reason.DAEMON_LOST, detail=str(i)))
                                    for i in range(5)], now=T0 + 5)
    stored = await store.events_since(before)
    assert [e for _, e in results] == stored
    assert [e.seq for e in stored] == list(range(before + 1, before + 6))
    assert [e.detail for e in stored] == ["0", "1", "2", "3", "4"]
