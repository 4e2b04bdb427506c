"""The fork server and the orphan reaper: real zygotes, real workers, real daemons.

A forked worker must be indistinguishable from a spawned one: the same fd
table, session, parent, signal state and environment, compared with a worker
spawned by `spawn_worker` side by side. The tests without a daemon make the
test process a child subreaper for their duration, as the daemon is, so that
forked workers become its children. Facts are waited on (pidfds, /proc),
never slept for.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import pytest
from daemonproc import (
    DaemonProc,
    is_zygote,
    make_busybox_root,
    wait_pids_gone,
    waiting_for_spec,
)
from tenants import sleeper
from test_pool import pipe_holders

from msbd.config import Settings
from msbd.daemon import reaper
from msbd.daemon.forkserver import ForkServer
from msbd.daemon.pool import end_worker, write_spec
from msbd.daemon.spawn import Worker, spawn_worker, worker_environ

WAIT = 30.0
PROTOCOL_FDS = ["0", "1", "2", "96", "97", "98"]


def until(fact: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll `fact` (a /proc reading) until it holds."""
    deadline = time.monotonic() + timeout
    while not fact():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.005)


def proc_status(pid: int, *keys: str) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = value.strip()
    return out


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def fd_table(pid: int) -> dict[str, tuple[str, str]]:
    """{fd: (what it is, its flags in fdinfo)} of `pid`, pipe inodes made comparable."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        flags = next(line.split()[1] for line in
                     Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
                     if line.startswith("flags:"))
        out[fd] = ("pipe" if target.startswith("pipe:") else target, flags)
    return out


def inode(pid: int, fd: int) -> int:
    return os.stat(f"/proc/{pid}/fd/{fd}").st_ino


@pytest.fixture
def subreaper() -> Iterator[None]:
    """The test process as a child subreaper (as the daemon makes itself), then not."""
    assert reaper.become_subreaper()
    yield
    ctypes.CDLL(None, use_errno=True).prctl(36, 0, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER off


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[ForkServer]:
    """A fork server served in this task (a task group cannot span a fixture's setup and
    teardown, which run in different tasks)."""
    server = ForkServer(Settings(worker_python=sys.executable))
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


async def forked(server: ForkServer) -> Worker:
    with anyio.fail_after(WAIT):
        await server.wait_ready()
    worker = await server.fork()
    assert worker is not None, "the fork server did not fork"
    return worker


async def test_a_forked_worker_is_a_spawned_one(subreaper: None,
                                                make_spec: Callable[..., bytes]) -> None:
    async with serving() as forkserver:
        await _forked_like_spawned(forkserver, make_spec())


async def _forked_like_spawned(forkserver: ForkServer, spec: bytes) -> None:
    worker = await forked(forkserver)
    spawned = spawn_worker([sys.executable, "-m", "msbd.vm"], worker_environ({}), None)
    try:
        pid = worker.pid
        until(lambda: waiting_for_spec(pid) and waiting_for_spec(spawned.pid),
              "both workers wait for their spec")
        assert parent_of(pid) == os.getpid(), "the forked worker is not our child"
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid, "not a session leader"
        table = fd_table(pid)
        assert sorted(table, key=int) == PROTOCOL_FDS, table
        assert table == fd_table(spawned.pid), "the fd tables differ"
        assert table["0"][0] == "/dev/null"
        assert inode(pid, 1) == inode(pid, 2) == os.fstat(worker.console_r).st_ino
        assert inode(pid, 96) == os.fstat(worker.spec_w).st_ino
        assert inode(pid, 97) == os.fstat(worker.watchdog_w).st_ino
        assert inode(pid, 98) == os.fstat(worker.status_r).st_ino
        # the spec pipe: the worker reads it, and only we can write it
        holders = pipe_holders(inode(pid, 96))
        assert set(holders) == {pid, os.getpid()}, holders
        signals = ("SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd")
        assert proc_status(pid, *signals) == proc_status(spawned.pid, *signals)
        assert (sorted(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
                == sorted(Path(f"/proc/{spawned.pid}/environ").read_bytes().split(b"\0")))

        await write_spec(worker, spec, timeout=WAIT)
        with anyio.fail_after(WAIT):
            await anyio.wait_readable(worker.pidfd)
        ended = os.waitid(os.P_PIDFD, worker.pidfd, os.WEXITED)
        assert ended is not None and (ended.si_code, ended.si_status) == (os.CLD_EXITED, 0)
        status = os.read(worker.status_r, 4096)
        assert status.startswith(b"entering\n"), status
        console = os.read(worker.console_r, 4096)
        assert b"closed" not in console, console  # no inherited fd to close
    finally:
        await end_worker(spawned)
        await end_worker(worker)


async def test_the_zygote_keeps_no_fd_of_a_worker(subreaper: None) -> None:
    async with serving() as forkserver:
        await _no_fd_kept(forkserver)


async def _no_fd_kept(forkserver: ForkServer) -> None:
    zygote = forkserver.pid
    assert zygote is not None
    await end_worker(await forked(forkserver))  # answered: the zygote is done starting
    before = fd_table(zygote)
    assert sorted(before, key=int) == ["0", "1", "2", "3"], before
    assert before["3"][0].startswith("socket:")
    workers = [await forked(forkserver) for _ in range(3)]
    try:
        assert len({w.pid for w in workers}) == 3
        assert fd_table(zygote) == before, "the zygote kept a worker's fd"
        assert proc_status(zygote, "Threads")["Threads"] == "1", "the zygote has threads"
    finally:
        for w in workers:
            await end_worker(w)


async def test_a_dead_zygote_is_replaced_and_fork_says_none_meanwhile(
        subreaper: None) -> None:
    async with serving() as forkserver:
        await _replaced(forkserver)


async def _replaced(forkserver: ForkServer) -> None:
    first = forkserver.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_pids_gone({first})
    # Until `serve` noticed, a request fails (None: the caller spawns instead); then a
    # new zygote forks again.
    deadline = time.monotonic() + WAIT
    while True:
        worker = await forkserver.fork()
        if worker is not None:
            break
        assert time.monotonic() < deadline, "no new zygote"
        await anyio.sleep(0.01)
    try:
        assert forkserver.pid not in (None, first)
        assert parent_of(worker.pid) == os.getpid()
    finally:
        await end_worker(worker)


async def test_a_zygote_that_never_gets_ready_delays_nothing(subreaper: None,
                                                             gated_python: Path) -> None:
    """Held before its interpreter starts, the zygote never says it is ready: `fork`
    answers None at once (the caller spawns), and serving ends it all the same."""
    server = ForkServer(Settings(worker_python=str(gated_python)))
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        held = server.pid
        assert held is not None
        with anyio.fail_after(5):
            assert await server.fork() is None
        assert not server.up
        tg.cancel_scope.cancel()
    wait_pids_gone({held})


# --- the orphan reaper, on its own ------------------------------------------------------


def _exited_child(*, new_session: bool) -> int:
    pid = os.posix_spawn("/bin/true", ["/bin/true"], {}, setsid=new_session)
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], WAIT)[0]
    finally:
        os.close(fd)
    return pid


def _unreaped(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG) is not None
    except ChildProcessError:
        return False


def test_the_reaper_reaps_only_unclaimed_children_of_other_sessions() -> None:
    orphan = _exited_child(new_session=True)
    claimed = _exited_child(new_session=True)
    ours = _exited_child(new_session=False)  # as asyncio's subprocesses: the loop reaps those
    reaper.claim(claimed)
    try:
        with reaper.forking():
            assert reaper.reap() == [], "reaped while a fork request was in flight"
        assert reaper.reap() == [orphan]
        assert not _unreaped(orphan)
        assert _unreaped(claimed), "a claimed child was reaped"
        assert _unreaped(ours), "a child of our own session was reaped"
    finally:
        reaper.release(claimed)


# --- in the daemon -------------------------------------------------------------------


@pytest.fixture
def pooled(make_daemon: Callable[..., DaemonProc], fakekrun: Path) -> DaemonProc:
    return make_daemon(libkrun=fakekrun)


def test_the_daemon_forks_its_workers(pooled: DaemonProc, busybox_root: Path) -> None:
    """The pool's first workers may be spawned (the daemon waits for no zygote); once
    the zygote is ready, every refill is forked."""
    assert pooled.proc is not None
    zygote = pooled.wait_fork_server()
    before = fd_table(zygote)
    idle = pooled.children()
    assert len(idle) == 2
    first = [pooled.call("sandbox.run", sleeper(f"f{i}", busybox_root))["run"]["pid"]
             for i in range(2)]
    assert set(first) == idle
    until(lambda: sum(map(waiting_for_spec, pooled.children() - set(first))) == 2,
          "the pool refilled")
    pids = [pooled.call("sandbox.run", sleeper(f"f{i}", busybox_root))["run"]["pid"]
            for i in range(2, 4)]
    for pid in pids:
        assert parent_of(pid) == pooled.proc.pid
        assert Path(f"/proc/{pid}/cmdline").read_bytes().endswith(b"\0zygote\0"), "spawned"
        assert not os.path.lexists(f"/proc/{pid}/fd/96"), "the spec fd outlived its read"
    # Once the pool is full again, no request is in flight: the zygote is back as it was.
    until(lambda: sum(map(waiting_for_spec, pooled.children() - set(first + pids))) == 2,
          "the pool refilled")
    assert fd_table(zygote) == before, "the zygote kept a worker's fd"


def test_a_launch_that_finds_no_idle_worker_gets_a_forked_one(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, busybox_root: Path) -> None:
    """With no pool, every launch takes the path of a burst that emptied it: a worker
    forked for it, its spec written into its pipe (never a memfd through the zygote)."""
    d = make_daemon(libkrun=fakekrun, settings={"worker_pool": 0})
    zygote = d.wait_fork_server()
    before = fd_table(zygote)
    assert d.children() == set()
    for i in range(3):
        pid = d.call("sandbox.run", sleeper(f"n{i}", busybox_root))["run"]["pid"]
        assert Path(f"/proc/{pid}/cmdline").read_bytes().endswith(b"\0zygote\0"), "spawned"
    assert fd_table(zygote) == before, "the zygote kept a worker's fd"


def test_without_the_fork_server_workers_are_spawned(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, busybox_root: Path) -> None:
    d = make_daemon(libkrun=fakekrun, settings={"worker_fork_server": False})
    assert d.zygotes() == [] and len(d.children()) == 2
    pid = d.call("sandbox.run", sleeper("s", busybox_root))["run"]["pid"]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().endswith(b"-m\0msbd.vm\0")


def test_the_pool_outlives_its_zygote(pooled: DaemonProc, busybox_root: Path) -> None:
    first = pooled.wait_fork_server()
    os.kill(first, signal.SIGKILL)
    wait_pids_gone({first})
    # The pool's two, then launches while the zygote is restarted: none is lost.
    for i in range(4):
        info = pooled.call("sandbox.run", sleeper(f"z{i}", busybox_root))
        assert info["state"] == "running", info
    assert pooled.wait_fork_server() != first, "no new zygote"
    assert "the fork server ended" in pooled.stderr()
    info = pooled.call("sandbox.run", sleeper("after", busybox_root))
    assert info["state"] == "running"


def test_an_orphan_left_by_a_workload_is_reaped(pooled: DaemonProc, tmp_path: Path) -> None:
    """The workload starts a background process and ends; its worker ends with it, and
    the process, orphaned, is handed to the daemon (a subreaper). Once it exits, the
    daemon reaps it: no zombie stays."""
    assert pooled.proc is not None
    root = make_busybox_root(tmp_path / "root")
    # busybox sh gives a background job /dev/null as its stdin
    os.mknod(root / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    spec = sleeper("o", root, args=["sh", "-c", "sleep 600 & echo $!"])
    pooled.call("sandbox.run", spec)
    end = pooled.call("sandbox.wait", {"name": "o", "timeout": WAIT})
    assert (end["run"]["reason"], end["run"]["exit_code"]) == ("exited", 0), end["run"]
    console = pooled.call("sandbox.logs", {"name": "o"})["data"]
    assert console.strip().isdigit(), console
    orphan = int(console)
    assert parent_of(orphan) == pooled.proc.pid, "the orphan was not handed to the daemon"
    os.kill(orphan, signal.SIGKILL)
    until(lambda: not os.path.exists(f"/proc/{orphan}"), "the orphan reaped")
    assert not [pid for pid in pooled.all_children() if not is_zygote(pid)
                and Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"]


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_the_zygote_ends_with_its_daemon(pooled: DaemonProc, how: str) -> None:
    """Stopped, the daemon ends it; killed, the zygote reads EOF on its socket and exits."""
    assert pooled.proc is not None
    [zygote] = pooled.zygotes()
    fd = os.pidfd_open(zygote)
    try:
        if how == "stopped":
            assert pooled.stop() == 0
        else:
            pooled.proc.kill()
            pooled.proc.wait(WAIT)
        assert select.select([fd], [], [], WAIT)[0], "the zygote outlived its daemon"
    finally:
        os.close(fd)
