"""Group commit: changes queued together share one hop to the database thread and one
COMMIT, and each caller is answered only once its change is on disk; one change's error
undoes that change alone.

A real database file; what is on disk is read through a second sqlite3
connection the moment the callers have their answers.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from pathlib import Path

import anyio
import pytest
from storekit import T0, create

from msbd.db.store import Store, open_store
from msbd.errors import Conflict, StoreError
from msbd.model import Event, SandboxRef, State

BURST = 200


def on_disk(db_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db_path) as other:
        return other.execute(sql).fetchall()


async def test_a_burst_of_changes_shares_few_commits_and_each_answer_is_durable(
        db_path: Path) -> None:
    published: list[Event] = []
    async with open_store(db_path, on_event=lambda e, _uid: published.append(e)) as store:
        refs = [(await create(store, f"s{i}")).ref for i in range(BURST)]
        before, hops_before = store.commits, store.hops
        answered: list[int] = []

        async def begin(ref: SandboxRef) -> None:
            info, _ = await store.begin_run(ref, now=T0 + 1)
            # Answered: the change must already be on disk, seen from another connection.
            [(state,)] = on_disk(db_path, f"SELECT state FROM sandboxes WHERE id = {ref.id}")
            assert state == "starting" == info.state
            answered.append(ref.id)

        async with anyio.create_task_group() as tg:
            for ref in refs:
                tg.start_soon(begin, ref)
        commits, hops = store.commits - before, store.hops - hops_before
    assert sorted(answered) == sorted(r.id for r in refs)
    assert 1 <= commits <= BURST // 10, f"{commits} commits for {BURST} changes"
    # The changes that queued while one hop ran went to the database thread together.
    assert 1 <= hops <= BURST // 10, f"{hops} hops for {BURST} changes"
    seqs = [e.seq for e in published]
    assert seqs == sorted(seqs) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert [e.state for e in published[-BURST:]] == [State.STARTING] * BURST


async def test_one_refused_change_in_a_group_leaves_the_others(store: Store,
                                                               db_path: Path) -> None:
    good = [(await create(store, f"g{i}")).ref for i in range(20)]
    bad = (await create(store, "bad")).ref
    outcomes: dict[str, str] = {}

    async def move(ref: SandboxRef, to: State) -> None:
        try:
            if to is State.STARTING:
                await store.begin_run(ref, now=T0 + 2)
            else:
                await store.transition(ref, to, now=T0 + 2)
        except Conflict:
            outcomes[ref.name] = "refused"
        else:
            outcomes[ref.name] = "done"

    async with anyio.create_task_group() as tg:
        for i, ref in enumerate(good):
            tg.start_soon(move, ref, State.STARTING)
            if i == 10:  # created -> stopping is not in the table
                tg.start_soon(move, bad, State.STOPPING)
    assert outcomes.pop("bad") == "refused"
    assert set(outcomes.values()) == {"done"}
    states = dict(on_disk(db_path, "SELECT name, state FROM sandboxes"))  # type: ignore[arg-type]
    assert states.pop("bad") == "created"
    assert set(states.values()) == {"starting"}


async def test_a_read_never_sees_an_uncommitted_change(store: Store, db_path: Path) -> None:
    refs = [(await create(store, f"r{i}")).ref for i in range(50)]
    seen: list[int] = []

    async def read() -> None:
        counts = await store.counts_by_state()
        # Whatever the read saw is on disk already.
        [(starting,)] = on_disk(db_path, "SELECT count(*) FROM sandboxes WHERE state = "
                                         "'starting'")
        assert counts.get("starting", 0) <= int(starting)  # type: ignore[call-overload]
        seen.append(counts.get("starting", 0))

    async with anyio.create_task_group() as tg:
        for i, ref in enumerate(refs):
            tg.start_soon(functools.partial(store.begin_run, ref, now=T0 + 1))
            if i % 10 == 0:
                tg.start_soon(read)
    assert len(seen) == 5


@pytest.mark.parametrize("n", [1, 2])
async def test_a_lone_change_commits_alone(store: Store, n: int) -> None:
    refs = [(await create(store, f"l{i}")).ref for i in range(n)]
    before = store.commits
    for ref in refs:
        await store.begin_run(ref, now=T0 + 1)
    assert store.commits - before == n


async def test_a_change_cancelled_while_it_waits_in_the_queue_writes_nothing(
        store: Store, db_path: Path) -> None:
    held, waiting = (await create(store, "held")).ref, (await create(store, "waiting")).ref
    go = threading.Event()

    def slow(db: sqlite3.Connection, _draft: object) -> None:
        go.wait(30)  # on the database thread: the lock stays held meanwhile

    async def hold() -> None:
        await store._change(slow)
        await store.begin_run(held, now=T0 + 1)

    hops = store.hops
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        while store.hops == hops or store._queue:  # the slow change is on its way
            await anyio.lowlevel.checkpoint()
        with anyio.CancelScope() as scope:
            async def cancel_once_queued() -> None:
                while not store._queue:
                    await anyio.lowlevel.checkpoint()
                scope.cancel()
            tg.start_soon(cancel_once_queued)
            await store.begin_run(waiting, now=T0 + 1)
        go.set()
    assert scope.cancelled_caught
    states = dict(on_disk(db_path, "SELECT name, state FROM sandboxes"))  # type: ignore[arg-type]
    assert states == {"held": "starting", "waiting": "created"}
    assert (await store.get(waiting)).state is State.CREATED


async def test_a_trip_that_fails_as_a_whole_fails_every_change_in_it(db_path: Path) -> None:
    async with open_store(db_path) as store:
        refs = [(await create(store, f"f{i}")).ref for i in range(10)]
        await store._db.close()  # the connection is gone: the trip itself fails
        outcomes: list[str] = []

        async def begin(ref: SandboxRef) -> None:
            try:
                await store.begin_run(ref, now=T0 + 1)
            except StoreError:
                outcomes.append("refused")

        with anyio.fail_after(30):  # nobody is left waiting for a trip that never comes
            async with anyio.create_task_group() as tg:
                for ref in refs:
                    tg.start_soon(begin, ref)
    assert outcomes == ["refused"] * 10
