"""Opening the store's database file: creation, modes, refusals, and migrating old files.

A version-1 file is built here with version 1's own statements
(`schema.MIGRATIONS[0]`) and rows written the way msbd 1 wrote them, then
opened with today's `open_store`.
"""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import anyio
import msgspec
import pytest
from storekit import T0, create, spec, sql, start, utc

from msbd.db import schema
from msbd.db.store import LiveRun, RunEnd, Store, open_store
from msbd.errors import StoreError
from msbd.model import Owner, Reason, RunInfo, SandboxRef, State
from msbd.network import Network, PortMap


async def test_new_database_is_at_latest_version_and_reopen_is_idempotent(
        db_path: Path) -> None:
    async with open_store(db_path) as store:
        await create(store, "one")
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
    sql(db_path, f"PRAGMA user_version = {schema.LATEST + 1}")
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
        await create(store, "m")
        wal = db_path.with_name(db_path.name + "-wal")
        assert wal.exists()
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


async def test_integrity_after_a_busy_life(db_path: Path) -> None:
    async with open_store(db_path) as store:
        refs = []
        for i in range(20):
            refs.append((await create(store, f"s{i}", uid=i % 3, now=T0 + i, i=str(i))).ref)
            await start(store, refs[-1], T0 + i)
        for ref in refs[::2]:
            await store.transition(ref, State.STOPPED, now=T0 + 50,
                                   end=RunEnd(reason=Reason.KILLED, signal=9))
            await store.remove_sandbox(ref, now=T0 + 60)
        await store.prune_events(keep=10)
        assert await store.sandbox_ids() == {ref.id for ref in refs[1::2]}
    assert sql(db_path, "PRAGMA integrity_check") == [("ok",)]
    assert sql(db_path, "PRAGMA foreign_key_check") == []
    assert sql(db_path, "SELECT count(*) FROM runs") == [(10,)]


@pytest.mark.parametrize("version", [0, 1])
async def test_concurrent_opens_of_one_file_migrate_once(db_path: Path, version: int) -> None:
    if version == 1:
        write_v1(db_path, with_rows=True)
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
    expected = [(1, "zeta"), (2, "alpha"), (3, "beta")] if version == 1 else []
    assert sql(db_path, "SELECT id, name FROM sandboxes ORDER BY id") == expected


# --- from version 1 ------------------------------------------------------------------------

V1_SANDBOX = ("INSERT INTO sandboxes (name, owner_uid, state, spec, labels, created_at,"
              " updated_at, current_run) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
V1_RUN = ("INSERT INTO runs (id, sandbox, pid, proc_start, boot_id, started_at, ended_at,"
          " reason, exit_code, signal, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
V1_EVENT = ("INSERT INTO events (seq, time, sandbox, owner_uid, state, run_id, reason,"
            " exit_code, signal, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def write_v1(path: Path, *, with_rows: bool) -> None:
    """A version-1 file as msbd 1 left it.

    Rows, if asked: sandboxes written out of creation order (`zeta` first by
    time; `alpha` and `beta` tie on time, so the name decides), a sandbox
    `gone` removed with its runs 2 and 5 (so the highest run id ever used, 5,
    is only in `sqlite_sequence`), and events 1-8 of which 1-2 were pruned.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys = ON")  # as msbd 1 ran
        conn.execute("BEGIN")
        for statement in schema.MIGRATIONS[0].statements:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        if with_rows:
            for name, uid, state, created, updated in [
                    ("beta", 1001, "created", T0 + 5, T0 + 5),
                    ("gone", 1000, "stopped", T0 + 1, T0 + 8),
                    ("zeta", 1000, "stopped", T0, T0 + 4),
                    ("alpha", 1001, "running", T0 + 5, T0 + 6)]:
                conn.execute(V1_SANDBOX, (
                    name, uid, state, msgspec.json.encode(spec(name, app=name)),
                    f'{{"app": "{name}"}}', created, updated, None))
            conn.executemany(V1_RUN, [
                (1, "zeta", 11, 110, "boot-0", T0 + 1, T0 + 2, "exited", 0, None, None),
                (2, "gone", 22, 220, "boot-0", T0 + 2, T0 + 3, "exited", 0, None, None),
                (3, "zeta", 33, 330, "boot-0", T0 + 3, T0 + 4, "killed", None, 9, "SIGKILL"),
                (4, "alpha", 4242, 777, "boot-a", T0 + 6, None, None, None, None, None),
                (5, "gone", 55, 550, "boot-a", T0 + 7, T0 + 8, "exited", 1, None, None)])
            for name, run in [("zeta", 3), ("alpha", 4), ("gone", 5)]:
                conn.execute("UPDATE sandboxes SET current_run = ? WHERE name = ?", (run, name))
            conn.executemany(V1_EVENT, [
                (seq, T0 + seq, name, 1000, state, run, None, None, None, None)
                for seq, name, state, run in [
                    (1, "zeta", "created", None), (2, "gone", "created", None),
                    (3, "zeta", "starting", 1), (4, "beta", "created", None),
                    (5, "alpha", "created", None), (6, "alpha", "running", 4),
                    (7, "gone", "stopped", 5), (8, "gone", "stopped", 5)]])
            conn.execute("DELETE FROM sandboxes WHERE name = 'gone'")
            conn.execute("DELETE FROM events WHERE seq <= 2")
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_migrating_a_version_1_file(db_path: Path) -> None:
    write_v1(db_path, with_rows=True)
    assert sql(db_path, "SELECT count(*) FROM runs") == [(3,)]  # gone's runs went with it
    assert sql(db_path, "SELECT seq FROM sqlite_sequence WHERE name = 'runs'") == [(5,)]

    async with open_store(db_path) as store:
        listed = await store.list_sandboxes()
        # Ids in creation order (created_at, then name), not in row order.
        assert [(i.id, i.name, i.owner_uid, i.state) for i in listed] == [
            (1, "zeta", 1000, State.STOPPED), (2, "alpha", 1001, State.RUNNING),
            (3, "beta", 1001, State.CREATED)]
        for info in listed:
            assert info.spec == spec(info.name, app=info.name)
            assert info.labels == {"app": info.name}
            assert await store.get_sandbox(info.name) == info
            # No gid or groups were kept by version 1: the user database decides.
            assert await store.owner(info.ref) == Owner(uid=info.owner_uid)
        zeta, alpha, beta = listed
        assert (zeta.created_at, zeta.updated_at) == (utc(T0), utc(T0 + 4))
        assert zeta.run == RunInfo(id=3, pid=33, started_at=utc(T0 + 3), ended_at=utc(T0 + 4),
                                   reason=Reason.KILLED, signal=9, detail="SIGKILL")
        assert beta.run is None
        assert await store.live_runs() == [LiveRun(
            ref=alpha.ref, run_id=4, state=State.RUNNING, pid=4242, proc_start=777,
            boot_id="boot-a", started_at=utc(T0 + 6))]
        # Events keep their seqs; they cannot know which record they were about.
        events = await store.events_since(0)
        assert [(e.seq, e.sandbox, e.sandbox_id, e.run_id) for e in events] == [
            (3, "zeta", None, 1), (4, "beta", None, None), (5, "alpha", None, None),
            (6, "alpha", None, 4), (7, "gone", None, 5), (8, "gone", None, 5)]
        assert await store.last_seq() == 8
        assert await store.last_seq(1000) == 8

    assert sql(db_path, "PRAGMA user_version") == [(schema.LATEST,)]
    assert sql(db_path, "SELECT id, sandbox_id, pid FROM runs ORDER BY id") == [
        (1, 1, 11), (3, 1, 33), (4, 2, 4242)]
    assert sql(db_path, "SELECT name, seq FROM sqlite_sequence ORDER BY name") == [
        ("events", 8), ("runs", 5), ("sandboxes", 3)]
    assert sql(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'"
                        " AND name NOT LIKE 'sqlite_%' ORDER BY name") == [
        ("events",), ("runs",), ("sandboxes",)]
    assert sql(db_path, "SELECT \"table\", \"from\", \"to\", on_delete"
                        " FROM pragma_foreign_key_list('runs')") == [
        ("sandboxes", "sandbox_id", "id", "CASCADE")]
    assert_sound(db_path)

    async with open_store(db_path) as store:
        # Run ids go on above the highest ever used, even one whose rows are gone.
        info, owner = await store.begin_run(beta.ref, now=T0 + 20)
        assert owner == Owner(uid=1001)
        assert info.run is not None
        assert info.run.id == 6
        made = await create(store, "omega", now=T0 + 21)
        assert made.id == 4
        # Foreign keys are on: a sandbox takes its runs with it.
        await store.remove_sandbox(zeta.ref, now=T0 + 22)
        assert sql(db_path, "SELECT id FROM runs ORDER BY id") == [(4,), (6,)]
        await store.transition(beta.ref, State.FAILED, now=T0 + 23,
                               end=RunEnd(reason=Reason.LAUNCH_FAILED))
        info, _ = await store.begin_run(beta.ref, now=T0 + 24)
        assert info.run is not None
        assert info.run.id == 7
        new_events = await store.events_since(8)
        assert [(e.seq, e.sandbox_id) for e in new_events] == [
            (9, 3), (10, 4), (11, 1), (12, 3), (13, 3)]
    assert sql(db_path, "SELECT id, sandbox_id FROM runs ORDER BY id") == [(4, 2), (6, 3), (7, 3)]
    assert_sound(db_path)


async def test_migrating_an_empty_version_1_file(db_path: Path) -> None:
    write_v1(db_path, with_rows=False)
    async with open_store(db_path) as store:
        assert await store.list_sandboxes() == []
        assert await store.last_seq() == 0
        made = await create(store, "first")
        info, _ = await store.begin_run(made.ref, now=T0 + 1)
        assert (made.id, info.run.id if info.run else None) == (1, 1)
    assert sql(db_path, "PRAGMA user_version") == [(schema.LATEST,)]
    assert_sound(db_path)


async def test_a_failed_migration_leaves_the_file_as_it_was(db_path: Path) -> None:
    write_v1(db_path, with_rows=True)
    sql(db_path, "CREATE TABLE sandboxes_v2 (x)")  # in the way of migration 2's first step
    before = {table: sql(db_path, f"SELECT * FROM {table} ORDER BY 1")
              for table in ("sandboxes", "runs", "events", "sqlite_sequence")}
    with pytest.raises(StoreError, match="cannot open the database"):
        async with open_store(db_path):
            pytest.fail("opened a half-migrated database")
    assert sql(db_path, "PRAGMA user_version") == [(1,)]
    assert {table: sql(db_path, f"SELECT * FROM {table} ORDER BY 1") for table in before} \
        == before
    assert [row[1] for row in sql(db_path, "PRAGMA table_info(sandboxes)")][:2] == [
        "name", "owner_uid"]
    sql(db_path, "DROP TABLE sandboxes_v2")
    async with open_store(db_path) as store:
        assert [i.ref for i in await store.list_sandboxes()] == [
            SandboxRef(1, "zeta"), SandboxRef(2, "alpha"), SandboxRef(3, "beta")]
    assert_sound(db_path)


def assert_sound(path: Path) -> None:
    assert sql(path, "PRAGMA integrity_check") == [("ok",)]
    assert sql(path, "PRAGMA foreign_key_check") == []


# --- from version 2 ------------------------------------------------------------------------


async def test_migrating_a_version_2_file_copies_network_and_ports(db_path: Path) -> None:
    """Version 3 copies each spec's network and ports into columns of their own; a spec
    without them (all of version 2's but the newest) gets NULL and [], a broken one too."""
    path = db_path
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for migration in schema.MIGRATIONS[:2]:
            for statement in migration.statements:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 2")
        published = msgspec.structs.replace(spec("web"), network=Network.NONE, ports=[
            PortMap(host=18080, guest=80)])
        for name, spec_json in [("old", msgspec.json.encode(spec("old"))),
                                ("web", msgspec.json.encode(published)),
                                ("broken", b"{not json")]:
            conn.execute("INSERT INTO sandboxes (name, owner_uid, state, spec, labels,"
                         " created_at, updated_at) VALUES (?, 1, 'created', ?, '{}', ?, ?)",
                         (name, spec_json, T0, T0))
        conn.execute("COMMIT")
    finally:
        conn.close()
    async with open_store(path) as store:
        listed = {i.name: (i.network, i.ports) for i in await store.list_sandboxes(
            with_spec=False)}
    # Without specs nothing decodes the broken one: it is listed with what its row says.
    assert listed == {"old": (None, []), "web": (Network.NONE, [PortMap(host=18080, guest=80)]),
                      "broken": (None, [])}
    assert sql(path, "SELECT name, network, ports FROM sandboxes ORDER BY id") == [
        ("old", None, "[]"), ("web", "none", '[{"host":18080,"guest":80,"address":null}]'),
        ("broken", None, "[]")]
