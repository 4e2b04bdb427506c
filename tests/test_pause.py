"""Pause and resume on this machine's real cgroup v2 hierarchy (see tests/cgroupdir.py).

Real daemons with `cgroups` pointing at a fresh cgroup v2 directory, and real workers:
the libkrun test double runs the workload as a host process inside the run's cgroup, so
freezing the cgroup freezes the worker (no heartbeats) and its workload (no output).

Time passing is never slept: a second sandbox with a `max_duration` longer than the
heartbeat budget is waited for until the daemon itself ends it (`max_duration`), which
proves the daemon's own clock went that far.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cgroupdir
import pytest
from daemonproc import DaemonProc

from msbd.errors import RemoteError, RpcCode

INTERVAL, MISSES = 0.2, 2
BUDGET = INTERVAL * (MISSES + 1)  # no heartbeat for this long: heartbeat_lost
COUNTER = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done"


@pytest.fixture
def daemon(make_daemon: Callable[..., DaemonProc], fakekrun: Path, cgdir: Path) -> DaemonProc:
    return make_daemon(libkrun=fakekrun, settings={
        "cgroups": str(cgdir), "heartbeat_interval": INTERVAL, "heartbeat_misses": MISSES,
        "stop_timeout": 20.0})


def spec(name: str, root: Path, script: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "rootfs": str(root), "exec": "/bin/sh", "args": ["-c", script],
            "memory_mib": 64} | extra


def run_dir(cgdir: Path, info: dict[str, Any]) -> Path:
    return cgdir / "runs" / f"run-{info['run']['id']}"


def let_time_pass(d: DaemonProc, root: Path, seconds: float, name: str) -> dict[str, Any]:
    """Return once the daemon's clock moved `seconds` (a sandbox it ends at max_duration)."""
    d.call("sandbox.run", spec(name, root, "exec sleep 600", max_duration=seconds))
    end = d.call("sandbox.wait", {"name": name, "timeout": 60})
    assert end["run"]["reason"] == "max_duration"
    return end


def ts(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp()


def run_time(info: dict[str, Any]) -> float:
    return ts(info["run"]["ended_at"]) - ts(info["run"]["started_at"])


def log_end(d: DaemonProc, name: str) -> int:
    chunk = d.call("sandbox.logs", {"name": name, "tail": 1})
    return int(chunk["offset"])


def next_line(d: DaemonProc, name: str, offset: int) -> tuple[str, int]:
    """The first whole line at or after `offset` (long-polls), and the offset after it."""
    data = ""
    while "\n" not in data:
        chunk = d.call("sandbox.logs", {"name": name, "offset": offset, "wait": 30})
        assert chunk["data"], f"no more output from {name} after {data!r}"
        data += chunk["data"]
        offset = chunk["offset"]
    line = data.split("\n", 1)[0]
    return line, offset - len(data) + len(line) + 1


def last_number(d: DaemonProc, name: str) -> int:
    text = d.call("sandbox.logs", {"name": name, "tail": 1})["data"]
    return int(text.strip())


def refusal(d: DaemonProc, method: str, name: str) -> RemoteError:
    with pytest.raises(RemoteError) as err:
        d.call(method, {"name": name})
    return err.value


def states_of(d: DaemonProc, name: str, until: str) -> list[str]:
    """Every state `name` went through, from the event log, up to `until`."""
    seen: list[str] = []
    with d.client() as c:
        c.call("events.subscribe", {"since": 0})
        for _, params in c.iter_notifications(timeout=60):
            ev = params["event"]
            if ev["sandbox"] == name:
                seen.append(ev["state"])
                if ev["state"] == until:
                    return seen
    raise AssertionError(f"no {until} event for {name}: {seen}")


# --- pause and resume ----------------------------------------------------------------

def test_pause_freezes_the_run_and_resume_continues_where_it_was(
        daemon: DaemonProc, cgdir: Path, busybox_root: Path) -> None:
    info = daemon.call("sandbox.run", spec("count", busybox_root, COUNTER))
    here = run_dir(cgdir, info)
    next_line(daemon, "count", 0)  # it is counting
    paused = daemon.call("sandbox.pause", {"name": "count"})
    assert paused["state"] == "paused"
    assert (here / "cgroup.freeze").read_text() == "1\n"
    assert "frozen 1" in (here / "cgroup.events").read_text().splitlines()
    before = log_end(daemon, "count")
    last = last_number(daemon, "count")

    # Longer than the heartbeat budget, by the daemon's own clock.
    let_time_pass(daemon, busybox_root, BUDGET * 4, "clock")
    assert log_end(daemon, "count") == before, "a paused workload printed"
    got = daemon.call("sandbox.get", {"name": "count"})
    assert got["state"] == "paused", got["run"]
    assert (here / "cgroup.freeze").read_text() == "1\n"
    listed = {s["name"]: s["state"] for s in daemon.call("sandbox.list", {})["sandboxes"]}
    assert listed["count"] == "paused"
    assert daemon.call("daemon.info")["counts"]["paused"] == 1

    resumed = daemon.call("sandbox.resume", {"name": "count"})
    assert resumed["state"] == "running"
    assert (here / "cgroup.freeze").read_text() == "0\n"
    assert "frozen 0" in (here / "cgroup.events").read_text().splitlines()
    line, _ = next_line(daemon, "count", before)
    assert int(line) == last + 1, "the workload did not continue where it was"

    # The heartbeat budget starts afresh at resume: not lost right after it.
    let_time_pass(daemon, busybox_root, BUDGET * 2, "clock2")
    assert daemon.call("sandbox.get", {"name": "count"})["state"] == "running"
    end = daemon.call("sandbox.stop", {"name": "count", "timeout": 10})
    assert end["run"]["reason"] == "stop_requested"
    assert states_of(daemon, "count", "stopped") == [
        "created", "starting", "running", "paused", "running", "stopping", "stopped"]


def test_idle_time_before_a_pause_counts_and_paused_time_does_not(
        daemon: DaemonProc, busybox_root: Path) -> None:
    idle = 2.0
    daemon.call("sandbox.run", spec("idle", busybox_root, "exec sleep 600", idle_timeout=idle))
    let_time_pass(daemon, busybox_root, 1.2, "before")  # idle for at least 1.2 s
    paused = daemon.call("sandbox.pause", {"name": "idle"})
    let_time_pass(daemon, busybox_root, idle + 0.5, "during")  # longer than the idle timeout
    assert daemon.call("sandbox.get", {"name": "idle"})["state"] == "paused"
    resumed = daemon.call("sandbox.resume", {"name": "idle"})
    end = daemon.call("sandbox.wait", {"name": "idle", "timeout": 60})
    assert end["run"]["reason"] == "idle_timeout"
    assert end["run"]["exit_code"] == 128 + signal.SIGTERM
    after_resume = ts(end["run"]["ended_at"]) - ts(resumed["updated_at"])
    paused_for = ts(resumed["updated_at"]) - ts(paused["updated_at"])
    assert paused_for >= idle + 0.5
    # Idle 1.2 s or more before the pause, so about 0.8 s left after it; never a whole
    # idle_timeout again (the pre-pause idle time was kept) ...
    assert after_resume < idle - 0.6, after_resume
    # ... and not at once either (the paused time was not counted as idle): at most the
    # time from the run's start to the pause was idle before it.
    idle_before_at_most = ts(paused["updated_at"]) - ts(end["run"]["started_at"])
    assert after_resume >= idle - idle_before_at_most - 0.1, (after_resume, idle_before_at_most)


def test_max_duration_counts_while_paused_and_ends_the_run_thawed(
        daemon: DaemonProc, cgdir: Path, busybox_root: Path) -> None:
    info = daemon.call("sandbox.run", spec("cap", busybox_root, "exec sleep 600",
                                           max_duration=1.5))
    daemon.call("sandbox.pause", {"name": "cap"})
    end = daemon.call("sandbox.wait", {"name": "cap", "timeout": 60})
    assert end["state"] == "stopped"
    assert end["run"]["reason"] == "max_duration"
    # Thawed first, so the workload got the SIGTERM (a frozen one would have been
    # SIGKILLed after the 20 s grace).
    assert end["run"]["exit_code"] == 128 + signal.SIGTERM
    assert run_time(end) < 1.5 + 5
    assert states_of(daemon, "cap", "stopped")[-3:] == ["paused", "stopping", "stopped"]
    assert not run_dir(cgdir, info).exists() or not cgroupdir.procs(run_dir(cgdir, info))


def test_stop_while_paused_thaws_and_stops_gracefully(
        daemon: DaemonProc, busybox_root: Path) -> None:
    daemon.call("sandbox.run", spec("st", busybox_root, "exec sleep 600"))
    daemon.call("sandbox.pause", {"name": "st"})
    end = daemon.call("sandbox.stop", {"name": "st", "timeout": 20})
    assert (end["state"], end["run"]["reason"]) == ("stopped", "stop_requested")
    assert end["run"]["exit_code"] == 128 + signal.SIGTERM
    assert run_time(end) < 10
    assert states_of(daemon, "st", "stopped")[-3:] == ["paused", "stopping", "stopped"]


def test_sigkill_while_paused(daemon: DaemonProc, cgdir: Path, busybox_root: Path) -> None:
    info = daemon.call("sandbox.run", spec("k", busybox_root, "echo up; exec sleep 600"))
    # The test double forks the workload after `entering`: pause once it has started.
    assert next_line(daemon, "k", 0)[0] == "up"
    daemon.call("sandbox.pause", {"name": "k"})
    members = cgroupdir.procs(run_dir(cgdir, info))  # frozen: the workload is there too
    assert len(members) == 2
    end = daemon.call("sandbox.kill", {"name": "k", "signal": "SIGKILL"})
    assert (end["state"], end["run"]["reason"]) == ("stopped", "killed")
    assert end["run"]["signal"] == signal.SIGKILL
    cgroupdir.wait_pids_gone(members)


def test_a_run_killed_from_outside_while_frozen_ends_as_stopped(
        daemon: DaemonProc, cgdir: Path, busybox_root: Path) -> None:
    """paused -> stopped: nobody asked msbd to stop it; cgroup.kill reaches frozen tasks."""
    info = daemon.call("sandbox.run", spec("ext", busybox_root, "exec sleep 600"))
    daemon.call("sandbox.pause", {"name": "ext"})
    (run_dir(cgdir, info) / "cgroup.kill").write_text("1")
    end = daemon.call("sandbox.wait", {"name": "ext", "timeout": 60})
    assert (end["state"], end["run"]["reason"]) == ("stopped", "worker_crashed")
    assert states_of(daemon, "ext", "stopped")[-2:] == ["paused", "stopped"]


def test_daemon_shutdown_stops_paused_sandboxes_properly(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, cgdir: Path,
        busybox_root: Path) -> None:
    d = make_daemon(libkrun=fakekrun, settings={"cgroups": str(cgdir), "stop_timeout": 20.0})
    d.call("sandbox.run", spec("sd", busybox_root, "exec sleep 600"))
    d.call("sandbox.pause", {"name": "sd"})
    assert d.stop() == 0
    d.start()
    end = d.call("sandbox.get", {"name": "sd"})
    assert (end["state"], end["run"]["reason"]) == ("stopped", "stop_requested")
    assert end["run"]["exit_code"] == 128 + signal.SIGTERM, "not thawed before the stop"


def msbctl(d: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "msbd.ctl", "--socket", str(d.socket), *args],
                          capture_output=True, text=True, timeout=60)


def test_msbctl_pause_resume_and_ls(daemon: DaemonProc, cgdir: Path, busybox_root: Path,
                                    make_daemon: Callable[..., DaemonProc],
                                    fakekrun: Path) -> None:
    info = daemon.call("sandbox.run", spec("web", busybox_root, "exec sleep 600"))
    done = msbctl(daemon, "pause", "web")
    assert (done.returncode, done.stdout, done.stderr) == (0, "web: paused\n", "")
    assert (run_dir(cgdir, info) / "cgroup.freeze").read_text() == "1\n"
    ls = msbctl(daemon, "ls").stdout.splitlines()
    assert ls[1].split()[:3] == ["web", "paused", str(info["run"]["pid"])], ls
    again = msbctl(daemon, "pause", "web")
    assert (again.returncode, again.stderr) == (
        1, "msbctl: sandbox 'web' is paused; only a running sandbox can be paused\n")
    done = msbctl(daemon, "resume", "web")
    assert (done.returncode, done.stdout) == (0, "web: running\n")
    assert msbctl(daemon, "ls").stdout.splitlines()[1].split()[1] == "running"
    off = make_daemon(libkrun=fakekrun, settings={"cgroups": "off"}, name="off")
    off.call("sandbox.run", spec("web", busybox_root, "exec sleep 600"))
    refused = msbctl(off, "pause", "web")
    assert refused.returncode == 1
    assert refused.stderr.startswith("msbctl: cannot pause sandbox 'web': pause freezes the "
                                     "run's cgroup, and cgroups are off: "), refused.stderr


def test_a_sigkilled_daemon_leaves_no_frozen_worker_behind(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, cgdir: Path,
        busybox_root: Path) -> None:
    """A frozen worker cannot see its daemon go (EOF on fd 97): the next daemon ends it
    (its cgroup is a leftover, emptied with cgroup.kill) and records `daemon_lost`."""
    d = make_daemon(libkrun=fakekrun, settings={"cgroups": str(cgdir)})
    info = d.call("sandbox.run", spec("orphan", busybox_root, "exec sleep 600"))
    here = run_dir(cgdir, info)
    d.call("sandbox.pause", {"name": "orphan"})
    members = cgroupdir.procs(here)  # frozen: no process comes or goes
    d.stop(sig=signal.SIGKILL)
    assert cgroupdir.procs(here) == members, "frozen: nothing ended with the daemon"
    d.start()
    cgroupdir.wait_pids_gone(members)
    assert not here.exists()
    end = d.call("sandbox.get", {"name": "orphan"})
    assert (end["state"], end["run"]["reason"]) == ("stopped", "daemon_lost")
    assert states_of(d, "orphan", "stopped")[-2:] == ["paused", "stopped"]


# --- refusals --------------------------------------------------------------------------

def test_pause_without_cgroups_is_refused_and_changes_nothing(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, busybox_root: Path) -> None:
    d = make_daemon(libkrun=fakekrun, settings={"cgroups": "off"})
    info = d.call("sandbox.run", spec("nocg", busybox_root, COUNTER))
    err = refusal(d, "sandbox.pause", "nocg")
    assert err.rpc_code == RpcCode.NOT_SUPPORTED == -32007
    assert err.message == ("cannot pause sandbox 'nocg': pause freezes the run's cgroup, "
                           'and cgroups are off: turned off by the setting cgroups = "off"')
    assert err.remote_data == {"sandbox": "nocg",
                               "cgroups": 'turned off by the setting cgroups = "off"'}
    after = d.call("sandbox.get", {"name": "nocg"})
    assert (after["state"], after["run"]["id"]) == ("running", info["run"]["id"])
    offset = log_end(d, "nocg")
    next_line(d, "nocg", offset)  # still counting
    with d.client() as c:
        c.call("events.subscribe", {"since": 0})
        seen = []
        for _, params in c.iter_notifications(timeout=60):
            seen.append(params["event"]["state"])
            if params["event"]["state"] == "running":
                break
    assert "paused" not in seen


# (method, the state the sandbox is put in, what the refusal says may be acted on)
WRONG_STATE = [
    ("sandbox.pause", "created", "a running sandbox can be paused"),
    ("sandbox.pause", "paused", "a running sandbox can be paused"),
    ("sandbox.pause", "stopped", "a running sandbox can be paused"),
    ("sandbox.resume", "created", "a paused sandbox can be resumed"),
    ("sandbox.resume", "running", "a paused sandbox can be resumed"),
    ("sandbox.resume", "stopped", "a paused sandbox can be resumed"),
]


@pytest.mark.parametrize(("method", "state", "only"), WRONG_STATE)
def test_pause_or_resume_in_the_wrong_state_is_a_conflict_naming_it(
        daemon: DaemonProc, busybox_root: Path, method: str, state: str, only: str) -> None:
    s = spec("nr", busybox_root, "exec sleep 600")
    if state == "created":
        daemon.call("sandbox.create", s)
    else:
        daemon.call("sandbox.run", s)
    if state in ("paused", "stopped"):
        daemon.call("sandbox.pause" if state == "paused" else "sandbox.stop", {"name": "nr"})
    err = refusal(daemon, method, "nr")
    assert err.rpc_code == RpcCode.CONFLICT
    assert err.message == f"sandbox 'nr' is {state}; only {only}"
    assert err.remote_data == {"sandbox": "nr", "state": state}
    assert daemon.call("sandbox.get", {"name": "nr"})["state"] == state


def test_concurrent_pause_and_stop_serialise(daemon: DaemonProc, cgdir: Path,
                                             busybox_root: Path) -> None:
    """Pause and stop at once, many times: whatever the order, the run ends stopped as
    requested, gracefully (thawed before its SIGTERM), and no pause outlives it."""
    for i in range(6):
        name = f"race{i}"
        info = daemon.call("sandbox.run", spec(name, busybox_root, "exec sleep 600"))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            pausing = pool.submit(daemon.call, "sandbox.pause", {"name": name})
            stopping = pool.submit(daemon.call, "sandbox.stop", {"name": name, "timeout": 20})
            end = stopping.result(timeout=60)
            try:
                assert pausing.result(timeout=60)["state"] == "paused"
            except RemoteError as exc:  # the stop came first, or interrupted the freeze
                assert exc.rpc_code == RpcCode.CONFLICT, exc
        assert (end["state"], end["run"]["reason"]) == ("stopped", "stop_requested")
        assert end["run"]["exit_code"] == 128 + signal.SIGTERM, "stopped while frozen"
        assert not run_dir(cgdir, info).exists() or not cgroupdir.procs(run_dir(cgdir, info))
