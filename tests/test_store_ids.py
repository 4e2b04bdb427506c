"""Sandbox ids and refs, owners, and the per-owner limit, against a real database file.

The point of ids: a caller that read sandbox `x`, waited, then acts, acts on
that record or gets `NotFound`, never on a newer sandbox that took the name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from storekit import T0, create, race, spec, sql, start

from msbd.db.store import RunEnd, Store
from msbd.errors import LimitReached, NotFound
from msbd.model import Owner, Reason, SandboxInfo, SandboxRef, State

# --- ids -----------------------------------------------------------------------------


async def test_ids_count_up_and_are_never_reused(store: Store) -> None:
    a = await create(store, "a")
    b = await create(store, "b")
    c = await create(store, "c")
    assert [a.id, b.id, c.id] == [1, 2, 3]
    await store.remove_sandbox(c.ref, now=T0 + 1)  # the highest: AUTOINCREMENT, not max+1
    await store.remove_sandbox(a.ref, now=T0 + 1)
    again = await create(store, "a", now=T0 + 2)
    assert again.id == 4
    assert (await create(store, "c", now=T0 + 2)).id == 5
    assert await store.sandbox_ids() == {b.id, 4, 5}
    assert await store.get_sandbox("a") == again


async def test_the_id_survives_every_change(store: Store) -> None:
    s = await create(store, "s")
    await start(store, s.ref, T0 + 1)
    await store.transition(s.ref, State.STOPPED, now=T0 + 3,
                           end=RunEnd(reason=Reason.EXITED, exit_code=0))
    await start(store, s.ref, T0 + 4)
    assert (await store.get_sandbox("s")).ref == s.ref
    assert {e.sandbox_id for e in await store.events_since(0)} == {s.id}


# Each operation is given the OLD ref and arguments it would accept for the new
# record, so acting by name would succeed: only the id tells them apart.
Act = Callable[[Store, SandboxRef, int], Awaitable[object]]
ACTS: list[tuple[str, bool, Act]] = [
    ("transition", True, lambda s, old, _: s.transition(
        old, State.STOPPING, now=T0 + 50)),
    ("transition-end", True, lambda s, old, _: s.transition(
        old, State.STOPPED, now=T0 + 50,
        end=RunEnd(reason=Reason.KILLED, signal=9))),
    ("begin_run", False, lambda s, old, _: s.begin_run(old, now=T0 + 50)),
    ("remove", False, lambda s, old, _: s.remove_sandbox(old, now=T0 + 50)),
    ("remove-expect", True, lambda s, old, _: s.remove_sandbox(
        old, now=T0 + 50, expect=set(State))),
    ("set_run_process", True, lambda s, old, run_id: s.set_run_process(
        old, run_id, pid=666, proc_start=6, boot_id="evil")),
    ("end_runs", True, lambda s, old, _: s.end_runs(
        [(old, RunEnd(reason=Reason.DAEMON_LOST))], now=T0 + 50)),
    ("get", False, lambda s, old, _: s.get(old)),
    ("owner", False, lambda s, old, _: s.owner(old)),
]


@pytest.mark.parametrize(("new_running", "act"), [(r, a) for _, r, a in ACTS],
                         ids=[name for name, _, _ in ACTS])
async def test_an_old_ref_never_reaches_a_new_sandbox_of_that_name(
        store: Store, db_path: Path, new_running: bool, act: Act) -> None:
    old = await create(store, "x", uid=1000)
    await start(store, old.ref, T0 + 1)
    await store.transition(old.ref, State.STOPPED, now=T0 + 3,
                           end=RunEnd(reason=Reason.EXITED, exit_code=0))
    await store.remove_sandbox(old.ref, now=T0 + 4)
    new, _ = await store.create_sandbox(spec("x"), owner=Owner(uid=2000, gid=2000, groups=()),
                                        now=T0 + 5)
    assert new.id != old.id
    run_id = 0
    if new_running:
        running = await start(store, new.ref, T0 + 6, pid=777)
        assert running.run is not None
        run_id = running.run.id
    before = await store.get(new.ref)
    runs_before = sql(db_path, "SELECT * FROM runs ORDER BY id")
    seq = await store.last_seq()

    with pytest.raises(NotFound) as err:
        await act(store, old.ref, run_id)
    assert err.value.data == {"sandbox": "x"}
    assert await store.get(new.ref) == before
    assert await store.get_sandbox("x") == before
    assert await store.owner(new.ref) == Owner(uid=2000, gid=2000, groups=())
    assert sql(db_path, "SELECT * FROM runs ORDER BY id") == runs_before
    assert await store.last_seq() == seq
    assert await store.events_since(seq) == []


# --- begin_run and owners ----------------------------------------------------------


@pytest.mark.parametrize("owner", [
    Owner(uid=1000, gid=1001, groups=(1001, 27, 44, 2**32 - 2)),
    Owner(uid=0, gid=0, groups=()),  # no supplementary groups: not the same as unknown
    Owner(uid=1000, gid=1000, groups=None),
    Owner(uid=4321),  # nothing but the uid, as for records from before gids were kept
])
async def test_begin_run_returns_the_record_and_owner_as_stored(
        store: Store, owner: Owner) -> None:
    made, _ = await store.create_sandbox(spec("own", team="t"), owner=owner, now=T0)
    await create(store, "bystander", uid=owner.uid + 1, now=T0)
    assert await store.owner(made.ref) == owner

    info, got = await store.begin_run(made.ref, now=T0 + 1)
    assert got == owner
    assert got.groups == owner.groups  # () stays (), None stays None
    assert info == await store.get(made.ref)
    assert info.state is State.STARTING
    assert info.spec == spec("own", team="t")
    assert info.owner_uid == owner.uid
    assert info.run is not None
    assert info.run.ended_at is None
    [event] = await store.events_since(2)
    assert (event.seq, event.sandbox_id, event.state, event.run_id) == (
        3, made.id, State.STARTING, info.run.id)


async def test_begin_run_again_opens_a_new_run_and_returns_it(store: Store) -> None:
    s = await create(store, "s", uid=5)
    first, _ = await store.begin_run(s.ref, now=T0 + 1)
    await store.transition(s.ref, State.FAILED, now=T0 + 2,
                           end=RunEnd(reason=Reason.LAUNCH_FAILED, exit_code=1))
    second, owner = await store.begin_run(s.ref, now=T0 + 3)
    assert first.run is not None
    assert second.run is not None
    assert second.run.id > first.run.id
    assert (second.run.reason, second.run.exit_code, second.run.ended_at) == (None, None, None)
    assert second == await store.get(s.ref)
    assert owner == Owner(uid=5)


# --- the per-owner limit -------------------------------------------------------------


async def test_max_owned_is_counted_per_owner(store: Store) -> None:
    mine = [await create(store, f"m{i}", uid=1000, max_owned=2) for i in range(2)]
    await start(store, mine[0].ref, T0 + 1)  # every state counts, live or not
    seq = await store.last_seq()
    with pytest.raises(LimitReached) as err:
        await create(store, "m2", uid=1000, now=T0 + 2, max_owned=2)
    assert err.value.data == {"sandbox": "m2", "limit": "max_sandboxes_per_user"}
    assert "max_sandboxes_per_user" in str(err.value)
    with pytest.raises(NotFound):
        await store.get_sandbox("m2")
    assert await store.last_seq() == seq
    # Others are not affected, with the same limit or none.
    await create(store, "o0", uid=2000, now=T0 + 3, max_owned=2)
    await create(store, "o1", uid=2000, now=T0 + 3, max_owned=2)
    await create(store, "m2", uid=1000, now=T0 + 3)  # no limit given: no limit applies
    with pytest.raises(LimitReached):
        await create(store, "m3", uid=1000, now=T0 + 4, max_owned=3)
    with pytest.raises(LimitReached):
        await create(store, "o2", uid=2000, now=T0 + 4, max_owned=2)
    # Removing one makes room again.
    await store.remove_sandbox(mine[1].ref, now=T0 + 5)
    made = await create(store, "m3", uid=1000, now=T0 + 6, max_owned=3)
    assert made.owner_uid == 1000
    assert await store.counts_by_state(1000) == {
        "created": 2, "starting": 0, "running": 1, "paused": 0,
        "stopping": 0, "stopped": 0, "failed": 0}


async def test_max_owned_holds_under_concurrent_creates(store: Store) -> None:
    outcomes = await race(20, lambda i: create(store, f"c{i}", uid=7, max_owned=3),
                          LimitReached)
    assert outcomes == ["refused"] * 17 + ["won"] * 3
    made: list[SandboxInfo] = await store.list_sandboxes(owner_uid=7)
    assert len(made) == 3
    assert await store.last_seq() == 3
