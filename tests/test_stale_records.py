"""A call that waited acts on the record it read, or on nothing: never on a newcomer's.

These run the daemon's handlers in-process (a real store file, a real
supervisor with the libkrun test double) so a hook can hold one call at a
chosen await while other calls remove its sandbox and another uid creates a
new one under the same name. The interleaving is forced by the hook, not by
timing. Needs root: the sandboxes belong to two unprivileged uids.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

import msbd.daemon.api as api_module
from msbd.config import load_settings
from msbd.daemon.access import Caller
from msbd.daemon.api import Api
from msbd.daemon.doctor import HostCheck
from msbd.daemon.events import EventHub
from msbd.daemon.supervisor import Supervisor
from msbd.daemon.timers import Scheduler
from msbd.db.store import Store, open_store
from msbd.errors import Conflict, NotFound
from msbd.model import LaunchSpec, State
from msbd.rpc.methods import (
    KillSandboxParams,
    NameParams,
    RemoveSandboxParams,
    StartSandboxParams,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as two uids")

A = Caller(uid=64101, gid=64101, groups=frozenset({64101}))
B = Caller(uid=64102, gid=64102, groups=frozenset({64102}))
CTX: Any = SimpleNamespace(connection=None)


@dataclass
class Daemon:
    api: Api
    store: Store
    supervisor: Supervisor
    roots: dict[int, Path]

    def spec(self, who: Caller, name: str, **extra: Any) -> LaunchSpec:
        return LaunchSpec(name=name, rootfs=str(self.roots[who.uid]), exec="/bin/busybox",
                          args=["sleep", "600"], memory_mib=64, **extra)


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="msbd-stale-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def in_process(base: Path, fakekrun: Path, busybox_root: Path) -> AsyncIterator[Daemon]:
    settings = load_settings(environ={}, flags={
        "socket": str(base / "msbd.sock"), "state_dir": str(base / "state"),
        "libkrun": str(fakekrun), "heartbeat_interval": 0.2, "stop_timeout": 5.0})
    roots = {}
    for who in (A, B):
        root = base / f"root-{who.uid}"
        shutil.copytree(busybox_root, root, symlinks=True)
        os.chown(root, who.uid, who.gid)
        roots[who.uid] = root
    host = HostCheck(python=settings.worker_python, libkrun=settings.libkrun, env={})
    async with open_store(settings.db_path) as store, anyio.create_task_group() as tg:
        scheduler = Scheduler()
        supervisor = Supervisor(settings=settings, store=store, scheduler=scheduler,
                                task_group=tg, host=host)
        await tg.start(scheduler.run, supervisor.fire)
        api = Api(settings=settings, store=store, supervisor=supervisor, hub=EventHub(),
                  host=host, started=0.0)
        try:
            yield Daemon(api, store, supervisor, roots)
        finally:
            with anyio.CancelScope(shield=True):
                await supervisor.shutdown(grace=1.0)
            tg.cancel_scope.cancel()


async def in_thread_wait(event: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(event.wait, 30), "the hook was never reached"


async def test_start_held_over_a_remove_and_recreate_touches_nothing_of_the_newcomer(
        base: Path, fakekrun: Path, busybox_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """B's start waits in its path check; meanwhile B removes `job` and A creates its own
    `job` with a secret. B's start must neither launch anything of A's record nor show it."""
    reached, release = threading.Event(), threading.Event()
    real_check = api_module.check_spec_paths

    def held_check(spec: LaunchSpec, caller: Caller, **kw: Any) -> None:
        real_check(spec, caller, **kw)
        if caller.uid == B.uid and spec.name == "job" and not release.is_set():
            reached.set()
            release.wait(30)

    async with in_process(base, fakekrun, busybox_root) as d:
        await d.api.create(B, d.spec(B, "job"), CTX)
        monkeypatch.setattr(api_module, "check_spec_paths", held_check)
        outcome: dict[str, Any] = {}

        async def b_starts() -> None:
            try:
                outcome["result"] = await d.api.start(B, StartSandboxParams(name="job"), CTX)
            except Exception as exc:
                outcome["error"] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(b_starts)
            await in_thread_wait(reached)
            await d.api.remove(B, RemoveSandboxParams(name="job"), CTX)
            mine = await d.api.create(A, d.spec(A, "job", env={"SECRET": "a-secret"}), CTX)
            release.set()

        assert "result" not in outcome, f"B's start answered with {outcome['result']}"
        assert isinstance(outcome["error"], NotFound), outcome["error"]
        now = await d.store.get_sandbox("job")
        assert now == mine  # A's record: same id, still `created`, never run
        assert now.state is State.CREATED and now.run is None
        assert not d.supervisor.live


async def test_forced_remove_held_over_a_recreate_removes_nothing_of_the_newcomer(
        base: Path, fakekrun: Path, busybox_root: Path) -> None:
    """B force-removes its running `job`; after the stop, before the removal, the name
    is freed and A creates `job`. B's removal must not remove A's record."""
    async with in_process(base, fakekrun, busybox_root) as d:
        await d.api.run(B, d.spec(B, "job"), CTX)
        stopped, release = anyio.Event(), anyio.Event()
        real_stop: Callable[..., Any] = d.supervisor.stop

        async def held_stop(*args: Any, **kw: Any) -> Any:
            result = await real_stop(*args, **kw)
            if kw.get("detail") == "removed with force" and not release.is_set():
                stopped.set()
                await release.wait()
            return result

        d.supervisor.stop = held_stop  # type: ignore[method-assign]
        outcome: dict[str, Any] = {}

        async def b_removes() -> None:
            try:
                outcome["result"] = await d.api.remove(
                    B, RemoveSandboxParams(name="job", force=True), CTX)
            except Exception as exc:
                outcome["error"] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(b_removes)
            with anyio.fail_after(30):
                await stopped.wait()
            await d.api.remove(B, RemoveSandboxParams(name="job"), CTX)
            mine = await d.api.create(A, d.spec(A, "job"), CTX)
            release.set()

        assert "result" not in outcome, f"B's remove answered with {outcome['result']}"
        assert isinstance(outcome["error"], NotFound), outcome["error"]
        assert await d.store.get_sandbox("job") == mine


async def test_metrics_never_read_proc_of_a_reaped_worker(
        base: Path, fakekrun: Path, busybox_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between reaping a worker and recording its end, its pid is free for the kernel to
    give to anyone: `sandbox.metrics` must not read /proc of it then."""
    import msbd.daemon.procfs as procfs

    read: list[int] = []
    real_usage = procfs.usage

    def spying_usage(pid: int) -> Any:
        read.append(pid)
        return real_usage(pid)

    monkeypatch.setattr(procfs, "usage", spying_usage)
    async with in_process(base, fakekrun, busybox_root) as d:
        info = await d.api.run(B, d.spec(B, "job"), CTX)
        pid = info.run.pid if info.run else None
        assert (await d.api.metrics(B, NameParams(name="job"), CTX)).pid == pid
        assert read == [pid]
        held, release = anyio.Event(), anyio.Event()
        real_transition = d.store.transition

        async def held_transition(*args: Any, **kw: Any) -> Any:
            if kw.get("end") is not None and not release.is_set():  # the run's end
                held.set()
                await release.wait()
            return await real_transition(*args, **kw)

        d.store.transition = held_transition  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(d.api.kill, B, KillSandboxParams(name="job"), CTX)
            with anyio.fail_after(30):
                await held.wait()  # reaped; its end not yet recorded
            with pytest.raises(Conflict, match="not running"):
                await d.api.metrics(B, NameParams(name="job"), CTX)
            release.set()
        assert read == [pid]
