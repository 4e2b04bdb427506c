"""The SQLite store against a real database file under tmp_path: records, runs, events.

Ids, owners, limits, paging and unreadable rows: test_store_ids.py and
test_store_lists.py; opening and migrating files: test_store_open.py.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import anyio
import pytest
from storekit import T0, create, race, spec, sql, start, utc

from msbd.db.store import LiveRun, RunEnd, Store, open_store
from msbd.errors import Conflict, NotFound, StoreError
from msbd.model import LIVE_STATES, Event, Owner, Reason, SandboxRef, State

# --- create, get, list, remove ----------------------------------------------------


async def test_create_then_get(store: Store) -> None:
    launch = spec("web-1", team="a")
    info, event = await store.create_sandbox(launch, owner=Owner(uid=1000), now=T0)
    assert info.id == 1
    assert info.ref == SandboxRef(1, "web-1")
    assert info.name == "web-1"
    assert info.state is State.CREATED
    assert info.owner_uid == 1000
    assert info.spec == launch
    assert info.labels == {"team": "a"}
    assert info.created_at == info.updated_at == utc(T0)
    assert info.created_at.tzinfo is dt.UTC
    assert info.run is None
    assert event == Event(seq=1, time=utc(T0), sandbox="web-1", sandbox_id=1,
                          state=State.CREATED)
    assert await store.get_sandbox("web-1") == info
    assert await store.get(info.ref) == info
    assert await store.sandbox_ids() == {1}


async def test_get_unknown_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound) as err:
        await store.get_sandbox("nope")
    assert err.value.data == {"sandbox": "nope"}
    with pytest.raises(NotFound) as err:
        await store.get(SandboxRef(7, "nope"))
    assert err.value.data == {"sandbox": "nope"}
    with pytest.raises(NotFound):
        await store.owner(SandboxRef(7, "nope"))
    assert await store.sandbox_ids() == set()


async def test_duplicate_name_is_conflict_and_first_record_untouched(store: Store) -> None:
    first, _ = await store.create_sandbox(spec("dup", v="1"), owner=Owner(uid=1000), now=T0)
    with pytest.raises(Conflict) as err:
        await store.create_sandbox(spec("dup", v="2"), owner=Owner(uid=2000, gid=2000),
                                   now=T0 + 5)
    assert str(err.value) == "sandbox 'dup' already exists"
    assert err.value.data == {"sandbox": "dup"}
    assert await store.get_sandbox("dup") == first
    assert await store.owner(first.ref) == Owner(uid=1000)
    assert await store.sandbox_ids() == {first.id}
    assert [e.seq for e in await store.events_since(0)] == [1]


async def test_list_filters_and_order(store: Store) -> None:
    # Created out of time order and name order: a list is in creation order.
    b = await create(store, "b", uid=1000, now=T0 + 1, team="x")
    await create(store, "a", uid=1000, now=T0 + 1, team="x")
    await create(store, "c", uid=2000, now=T0, team="y")
    await start(store, b.ref, T0 + 10)

    async def names(**filters: object) -> list[str]:
        return [i.name for i in await store.list_sandboxes(**filters)]  # type: ignore[arg-type]

    assert await names() == ["b", "a", "c"]  # by id: not by created_at, not by name
    assert await names(state=State.CREATED) == ["a", "c"]
    assert await names(state=State.RUNNING) == ["b"]
    assert await names(state=State.FAILED) == []
    assert await names(label=("team", "x")) == ["b", "a"]
    assert await names(label=("team", "z")) == []
    assert await names(label=("nope", "x")) == []
    assert await names(owner_uid=2000) == ["c"]
    assert await names(owner_uid=3000) == []
    assert await names(owner_uid=1000, label=("team", "x"), state=State.CREATED) == ["a"]
    running = (await store.list_sandboxes(state=State.RUNNING))[0]
    assert running == await store.get_sandbox("b")
    assert running.run is not None
    assert running.spec == spec("b", team="x")


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
    # Labels as a dict, not as keywords of `create`: a key could be `uid`.
    await store.create_sandbox(spec("odd", **{key: value, "a": "b"}), owner=Owner(uid=1),
                               now=T0)
    await store.create_sandbox(spec("near", **{key: value + "x", key + "x": value}),
                               owner=Owner(uid=1), now=T0 + 1)
    assert [i.name for i in await store.list_sandboxes(label=(key, value))] == ["odd"]
    assert [i.name for i in await store.list_sandboxes(label=(key, value),
                                                       with_spec=False)] == ["odd"]
    assert (await store.get_sandbox("odd")).labels == {key: value, "a": "b"}


async def test_label_key_is_not_a_json_path(store: Store) -> None:
    await create(store, "nested", a="b")
    await store.create_sandbox(spec("dotted", **{"a.b": "c"}), owner=Owner(uid=1), now=T0)
    assert [i.name for i in await store.list_sandboxes(label=("a.b", "c"))] == ["dotted"]
    assert [i.name for i in await store.list_sandboxes(label=("a", "b"))] == ["nested"]


async def test_remove(store: Store, db_path: Path) -> None:
    gone = await create(store, "gone", uid=1000, k="v")
    await start(store, gone.ref, T0 + 1)
    await store.transition(gone.ref, State.STOPPED, now=T0 + 3,
                           end=RunEnd(reason=Reason.EXITED, exit_code=0))
    last = await store.get(gone.ref)
    assert last.run is not None

    info, event = await store.remove_sandbox(gone.ref, now=T0 + 9)
    assert info == last
    assert event == Event(seq=5, time=utc(T0 + 9), sandbox="gone", sandbox_id=gone.id,
                          state=State.STOPPED, run_id=last.run.id, detail="removed")
    with pytest.raises(NotFound):
        await store.get_sandbox("gone")
    with pytest.raises(NotFound):
        await store.get(gone.ref)
    assert await store.list_sandboxes() == []
    assert await store.sandbox_ids() == set()
    assert sql(db_path, "SELECT count(*) FROM runs") == [(0,)]  # cascaded
    # Events are history: they outlive the sandbox.
    assert [e.seq for e in await store.events_since(0)] == [1, 2, 3, 4, 5]
    assert (await store.events_since(4)) == [event]


async def test_remove_unknown_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound) as err:
        await store.remove_sandbox(SandboxRef(1, "ghost"), now=T0)
    assert err.value.data == {"sandbox": "ghost"}
    assert await store.last_seq() == 0


async def test_remove_with_wrong_state_is_conflict_and_keeps_it(store: Store) -> None:
    live = await create(store, "live", uid=1000)
    await start(store, live.ref, T0 + 1)
    before = await store.get(live.ref)
    with pytest.raises(Conflict) as err:
        await store.remove_sandbox(live.ref, now=T0 + 2, expect={State.CREATED, State.STOPPED})
    assert str(err.value) == "sandbox 'live' is running"
    assert err.value.data == {"sandbox": "live", "state": "running"}
    assert await store.get(live.ref) == before
    assert await store.last_seq() == 3


async def test_records_survive_close_and_reopen(db_path: Path) -> None:
    async with open_store(db_path) as store:
        created, _ = await store.create_sandbox(
            spec("keep", x="1"), owner=Owner(uid=7, gid=8, groups=(8, 9)), now=T0)
        await start(store, created.ref, T0 + 1)
        before = await store.get_sandbox("keep")
    async with open_store(db_path) as store:
        assert await store.get_sandbox("keep") == before
        assert await store.get(created.ref) == before
        assert await store.owner(created.ref) == Owner(uid=7, gid=8, groups=(8, 9))
        assert before.spec == created.spec
        assert await store.last_seq() == 3
        info, event = await store.create_sandbox(spec("next"), owner=Owner(uid=7), now=T0 + 2)
        assert (info.id, event.seq) == (created.id + 1, 4)


# --- transitions -------------------------------------------------------------------


async def test_run_lifecycle(store: Store) -> None:
    vm = await create(store, "vm", uid=1000)
    info, owner = await store.begin_run(vm.ref, now=T0 + 1)
    assert owner == Owner(uid=1000)
    assert info.state is State.STARTING
    assert info.updated_at == utc(T0 + 1)
    assert info.created_at == utc(T0)
    assert info.run is not None
    run_id = info.run.id
    assert (info.run.pid, info.run.started_at, info.run.ended_at) == (None, utc(T0 + 1), None)
    assert await store.events_since(1) == [Event(
        seq=2, time=utc(T0 + 1), sandbox="vm", sandbox_id=vm.id, state=State.STARTING,
        run_id=run_id)]
    assert await store.live_runs() == [LiveRun(
        ref=vm.ref, run_id=run_id, state=State.STARTING, pid=None, proc_start=None,
        boot_id=None, started_at=utc(T0 + 1))]

    await store.set_run_process(vm.ref, run_id, pid=4242, proc_start=98765, boot_id="b-1")
    info, event = await store.transition(vm.ref, State.RUNNING, now=T0 + 2)
    assert info.run is not None
    assert info.run.pid == 4242  # kept: a transition changes only the state
    assert event == Event(seq=3, time=utc(T0 + 2), sandbox="vm", sandbox_id=vm.id,
                          state=State.RUNNING, run_id=run_id)
    assert await store.live_runs() == [LiveRun(
        ref=vm.ref, run_id=run_id, state=State.RUNNING, pid=4242, proc_start=98765,
        boot_id="b-1", started_at=utc(T0 + 1))]

    info, event = await store.transition(
        vm.ref, State.STOPPED, now=T0 + 3,
        end=RunEnd(reason=Reason.KILLED, exit_code=None, signal=9, detail="SIGKILL"))
    assert info.state is State.STOPPED
    assert info.run is not None
    assert info.run.id == run_id
    assert info.run.ended_at == utc(T0 + 3)
    assert (info.run.reason, info.run.exit_code, info.run.signal, info.run.detail) == (
        Reason.KILLED, None, 9, "SIGKILL")
    assert event == Event(seq=4, time=utc(T0 + 3), sandbox="vm", sandbox_id=vm.id,
                          state=State.STOPPED, run_id=run_id, reason=Reason.KILLED, signal=9,
                          detail="SIGKILL")
    assert await store.live_runs() == []
    assert await store.get(vm.ref) == info

    # A restart is a new run; the sandbox points at it.
    info, _ = await store.begin_run(vm.ref, now=T0 + 4)
    assert info.run is not None
    assert info.run.id > run_id
    await store.set_run_process(vm.ref, info.run.id, pid=5555, proc_start=None, boot_id=None)
    info = await store.get(vm.ref)
    assert info.run is not None
    assert (info.run.pid, info.run.ended_at, info.run.reason) == (5555, None, None)


async def test_event_detail_prefers_the_transition_detail(store: Store) -> None:
    d = await create(store, "d")
    await store.begin_run(d.ref, now=T0)
    _, event = await store.transition(
        d.ref, State.FAILED, now=T0 + 1, detail="no libkrun",
        end=RunEnd(reason=Reason.LAUNCH_FAILED, exit_code=2, detail="fd 96: missing"))
    assert (event.detail, event.reason, event.exit_code) == (
        "no libkrun", Reason.LAUNCH_FAILED, 2)
    run = (await store.get(d.ref)).run
    assert run is not None
    assert run.detail == "fd 96: missing"
    # Without a transition detail, the event says what the run's end says.
    await store.begin_run(d.ref, now=T0 + 2)
    _, event = await store.transition(
        d.ref, State.STOPPED, now=T0 + 3,
        end=RunEnd(reason=Reason.EXITED, exit_code=0, detail="clean"))
    assert (event.detail, event.reason, event.exit_code) == ("clean", Reason.EXITED, 0)


@pytest.mark.parametrize("to", [State.STOPPING, State.RUNNING, State.STOPPED, State.FAILED,
                                State.CREATED])
async def test_an_illegal_transition_is_a_conflict_and_writes_nothing(
        store: Store, db_path: Path, to: State) -> None:
    """`states.TRANSITIONS` decides: `created` may only go to `starting`."""
    w = await create(store, "w")
    before = await store.get(w.ref)
    with pytest.raises(Conflict) as err:
        await store.transition(w.ref, to, now=T0 + 1)
    assert str(err.value) == f"sandbox 'w' cannot go from created to {to}"
    assert err.value.data == {"sandbox": "w", "state": "created", "to": to.value}
    assert await store.get(w.ref) == before
    assert await store.last_seq() == 1
    assert await store.live_runs() == []
    assert sql(db_path, "SELECT count(*) FROM runs") == [(0,)]


@pytest.mark.parametrize("live", [State.STARTING, State.RUNNING, State.STOPPING])
async def test_begin_run_of_a_live_sandbox_is_a_conflict(store: Store, live: State) -> None:
    inv = await create(store, "inv")
    await store.begin_run(inv.ref, now=T0)
    if live is not State.STARTING:
        await store.transition(inv.ref, State.RUNNING, now=T0 + 1)
    if live is State.STOPPING:
        await store.transition(inv.ref, State.STOPPING, now=T0 + 2)
    before = await store.get(inv.ref)
    with pytest.raises(Conflict, match=f"cannot go from {live} to starting"):
        await store.begin_run(inv.ref, now=T0 + 5)
    assert await store.get(inv.ref) == before


async def test_writes_to_an_unknown_sandbox_are_not_found(store: Store) -> None:
    ghost = SandboxRef(1, "x")
    with pytest.raises(NotFound):
        await store.transition(ghost, State.STARTING, now=T0)
    with pytest.raises(NotFound):
        await store.begin_run(ghost, now=T0)
    with pytest.raises(NotFound):
        await store.set_run_process(ghost, 1, pid=1, proc_start=None, boot_id=None)
    with pytest.raises(NotFound):
        await store.end_runs([(ghost, RunEnd(reason=Reason.DAEMON_LOST))], now=T0)
    assert await store.last_seq() == 0


@pytest.mark.parametrize(("setup_running", "to", "kwargs", "problem"), [
    (False, State.STARTING, {}, "must have an open run"),
    (True, State.STOPPED, {}, "must not have an open run"),
    (True, State.STOPPING, {"end": RunEnd(reason=Reason.EXITED)}, "must have an open run"),
])
async def test_run_invariant_violations_are_refused(
        store: Store, setup_running: bool, to: State, kwargs: dict[str, object],
        problem: str) -> None:
    inv = await create(store, "inv")
    if setup_running:
        await start(store, inv.ref, T0)
    before = await store.get(inv.ref)
    seq = await store.last_seq()
    with pytest.raises(StoreError, match=problem) as err:
        await store.transition(inv.ref, to, now=T0 + 5,
                               **kwargs)  # type: ignore[arg-type]
    assert err.value.data == {"sandbox": "inv", "state": before.state.value, "to": to.value}
    assert await store.get(inv.ref) == before
    assert await store.last_seq() == seq


@pytest.mark.parametrize(("damage", "call", "problem"), [
    # A live state whose run is closed: nothing to end.
    ("UPDATE runs SET ended_at = 1", "transition", "there is no open run to end"),
    ("UPDATE runs SET ended_at = 1", "end_runs", "there is no open run to end"),
    # A resting state whose run is still open: a new run would leave it dangling.
    ("UPDATE sandboxes SET state = 'stopped'", "begin_run", "is still open"),
])
async def test_a_damaged_run_record_is_refused(db_path: Path, damage: str, call: str,
                                               problem: str) -> None:
    """Legal by the state table, but the record breaks the run invariant: a StoreError."""
    async with open_store(db_path) as store:
        inv = await create(store, "inv")
        info = await start(store, inv.ref, T0)
    assert info.run is not None
    sql(db_path, damage)
    async with open_store(db_path) as store:
        before = await store.get(inv.ref)
        seq = await store.last_seq()
        with pytest.raises(StoreError, match=problem):
            if call == "transition":
                await store.transition(inv.ref, State.STOPPED, now=T0 + 5,
                                       end=RunEnd(reason=Reason.EXITED))
            elif call == "end_runs":
                await store.end_runs([(inv.ref, RunEnd(reason=Reason.DAEMON_LOST))],
                                     now=T0 + 5)
            else:
                await store.begin_run(inv.ref, now=T0 + 5)
        assert await store.get(inv.ref) == before
        assert await store.last_seq() == seq


# --- events --------------------------------------------------------------------------


async def test_events_since_returns_exactly_the_missed_ones(store: Store) -> None:
    assert await store.last_seq() == 0
    assert await store.events_since(0) == []
    e1 = await create(store, "e1", uid=1)
    e2 = await create(store, "e2", uid=2, now=T0 + 1)
    seen = await store.last_seq()
    await start(store, e1.ref, T0 + 2)
    _, removed = await store.remove_sandbox(e2.ref, now=T0 + 5)
    missed = await store.events_since(seen)
    assert [(e.seq, e.sandbox, e.sandbox_id, e.state) for e in missed] == [
        (3, "e1", e1.id, State.STARTING), (4, "e1", e1.id, State.RUNNING),
        (5, "e2", e2.id, State.CREATED)]
    assert missed[-1] == removed
    assert await store.last_seq() == 5
    assert await store.events_since(5) == []
    assert [e.seq for e in await store.events_since(0, limit=2)] == [1, 2]
    assert [e.seq for e in await store.events_since(1, owner_uid=2)] == [2, 5]
    assert [e.seq for e in await store.events_since(0, owner_uid=3)] == []


async def test_prune_keeps_the_newest_and_never_reuses_seqs(store: Store) -> None:
    for i in range(10):
        await create(store, f"p{i}", now=T0 + i)
    assert await store.prune_events(keep=3) == 7
    assert [e.seq for e in await store.events_since(0)] == [8, 9, 10]
    assert await store.prune_events(keep=3) == 0
    assert await store.prune_events(keep=0) == 3
    assert await store.events_since(0) == []
    assert await store.last_seq() == 10
    _, event = await store.create_sandbox(spec("after"), owner=Owner(uid=1), now=T0 + 20)
    assert event.seq == 11
    with pytest.raises(ValueError, match="keep"):
        await store.prune_events(keep=-1)


async def test_concurrent_transitions_all_land_with_gap_free_seqs(store: Store) -> None:
    names = [f"c{i:02}" for i in range(50)]
    refs = [(await create(store, name, now=T0 + i)).ref for i, name in enumerate(names)]
    returned: list[Event] = []

    async def life(ref: SandboxRef, i: int) -> None:
        info, _ = await store.begin_run(ref, now=T0 + 100)
        assert info.run is not None
        await store.set_run_process(ref, info.run.id, pid=10_000 + i, proc_start=None,
                                    boot_id=None)
        _, event = await store.transition(ref, State.RUNNING, now=T0 + 101)
        returned.append(event)

    async with anyio.create_task_group() as tg:
        for i, ref in enumerate(refs):
            tg.start_soon(life, ref, i)

    logged = await store.events_since(0, limit=10_000)
    assert [e.seq for e in logged] == list(range(1, 151))
    assert sorted(returned, key=lambda e: e.seq) == [
        e for e in logged if e.state is State.RUNNING]
    for ref in refs:  # each sandbox's own events in order, each naming its run
        mine = [e for e in logged if e.sandbox_id == ref.id]
        assert [e.state for e in mine] == [State.CREATED, State.STARTING, State.RUNNING]
        assert mine[1].run_id == mine[2].run_id is not None
    assert await store.counts_by_state() == {
        "created": 0, "starting": 0, "running": 50, "paused": 0,
        "stopping": 0, "stopped": 0, "failed": 0}
    runs = await store.live_runs()
    assert sorted((r.ref, r.pid) for r in runs) == [
        (ref, 10_000 + i) for i, ref in enumerate(refs)]
    assert len({r.run_id for r in runs}) == 50


async def test_racing_starts_of_one_sandbox_have_one_winner(store: Store) -> None:
    target = await create(store, "race")
    outcomes = await race(50, lambda _: store.begin_run(target.ref, now=T0 + 1), Conflict)
    assert outcomes == ["refused"] * 49 + ["won"]
    assert await store.last_seq() == 2
    assert len(await store.live_runs()) == 1


@pytest.mark.parametrize("checkpoints", range(12))
async def test_cancelled_writer_leaves_all_or_nothing(store: Store, checkpoints: int) -> None:
    cx = await create(store, "cx")

    async def cancel_after(scope: anyio.CancelScope) -> None:
        for _ in range(checkpoints):
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_after, tg.cancel_scope)
        await store.begin_run(cx.ref, now=T0 + 1)
        await anyio.sleep_forever()

    info = await store.get(cx.ref)
    seqs = [e.seq for e in await store.events_since(0)]
    if info.state is State.CREATED:
        assert (info.run, seqs, await store.live_runs()) == (None, [1], [])
    else:
        assert info.state is State.STARTING
        assert info.run is not None
        assert seqs == [1, 2]
        assert [r.run_id for r in await store.live_runs()] == [info.run.id]
    # The shared connection is not stuck inside a half-done transaction.
    _, event = await store.create_sandbox(spec("after"), owner=Owner(uid=1), now=T0 + 2)
    assert event.seq == seqs[-1] + 1


async def test_caller_cancelled_before_the_transaction_writes_nothing(store: Store) -> None:
    pre = await create(store, "pre")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.begin_run(pre.ref, now=T0 + 1)
    assert scope.cancelled_caught
    assert (await store.get(pre.ref)).state is State.CREATED
    assert await store.last_seq() == 1


# --- reconciliation and counts ------------------------------------------------------------


async def test_live_runs_and_counts(store: Store) -> None:
    assert await store.live_runs() == []
    assert await store.counts_by_state() == {s.value: 0 for s in State}
    idle, up, going, done = [await create(store, n) for n in ("idle", "up", "going", "done")]
    info, _ = await store.begin_run(up.ref, now=T0 + 1)
    assert info.run is not None
    await store.set_run_process(up.ref, info.run.id, pid=11, proc_start=111, boot_id="bt")
    await start(store, going.ref, T0 + 2, pid=22)
    await store.transition(going.ref, State.STOPPING, now=T0 + 3)
    await start(store, done.ref, T0 + 4, pid=33)
    await store.transition(done.ref, State.STOPPED, now=T0 + 5,
                           end=RunEnd(reason=Reason.EXITED, exit_code=0))

    live = await store.live_runs()
    assert [(r.ref, r.state, r.pid) for r in live] == [
        (up.ref, State.STARTING, 11), (going.ref, State.STOPPING, 22)]
    assert (live[0].proc_start, live[0].boot_id, live[0].started_at) == (111, "bt", utc(T0 + 1))
    assert {r.state for r in live} <= LIVE_STATES
    assert idle.ref not in {r.ref for r in live}
    assert await store.counts_by_state() == {
        "created": 1, "starting": 1, "running": 0, "paused": 0,
        "stopping": 1, "stopped": 1, "failed": 0}


async def test_set_run_process_records_the_pid_without_an_event(store: Store) -> None:
    sp = await create(store, "sp")
    other = await create(store, "other")
    info, _ = await store.begin_run(sp.ref, now=T0 + 1)
    assert info.run is not None
    assert info.run.pid is None
    await store.set_run_process(sp.ref, info.run.id, pid=321, proc_start=5000, boot_id="bb")
    assert await store.live_runs() == [LiveRun(
        ref=sp.ref, run_id=info.run.id, state=State.STARTING, pid=321, proc_start=5000,
        boot_id="bb", started_at=utc(T0 + 1))]
    assert await store.last_seq() == 3
    with pytest.raises(NotFound):
        await store.set_run_process(sp.ref, info.run.id + 1, pid=1, proc_start=None,
                                    boot_id=None)
    # A run id is only good with the sandbox it belongs to.
    with pytest.raises(NotFound) as err:
        await store.set_run_process(other.ref, info.run.id, pid=1, proc_start=None,
                                    boot_id=None)
    assert err.value.data == {"sandbox": "other"}
    assert (await store.live_runs())[0].pid == 321
    # A worker that died at once: the ended run still learns its pid.
    await store.transition(sp.ref, State.FAILED, now=T0 + 2,
                           end=RunEnd(reason=Reason.LAUNCH_FAILED, exit_code=3))
    await store.set_run_process(sp.ref, info.run.id, pid=999, proc_start=1, boot_id="bb")
    run = (await store.get(sp.ref)).run
    assert run is not None
    assert (run.pid, run.reason, run.exit_code) == (999, Reason.LAUNCH_FAILED, 3)
    assert await store.last_seq() == 4


async def test_end_runs_closes_every_live_run_in_one_go(store: Store) -> None:
    r1, r2, idle = [await create(store, n) for n in ("r1", "r2", "idle")]
    await start(store, r1.ref, T0 + 1)
    await store.begin_run(r2.ref, now=T0 + 2)
    lost = RunEnd(reason=Reason.DAEMON_LOST, detail="worker gone")
    events = await store.end_runs([(r1.ref, lost), (r2.ref, lost)], now=T0 + 10)
    assert [(e.sandbox, e.sandbox_id, e.state, e.reason, e.detail) for e in events] == [
        ("r1", r1.id, State.STOPPED, Reason.DAEMON_LOST, "worker gone"),
        ("r2", r2.id, State.STOPPED, Reason.DAEMON_LOST, "worker gone")]
    for ref, event in zip((r1.ref, r2.ref), events, strict=True):
        info = await store.get(ref)
        assert info.state is State.STOPPED
        assert info.updated_at == utc(T0 + 10)
        assert info.run is not None
        assert info.run.id == event.run_id
        assert (info.run.ended_at, info.run.reason, info.run.detail) == (
            utc(T0 + 10), Reason.DAEMON_LOST, "worker gone")
    assert (await store.get(idle.ref)).state is State.CREATED
    assert await store.live_runs() == []
    assert await store.end_runs([], now=T0 + 11) == []


async def test_end_runs_is_all_or_nothing(store: Store) -> None:
    live, idle = [await create(store, n) for n in ("live", "idle")]
    await start(store, live.ref, T0 + 1)
    seq = await store.last_seq()
    lost = RunEnd(reason=Reason.DAEMON_LOST)
    with pytest.raises(Conflict, match="'idle' cannot go from created to stopped"):
        await store.end_runs([(live.ref, lost), (idle.ref, lost)], now=T0 + 10)
    with pytest.raises(NotFound):
        await store.end_runs([(live.ref, lost), (SandboxRef(99, "ghost"), lost)], now=T0 + 10)
    assert (await store.get(live.ref)).state is State.RUNNING
    assert len(await store.live_runs()) == 1
    assert await store.last_seq() == seq


async def test_on_event_sees_committed_events_in_seq_order(db_path: Path) -> None:
    published: list[tuple[int, str, State, int]] = []

    def on_event(event: Event, owner_uid: int) -> None:
        published.append((event.seq, event.sandbox, event.state, owner_uid))

    async with open_store(db_path, on_event=on_event) as store:
        o1 = await create(store, "o1", uid=10)
        with pytest.raises(Conflict):
            await create(store, "o1", uid=20)
        with pytest.raises(Conflict):
            await store.transition(o1.ref, State.RUNNING, now=T0)
        assert published == [(1, "o1", State.CREATED, 10)]

        async def make(i: int) -> None:
            await create(store, f"p{i}", uid=i, now=T0 + 1)

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(make, i)
        await store.remove_sandbox(o1.ref, now=T0 + 2)
    assert [seq for seq, *_ in published] == list(range(1, 33))
    assert published[-1] == (32, "o1", State.CREATED, 10)
    assert {(name, uid) for _, name, _, uid in published[1:-1]} == {
        (f"p{i}", i) for i in range(30)}


async def test_end_runs_returns_the_events_as_stored(store: Store) -> None:
    refs = []
    for i in range(5):
        refs.append((await create(store, f"s{i}")).ref)
        await start(store, refs[-1], T0 + 1)
    before = await store.last_seq()
    events = await store.end_runs([(ref, RunEnd(reason=Reason.DAEMON_LOST, detail=str(i)))
                                   for i, ref in enumerate(refs)], now=T0 + 5)
    stored = await store.events_since(before)
    assert events == stored
    assert [e.seq for e in stored] == list(range(before + 1, before + 6))
    assert [e.detail for e in stored] == ["0", "1", "2", "3", "4"]
    assert [e.sandbox_id for e in stored] == [ref.id for ref in refs]
