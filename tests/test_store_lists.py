"""Lists, counts and sequence numbers, paged and per owner; rows the store cannot read.

An unreadable row is made the way it happens in life: by something other
than this store writing the file (here plain sqlite3, while the store is
closed).
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from storekit import T0, create, sql, start

from msbd.db.store import RunEnd, Store, open_store
from msbd.errors import Conflict, StoreError
from msbd.model import Reason, SandboxInfo, SandboxRef, State

# --- paging ------------------------------------------------------------------------------


async def make_seven(store: Store) -> list[SandboxInfo]:
    """s0..s6: owners 1, 2, 1, 2, ...; team a/b alternating by threes; created
    with times running backwards (creation order is not time order); s4 running."""
    made = [await create(store, f"s{i}", uid=1 + i % 2, now=T0 - i, team="ab"[i // 3 % 2])
            for i in range(7)]
    await start(store, made[4].ref, T0 + 10)
    return made


async def pages(store: Store, limit: int, **filters: object) -> list[list[str]]:
    """Every page of a listing, each asked for with `after` = the last id seen."""
    out: list[list[str]] = []
    after = 0
    while True:
        page = await store.list_sandboxes(after=after, limit=limit,
                                          **filters)  # type: ignore[arg-type]
        assert len(page) <= limit
        if not page:
            return out
        out.append([i.name for i in page])
        after = page[-1].id


async def test_pages_follow_creation_order(store: Store) -> None:
    made = await make_seven(store)
    everything = await store.list_sandboxes()
    assert [i.name for i in everything] == [f"s{i}" for i in range(7)]
    assert [i.id for i in everything] == sorted(i.id for i in made)
    assert await pages(store, 3) == [["s0", "s1", "s2"], ["s3", "s4", "s5"], ["s6"]]
    assert await pages(store, 7) == [[f"s{i}" for i in range(7)]]
    assert await pages(store, 1) == [[f"s{i}"] for i in range(7)]
    assert await store.list_sandboxes(limit=0) == []
    assert await store.list_sandboxes(after=made[-1].id) == []
    # A page is the same records as the whole list, field for field.
    assert await store.list_sandboxes(after=made[1].id, limit=2) == everything[2:4]


async def test_filters_combine_with_paging(store: Store) -> None:
    made = await make_seven(store)
    assert await pages(store, 2, owner_uid=1) == [["s0", "s2"], ["s4", "s6"]]
    assert await pages(store, 2, owner_uid=2) == [["s1", "s3"], ["s5"]]
    assert await pages(store, 2, label=("team", "b")) == [["s3", "s4"], ["s5"]]
    assert await pages(store, 1, label=("team", "a"), owner_uid=1) == [["s0"], ["s2"], ["s6"]]
    assert await pages(store, 5, state=State.CREATED, owner_uid=1) == [["s0", "s2", "s6"]]
    assert await pages(store, 2, state=State.RUNNING) == [["s4"]]
    # `after` an id that matched nothing, or that is gone, still pages on by id.
    assert [i.name for i in await store.list_sandboxes(after=made[1].id, owner_uid=1)] == [
        "s2", "s4", "s6"]
    await store.remove_sandbox(made[2].ref, now=T0 + 20)
    assert [i.name for i in await store.list_sandboxes(after=made[2].id, limit=2)] == [
        "s3", "s4"]


async def test_a_list_without_specs_keeps_everything_else(store: Store) -> None:
    await make_seven(store)
    full = await store.list_sandboxes()
    light = await store.list_sandboxes(with_spec=False)
    assert all(i.spec is not None for i in full)
    assert [i.spec for i in light] == [None] * 7
    assert light == [msgspec.structs.replace(i, spec=None) for i in full]
    assert [i.labels for i in light] == [{"team": t} for t in "aaabbba"]
    assert [i.name for i in await store.list_sandboxes(
        with_spec=False, label=("team", "b"), after=4, limit=1)] == ["s4"]
    running = (await store.list_sandboxes(state=State.RUNNING, with_spec=False))[0]
    assert running.run is not None
    assert running.run.pid == 4242


# --- counts and sequence numbers ----------------------------------------------------------


async def test_counts_by_state_for_everyone_and_per_owner(store: Store) -> None:
    zero = {s.value: 0 for s in State}
    assert await store.counts_by_state() == zero
    assert await store.counts_by_state(1) == zero
    made = await make_seven(store)
    failed = made[1]
    await store.begin_run(failed.ref, now=T0 + 11)
    await store.transition(failed.ref, State.FAILED, now=T0 + 12,
                           end=RunEnd(reason=Reason.LAUNCH_FAILED))
    assert await store.counts_by_state() == {**zero, "created": 5, "running": 1, "failed": 1}
    assert await store.counts_by_state(1) == {**zero, "created": 3, "running": 1}
    assert await store.counts_by_state(2) == {**zero, "created": 2, "failed": 1}
    assert await store.counts_by_state(3) == zero


async def test_last_seq_for_everyone_and_per_owner(store: Store) -> None:
    assert (await store.last_seq(), await store.last_seq(1)) == (0, 0)
    a = await create(store, "a", uid=1)          # 1
    b = await create(store, "b", uid=2)          # 2
    await start(store, a.ref, T0 + 1)            # 3, 4
    assert await store.last_seq() == 4
    assert await store.last_seq(1) == 4
    assert await store.last_seq(2) == 2
    assert await store.last_seq(3) == 0
    await store.remove_sandbox(b.ref, now=T0 + 5)  # 5: the owner's, though the record is gone
    assert (await store.last_seq(), await store.last_seq(1), await store.last_seq(2)) == (
        5, 4, 5)
    # Pruned: the global number never goes back; an owner's is the last one still kept.
    await store.prune_events(keep=1)
    assert (await store.last_seq(), await store.last_seq(1), await store.last_seq(2)) == (
        5, 0, 5)


# --- unreadable rows ---------------------------------------------------------------------

CORRUPTIONS = {
    "spec": "UPDATE sandboxes SET spec = x'7b22' WHERE name = 'bad'",
    "state": "UPDATE sandboxes SET state = 'hibernating' WHERE name = 'bad'",
}


async def corrupt(db_path: Path, what: str) -> dict[str, SandboxRef]:
    """good1, bad, good2 (in that order); then `bad` is spoiled behind the store's back."""
    async with open_store(db_path) as store:
        refs = {name: (await create(store, name, uid=1)).ref
                for name in ("good1", "bad", "good2")}
        await create(store, "other", uid=2)
    sql(db_path, CORRUPTIONS[what])
    return refs


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
async def test_an_unreadable_row_is_skipped_by_lists_and_fails_only_its_own_get(
        db_path: Path, what: str) -> None:
    refs = await corrupt(db_path, what)
    async with open_store(db_path) as store:
        assert store.unreadable == {}
        assert [i.name for i in await store.list_sandboxes(owner_uid=1)] == [
            "good1", "good2"]
        # Without specs, a bad spec is not read at all: the entry is listed (its
        # labels are their own column); a bad state is skipped either way.
        light = await store.list_sandboxes(owner_uid=1, with_spec=False)
        assert [i.name for i in light] == (
            ["good1", "bad", "good2"] if what == "spec" else ["good1", "good2"])
        assert [i.name for i in await store.list_sandboxes(after=refs["good1"].id)] == [
            "good2", "other"]
        assert list(store.unreadable) == ["bad"]
        assert "unreadable" in store.unreadable["bad"]
        with pytest.raises(StoreError) as err:
            await store.get_sandbox("bad")
        assert err.value.data == {"sandbox": "bad"}
        with pytest.raises(StoreError):
            await store.get(refs["bad"])
        # Every other record and call works as before.
        assert (await store.get_sandbox("good2")).ref == refs["good2"]
        assert await store.sandbox_ids() == {1, 2, 3, 4}
        await start(store, refs["good1"], T0 + 1)
        assert [r.ref for r in await store.live_runs()] == [refs["good1"]]


async def test_counts_skip_a_row_whose_state_is_unknown(db_path: Path) -> None:
    await corrupt(db_path, "state")
    async with open_store(db_path) as store:
        assert await store.counts_by_state() == {
            "created": 3, "starting": 0, "running": 0, "paused": 0, "stopping": 0, "stopped": 0,
            "failed": 0}
        assert (await store.counts_by_state(1))["created"] == 2


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
async def test_an_unreadable_row_can_still_be_removed(db_path: Path, what: str) -> None:
    refs = await corrupt(db_path, what)
    async with open_store(db_path) as store:
        await store.list_sandboxes()
        assert "bad" in store.unreadable
        info, event = await store.remove_sandbox(refs["bad"], now=T0 + 9)
        assert (info.ref, info.owner_uid) == (refs["bad"], 1)
        assert (event.sandbox, event.sandbox_id, event.detail) == ("bad", refs["bad"].id,
                                                                   "removed")
        assert await store.events_since(event.seq - 1) == [event]
        assert store.unreadable == {}
        assert await store.sandbox_ids() == {1, 3, 4}
        assert [i.name for i in await store.list_sandboxes()] == ["good1", "good2", "other"]
        assert store.unreadable == {}
    assert sql(db_path, "SELECT count(*) FROM sandboxes WHERE name = 'bad'") == [(0,)]


async def test_an_unknown_state_is_not_in_any_expected_set(db_path: Path) -> None:
    refs = await corrupt(db_path, "state")
    async with open_store(db_path) as store:
        with pytest.raises(Conflict):
            await store.remove_sandbox(refs["bad"], now=T0 + 9, expect=set(State))
        assert await store.sandbox_ids() == {1, 2, 3, 4}
        assert await store.last_seq() == 4


# Paging skips unreadable rows without counting them against the limit, and a
# write to a row whose state is unknown is a StoreError naming the sandbox.


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
async def test_paging_past_an_unreadable_row_reaches_every_readable_one(
        db_path: Path, what: str) -> None:
    await corrupt(db_path, what)
    async with open_store(db_path) as store:
        page = await store.list_sandboxes(limit=2)
        assert [i.name for i in page] == ["good1", "good2"]


@pytest.mark.parametrize("call", ["transition", "begin_run", "end_runs"])
async def test_a_write_to_a_row_with_an_unknown_state_is_a_store_error(
        db_path: Path, call: str) -> None:
    refs = await corrupt(db_path, "state")
    async with open_store(db_path) as store:
        with pytest.raises(StoreError) as err:
            if call == "transition":
                await store.transition(refs["bad"], State.STOPPED, now=T0 + 9)
            elif call == "begin_run":
                await store.begin_run(refs["bad"], now=T0 + 9)
            else:
                await store.end_runs([(refs["bad"], RunEnd(reason=Reason.DAEMON_LOST))],
                                     now=T0 + 9)
        assert err.value.data == {"sandbox": "bad"}
        assert await store.last_seq() == 4
