"""What the store's tests share: specs, owners, times, and raw SQL on the database file.

The fixtures `db_path` and `store` live in conftest.py (fixtures cannot be
imported without looking unused); plain helpers live here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio

from msbd.db.store import Store
from msbd.model import LaunchSpec, Owner, SandboxInfo, SandboxRef, State

T0 = 1_700_000_000.0


def spec(name: str, **labels: str) -> LaunchSpec:
    return LaunchSpec(name=name, exec="/bin/sh", rootfs="/srv/root", args=["-c", "true"],
                      env={"A": "1"}, labels=labels)


def utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


async def create(store: Store, name: str, *, uid: int = 1, now: float = T0,
                 max_owned: int | None = None, **labels: str) -> SandboxInfo:
    info, _ = await store.create_sandbox(spec(name, **labels), owner=Owner(uid=uid), now=now,
                                         max_owned=max_owned)
    return info


async def start(store: Store, ref: SandboxRef, now: float, pid: int = 4242) -> SandboxInfo:
    """created/stopped -> starting (with a process) -> running; the running record."""
    info, _ = await store.begin_run(ref, now=now)
    assert info.run is not None
    await store.set_run_process(ref, info.run.id, pid=pid, proc_start=777, boot_id="boot-a")
    running, _ = await store.transition(ref, State.RUNNING, now=now + 1)
    return running


async def race(times: int, attempt: Callable[[int], Awaitable[object]],
               refused: type[Exception]) -> list[str]:
    """Run `attempt(0)` .. `attempt(times - 1)` at once; "refused" (raised `refused`)
    or "won" for each, sorted."""
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            await attempt(i)
        except refused:
            outcomes.append("refused")
        else:
            outcomes.append("won")

    async with anyio.create_task_group() as tg:
        for i in range(times):
            tg.start_soon(one, i)
    return sorted(outcomes)


def sql(path: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on its own connection (committed), as a person with sqlite3 would."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            return conn.execute(query, params).fetchall()
    finally:
        conn.close()


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on the existing directory `where` (root only)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "msbd-test",
                    str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
