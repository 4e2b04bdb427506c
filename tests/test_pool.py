"""The warm worker pool end to end: real daemons, real workers, the libkrun test double.

What the pool holds is read from /proc: the daemon's children before a call
are its idle pool workers (the pool is full before READY=1, and nothing else
is a child of an idle daemon). Each fact is waited on through a pidfd or a
reply, never a sleep.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc, wait_pids_gone
from tenants import SHARED_GID, A, B, ok, sleeper

from msbd.contract import WorkerExit
from msbd.daemon.spawn import spawn_worker, worker_environ

WAIT = 30.0


def status_ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid and Groups lines of /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


def pipe_holders(inode: int) -> dict[int, list[int]]:
    """{pid: [fd flags...]} of every process holding the pipe `inode` open."""
    holders: dict[int, list[int]] = {}
    target = f"pipe:[{inode}]"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") != target:
                    continue
                info = Path(f"/proc/{entry}/fdinfo/{fd}").read_text()
            except OSError:
                continue
            flags = next(int(line.split()[1], 8) for line in info.splitlines()
                         if line.startswith("flags:"))
            holders.setdefault(int(entry), []).append(flags)
    return holders


@pytest.fixture
def pooled(make_daemon: Callable[..., DaemonProc], fakekrun: Path) -> Iterator[DaemonProc]:
    yield make_daemon(libkrun=fakekrun, settings={"heartbeat_interval": 0.2})


def test_a_launch_takes_a_warm_worker_and_the_pool_refills(pooled: DaemonProc,
                                                            busybox_root: Path) -> None:
    before = pooled.children()
    assert len(before) == 2, "the default pool is two workers, ready with READY=1"
    first = pooled.call("sandbox.run", sleeper("w1", busybox_root))
    assert first["state"] == "running"
    assert first["run"]["pid"] in before, "the launch spawned a worker instead of taking one"
    second = pooled.call("sandbox.run", sleeper("w2", busybox_root))["run"]["pid"]
    assert second in before and second != first["run"]["pid"]
    # Each launch, once answered, asks for its replacement; the pool spawns them in
    # the background (through the fork server), so the second answer may come first.
    taken = {first["run"]["pid"], second}
    refilled = pooled.wait_children(lambda now: len(now - taken) == 2) - taken
    assert not refilled & before, (before, refilled)
    third = pooled.call("sandbox.run", sleeper("w3", busybox_root))["run"]["pid"]
    assert third in refilled, "the pool did not refill"
    assert pooled.call("sandbox.logs", {"name": "w1"})["data"] == ""


def test_pool_zero_spawns_per_launch(make_daemon: Callable[..., DaemonProc], fakekrun: Path,
                                     busybox_root: Path) -> None:
    d = make_daemon(libkrun=fakekrun, settings={"worker_pool": 0})
    assert d.children() == set()
    info = d.call("sandbox.run", sleeper("cold", busybox_root))
    assert info["state"] == "running"
    assert d.children() == {info["run"]["pid"]}


def test_the_spec_pipe_is_the_daemons_alone_and_closed_at_hand_off(
        pooled: DaemonProc, busybox_root: Path) -> None:
    assert pooled.proc is not None
    daemon = pooled.proc.pid
    workers = pooled.children()
    inodes = {}
    for pid in workers:
        st = os.stat(f"/proc/{pid}/fd/96")
        assert stat.S_ISFIFO(st.st_mode)
        inodes[pid] = st.st_ino
        holders = pipe_holders(st.st_ino)
        assert set(holders) == {pid, daemon}, holders
        assert [f & os.O_ACCMODE for f in holders[daemon]] == [os.O_WRONLY]
        assert [f & os.O_ACCMODE for f in holders[pid]] == [os.O_RDONLY]
    pid = pooled.call("sandbox.run", sleeper("p", busybox_root))["run"]["pid"]
    assert pid in workers
    assert pipe_holders(inodes[pid]) == {}, "the spec pipe outlived the hand-off"


def test_a_killed_pool_worker_is_never_handed_out(pooled: DaemonProc,
                                                  busybox_root: Path) -> None:
    killed = pooled.children()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    wait_pids_gone(killed)
    info = pooled.call("sandbox.run", sleeper("after-kill", busybox_root))
    assert info["state"] == "running"
    assert info["run"]["pid"] not in killed
    pooled.call("sandbox.stop", {"name": "after-kill", "timeout": 10})
    again = pooled.call("sandbox.run", sleeper("again", busybox_root))
    assert again["state"] == "running"


def test_an_idle_worker_is_recycled(make_daemon: Callable[..., DaemonProc], fakekrun: Path,
                                    busybox_root: Path) -> None:
    d = make_daemon(libkrun=fakekrun, settings={"worker_pool_idle": 0.5})
    first = d.children()
    assert len(first) == 2
    wait_pids_gone(first)  # nothing took them: they idled out
    info = d.call("sandbox.run", sleeper("late", busybox_root))
    assert info["state"] == "running" and info["run"]["pid"] not in first


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become uids")
def test_two_tenants_never_share_a_worker(shared: DaemonProc, make_root: Callable[..., Path]
                                          ) -> None:
    pool = shared.children()
    for pid in pool:
        assert status_ids(pid)["Uid"] == [0, 0, 0, 0], "a pooled worker is the daemon's"
    a_secret: dict[str, Any] = {"env": {"A_SECRET": "a-only"}}
    a = ok(shared.socket, A, "sandbox.run", sleeper("a", make_root("a-root", A), **a_secret))
    b = ok(shared.socket, B, "sandbox.run", sleeper("b", make_root("b-root", B)))
    a_pid, b_pid = a["run"]["pid"], b["run"]["pid"]
    assert a_pid != b_pid
    assert a_pid in pool
    assert status_ids(a_pid)["Uid"] == [A.uid] * 4 and status_ids(a_pid)["Gid"] == [A.gid] * 4
    assert set(status_ids(a_pid)["Groups"]) >= {SHARED_GID}
    assert status_ids(b_pid)["Uid"] == [B.uid] * 4 and status_ids(b_pid)["Gid"] == [B.gid] * 4
    assert SHARED_GID not in status_ids(b_pid)["Groups"]
    for pid in shared.children() - {a_pid, b_pid}:  # the refilled pool: nobody's yet
        assert status_ids(pid)["Uid"] == [0, 0, 0, 0]
        assert b"a-only" not in Path(f"/proc/{pid}/environ").read_bytes()


def test_no_process_outlives_the_daemon(pooled: DaemonProc, busybox_root: Path) -> None:
    live = pooled.call("sandbox.run", sleeper("live", busybox_root))["run"]["pid"]
    left = pooled.children()
    assert live in left and len(left) >= 2  # the sandbox's worker, and idle ones
    fds = [os.pidfd_open(pid) for pid in left]
    try:
        assert pooled.stop() == 0
        for fd in fds:
            assert select.select([fd], [], [], 0)[0], "a worker outlived the daemon"
    finally:
        for fd in fds:
            os.close(fd)


def test_no_pool_without_a_libkrun(daemon: DaemonProc) -> None:
    """A daemon that cannot launch (no libkrun found) keeps no idle interpreters."""
    assert daemon.call("daemon.ping") == "pong"
    assert daemon.children() == set()


@pytest.mark.parametrize("data", [b"", b"{not json"])
def test_a_pooled_worker_refuses_a_spec_it_cannot_decode(data: bytes) -> None:
    """Spawned as the pool spawns (fd 96 a pipe), the worker refuses what it cannot decode,
    as always; an empty spec is what an idle worker reads when its daemon dies."""
    worker = spawn_worker([sys.executable, "-m", "msbd.vm"], worker_environ({}), None)
    try:
        os.set_blocking(worker.spec_w, True)
        os.write(worker.spec_w, data)
        os.close(worker.spec_w)
        worker.spec_w = -1
        assert select.select([worker.pidfd], [], [], WAIT)[0], "the worker did not exit"
        ended = os.waitid(os.P_PIDFD, worker.pidfd, os.WEXITED)
        assert ended is not None and ended.si_code == os.CLD_EXITED
        assert ended.si_status == WorkerExit.CHECK_FAILED
        status = b""
        while chunk := os.read(worker.status_r, 4096):
            status += chunk
        assert status.startswith(b"error spec: spec is not valid JSON"), status
    finally:
        worker.close()
