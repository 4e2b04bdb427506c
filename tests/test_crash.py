"""Things going wrong on purpose: a SIGKILLed daemon, reused pids, crashing workers."""

from __future__ import annotations

import concurrent.futures
import os
import select
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc

from msbd.daemon import procfs
from msbd.errors import RemoteError

# The workers' own grace after EOF on fd 97 (stop_timeout, default 10 s) plus slack.
GRACE = 10.0 + 5.0


def spec(name: str, root: Path, script: str = "exec sleep 600", **extra: Any) -> dict[str, Any]:
    return {"name": name, "rootfs": str(root), "exec": "/bin/sh", "args": ["-c", script],
            "memory_mib": 64} | extra


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Block on each pid's pidfd until it exits or `timeout` passes; the ones still alive."""
    deadline = time.monotonic() + timeout
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                alive.append(pid)
        finally:
            os.close(fd)
    return alive


def integrity(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def test_sigkilled_daemon_leaves_no_worker_and_restart_closes_runs(
        make_daemon: Any, fakekrun: Path, busybox_root: Path) -> None:
    d: DaemonProc = make_daemon(libkrun=fakekrun)
    names = [f"orphan{i:02d}" for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda n: d.call("sandbox.run", spec(n, busybox_root)), names))
    pids = [i["run"]["pid"] for i in infos]
    assert all(i["state"] == "running" for i in infos)

    t0 = time.monotonic()
    d.stop(sig=signal.SIGKILL)
    assert wait_gone(pids, GRACE) == [], "workers outlived their daemon"
    # With the test double the guest stops at once on the shutdown request.
    assert time.monotonic() - t0 < GRACE
    assert integrity(d.state_dir / "msbd.db") == "ok"

    d.start()
    listed = {s["name"]: s for s in d.call("sandbox.list")["sandboxes"]}
    for name in names:
        run = listed[name]["run"]
        assert listed[name]["state"] == "stopped"
        assert run["reason"] == "daemon_lost"
        assert "gone" in run["detail"]
    events = [e for e in _replay(d) if e["reason"] == "daemon_lost"]
    assert sorted(e["sandbox"] for e in events) == names
    # And the records are usable: a lost sandbox starts again.
    assert d.call("sandbox.start", {"name": names[0]})["state"] == "running"


def _replay(d: DaemonProc) -> list[dict[str, Any]]:
    with d.client() as c:
        head = c.call("events.subscribe", {"since": 0})["seq"]
        out = []
        for _, params in c.iter_notifications(timeout=30):
            out.append(params["event"])
            if params["event"]["seq"] >= head:
                return out
    return out


def _plant_live_run(db: Path, name: str, *, pid: int, proc_start: int | None,
                    boot_id: str | None) -> None:
    """Make the stopped sandbox `name` look as if a daemon died while it ran as `pid`."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET ended_at = NULL, reason = NULL, exit_code = NULL, "
                     "signal = NULL, detail = NULL, pid = ?, proc_start = ?, boot_id = ? "
                     "WHERE id = (SELECT current_run FROM sandboxes WHERE name = ?)",
                     (pid, proc_start, boot_id, name))
        conn.execute("UPDATE sandboxes SET state = 'running' WHERE name = ?", (name,))


@pytest.fixture
def bystander() -> Any:
    """A live process that is not a worker of any daemon."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _daemon_with_planted_run(make_daemon: Any, fakekrun: Path, root: Path, name: str, *,
                             pid: int, proc_start: int | None, boot_id: str | None
                             ) -> DaemonProc:
    """A daemon restarted over a database that claims `name` ran as `pid` when it died."""
    d: DaemonProc = make_daemon(libkrun=fakekrun)
    d.call("sandbox.run", spec(name, root, "exit 0"))
    d.call("sandbox.wait", {"name": name})
    d.stop()
    _plant_live_run(d.state_dir / "msbd.db", name, pid=pid, proc_start=proc_start,
                    boot_id=boot_id)
    return d.start()


def test_a_reused_pid_is_never_adopted_or_killed(make_daemon: Any, fakekrun: Path,
                                                 busybox_root: Path, bystander: Any) -> None:
    # An unrelated live process now holds the recorded pid; its start time differs.
    start = procfs.start_ticks(bystander.pid)
    assert start is not None
    d = _daemon_with_planted_run(make_daemon, fakekrun, busybox_root, "reused",
                                 pid=bystander.pid, proc_start=start - 1,
                                 boot_id=procfs.boot_id())
    run = d.call("sandbox.get", {"name": "reused"})["run"]
    assert run["reason"] == "daemon_lost"
    assert "another process" in run["detail"]
    assert bystander.poll() is None, "an unrelated process was signalled"


def test_a_recorded_worker_still_alive_is_killed_not_adopted(
        make_daemon: Any, fakekrun: Path, busybox_root: Path, bystander: Any) -> None:
    """Identity matches (boot id and start time): it is that worker, so it is ended."""
    d = _daemon_with_planted_run(make_daemon, fakekrun, busybox_root, "survivor",
                                 pid=bystander.pid,
                                 proc_start=procfs.start_ticks(bystander.pid),
                                 boot_id=procfs.boot_id())
    assert bystander.wait(timeout=30) == -signal.SIGKILL
    run = d.call("sandbox.get", {"name": "survivor"})["run"]
    assert run["reason"] == "daemon_lost"
    assert "outlived the daemon and was killed" in run["detail"]


def test_another_boots_pid_is_never_trusted(make_daemon: Any, fakekrun: Path,
                                            busybox_root: Path, bystander: Any) -> None:
    d = _daemon_with_planted_run(make_daemon, fakekrun, busybox_root, "oldboot",
                                 pid=bystander.pid,
                                 proc_start=procfs.start_ticks(bystander.pid),
                                 boot_id="00000000-0000-0000-0000-000000000000")
    assert d.call("sandbox.get", {"name": "oldboot"})["run"]["reason"] == "daemon_lost"
    assert bystander.poll() is None


def test_killed_at_any_point_loses_no_acknowledged_record(make_daemon: Any, fakekrun: Path,
                                                          busybox_root: Path) -> None:
    """Clients create and run sandboxes; the daemon is SIGKILLed after a varying number
    of acknowledgements, while other calls are in flight. Every acknowledged record
    survives, the database is intact, and a restart reconciles it."""
    d: DaemonProc = make_daemon(libkrun=fakekrun)
    acknowledged: set[str] = set()
    for round_, kill_after in enumerate((3, 7, 12)):
        count = 0
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            def one(i: int, round_: int = round_) -> str | None:
                name = f"r{round_}n{i}"
                method = "sandbox.run" if i % 3 == 0 else "sandbox.create"
                try:
                    d.call(method, spec(name, busybox_root))
                except (RemoteError, OSError):
                    return None
                return name
            futures = [pool.submit(one, i) for i in range(40)]
            for fut in concurrent.futures.as_completed(futures):
                name = fut.result()
                if name is not None:
                    acknowledged.add(name)
                    count += 1
                if count == kill_after and d.proc is not None and d.proc.poll() is None:
                    d.stop(sig=signal.SIGKILL)
        if d.proc is not None and d.proc.poll() is None:
            d.stop(sig=signal.SIGKILL)
        assert integrity(d.state_dir / "msbd.db") == "ok"
        d.start()
        listed = {s["name"]: s for s in d.call("sandbox.list")["sandboxes"]}
        assert acknowledged <= set(listed), sorted(acknowledged - set(listed))
        assert not [s for s in listed.values() if s["state"] in ("starting", "running",
                                                                 "stopping")]


def test_worker_dying_before_entering_libkrun_is_recorded_with_its_last_words(
        make_daemon: Any, fakekrun: Path, busybox_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'worker: cannot import the world' >&2\nexit 1\n")
    broken.chmod(0o755)
    d: DaemonProc = make_daemon(libkrun=fakekrun, settings={"worker_python": str(broken)})
    with pytest.raises(RemoteError) as err:
        d.call("sandbox.run", spec("early", busybox_root))
    assert err.value.rpc_code == -32005
    assert "cannot import the world" in err.value.message
    run = d.call("sandbox.get", {"name": "early"})["run"]
    assert (run["reason"], run["exit_code"]) == ("worker_crashed", 1)
    assert "cannot import the world" in run["detail"]


def test_worker_killed_before_entering_is_worker_crashed(
        make_daemon: Any, fakekrun: Path, busybox_root: Path, tmp_path: Path) -> None:
    suicidal = tmp_path / "suicidal-python"
    suicidal.write_text("#!/bin/sh\necho 'about to die' >&2\nkill -SEGV $$\n")
    suicidal.chmod(0o755)
    d: DaemonProc = make_daemon(libkrun=fakekrun, settings={"worker_python": str(suicidal)})
    with pytest.raises(RemoteError):
        d.call("sandbox.run", spec("segv", busybox_root))
    run = d.call("sandbox.get", {"name": "segv"})["run"]
    assert (run["reason"], run["signal"]) == ("worker_crashed", signal.SIGSEGV)
    assert "SIGSEGV" in run["detail"] and "about to die" in run["detail"]
