"""A cgroup per run, on this machine's real cgroup v2 hierarchy (see tests/cgroupdir.py).

Real daemons with the `cgroups` setting pointing at a fresh cgroup v2 directory, real
workers (the libkrun test double runs the workload as a host process, so what a
workload starts is a real process too). Every fact is read from cgroupfs or waited on
through pidfds and replies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cgroupdir
import pytest
from daemonproc import DaemonProc, children_by_parent
from tenants import sleeper
from test_ctl import msbctl

from msbd.daemon import cgroups


@pytest.fixture
def daemon(make_daemon: Callable[..., DaemonProc], fakekrun: Path, cgdir: Path) -> DaemonProc:
    return make_daemon(libkrun=fakekrun, settings={"cgroups": str(cgdir)})


def run_dir(cgdir: Path, info: dict[str, object]) -> Path:
    run = info["run"]
    assert isinstance(run, dict)
    return cgdir / "runs" / f"run-{run['id']}"


# --- finding the tree ------------------------------------------------------------

MOUNTINFO = (
    "25 30 0:22 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "26 30 0:23 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    "27 30 0:24 /system.slice/x.service /mnt/x rw - cgroup2 cgroup2 rw\n"
)


def test_the_v2_mount_is_the_one_whose_root_is_mounted() -> None:
    assert cgroups.v2_mount(MOUNTINFO) == Path("/sys/fs/cgroup/unified")
    assert cgroups.v2_mount(MOUNTINFO.splitlines()[0]) is None


def test_own_v2_path_reads_the_unified_line() -> None:
    assert cgroups.own_v2_path("1:cpu:/a\n0::/system.slice/msbd.service\n") == \
        "/system.slice/msbd.service"
    assert cgroups.own_v2_path("4:memory:/x\n") is None


def test_off_says_why() -> None:
    assert cgroups.find("off").reason == 'turned off by the setting cgroups = "off"'
    outside = cgroups.find("/tmp")
    assert not outside.enabled and outside.reason is not None
    assert "not a directory under the cgroup v2 hierarchy" in outside.reason


@pytest.mark.parametrize(("events", "limit", "words"), [
    ("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n", "536870912",
     "the run used its memory.max of 512 MiB: the kernel's OOM killer ended it "
     "(1 process killed)"),
    ("oom 2\noom_kill 3\n", "max", "the kernel's OOM killer ended the run (3 processes "
     "killed): the host or a cgroup above the run ran out of memory, not the run's own limit"),
    # Killed by the host's OOM killer while under its own limit.
    ("max 0\noom 0\noom_kill 1\n", "536870912", "the kernel's OOM killer ended the run "
     "(1 process killed): the host or a cgroup above the run ran out of memory, not the "
     "run's own limit"),
    ("low 0\nhigh 0\nmax 40\noom 0\noom_kill 0\n", "536870912", None),  # at its limit, no kill
    (None, "536870912", None),  # no memory controller: no memory.events
])
def test_an_oom_kill_is_read_from_memory_events(tmp_path: Path, events: str | None, limit: str,
                                                words: str | None) -> None:
    """The cgroup's files as the kernel words them (a plain directory holds them here:
    this host's cgroup v2 hierarchy has no memory controller; the lane sees a real one)."""
    if events is not None:
        (tmp_path / "memory.events").write_text(events)
    (tmp_path / "memory.max").write_text(limit + "\n")
    assert cgroups.oom_detail(tmp_path) == words


def test_auto_refuses_a_cgroup_that_was_not_delegated(cgdir: Path) -> None:
    # This test's own process sits in a cgroup nobody delegated to msbd.
    found = cgroups.find("auto")
    assert not found.enabled
    assert found.reason is not None and "msbd" in found.reason


def test_an_explicit_directory_is_used_with_the_controllers_it_offers(cgdir: Path) -> None:
    found = cgroups.adopt(cgroups.find(str(cgdir)))
    assert found.enabled and found.root == cgdir and not found.delegated
    offered = set((cgdir / "cgroup.controllers").read_text().split())
    assert found.controllers == offered & set(cgroups.WANTED)
    assert (cgdir / "runs").is_dir()


# --- runs -------------------------------------------------------------------------

def test_a_runs_worker_is_in_its_own_cgroup_from_the_hand_off(
        daemon: DaemonProc, cgdir: Path, busybox_root: Path) -> None:
    idle = daemon.children()
    assert len(idle) == 2
    assert not cgroupdir.procs(cgdir / "runs"), "no process may sit in runs/ itself"
    info = daemon.call("sandbox.run", sleeper("cg", busybox_root))
    pid = info["run"]["pid"]
    assert pid in idle, "the pooled worker was not the one handed out"
    here = run_dir(cgdir, info)
    # The worker and the workload the test double started for it (the reply comes at
    # `entering`, before the workload is forked: its children are read first, so one
    # forked between the two reads is not missed).
    kids = set(children_by_parent().get(pid, []))
    members = cgroupdir.procs(here)
    assert pid in members and kids <= members
    for other in idle - {pid}:
        assert other not in members
    daemon.call("sandbox.stop", {"name": "cg", "timeout": 10})
    cgroupdir.wait_pids_gone(members)
    # Removed after the worker was reaped; the reply may come first.
    daemon.call("sandbox.run", sleeper("cg2", busybox_root))
    daemon.call("sandbox.stop", {"name": "cg2", "timeout": 10})
    assert not here.exists() or not cgroupdir.procs(here)


def test_a_worker_spawned_for_its_launch_is_placed_too(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, cgdir: Path,
        busybox_root: Path) -> None:
    d = make_daemon(libkrun=fakekrun, settings={"cgroups": str(cgdir), "worker_pool": 0})
    info = d.call("sandbox.run", sleeper("cold", busybox_root))
    assert info["run"]["pid"] in cgroupdir.procs(run_dir(cgdir, info))


def first_line(daemon: DaemonProc, name: str) -> str:
    """The console's first whole line, waited for with `logs` long-polls."""
    data, offset = "", 0
    while "\n" not in data:
        chunk = daemon.call("sandbox.logs", {"name": name, "offset": offset, "wait": 30})
        assert chunk["data"], f"no more output after {data!r}"
        data += chunk["data"]
        offset = chunk["offset"]
    return data.split("\n", 1)[0]


# The workload's shell forks (a command follows, so no exec in place) and waits for a
# process that made a session of its own, and that has no parent-death signal.
ESCAPE = ("/bin/busybox setsid /bin/busybox sh -c 'echo escaped $$; exec /bin/busybox sleep 600'"
          "; exit 0")


def test_a_kill_ends_what_the_workload_moved_out_of_the_process_group(
        daemon: DaemonProc, cgdir: Path, busybox_root: Path) -> None:
    """The attack: a workload starts a process in a session of its own, out of reach of
    the process-group SIGKILL. The run's cgroup holds it all the same."""
    spec = sleeper("escape", busybox_root, args=["sh", "-c", ESCAPE])
    info = daemon.call("sandbox.run", spec)
    line = first_line(daemon, "escape")
    assert line.startswith("escaped "), line
    escaped = int(line.split()[1])
    members = cgroupdir.procs(run_dir(cgdir, info))
    assert escaped in members
    assert escaped not in children_by_parent().get(info["run"]["pid"], []), \
        "the escaped process is the workload itself, not one it started"
    assert Path(f"/proc/{escaped}/stat").read_text().split()[5] != \
        str(info["run"]["pid"]), "the escaped process kept the worker's session"
    daemon.call("sandbox.kill", {"name": "escape", "signal": "SIGKILL"})
    cgroupdir.wait_pids_gone(members)


def test_a_previous_daemons_run_cgroups_are_emptied_at_startup(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, cgdir: Path) -> None:
    import subprocess
    (cgdir / "runs").mkdir()
    left = cgdir / "runs" / "run-999"
    left.mkdir()
    straggler = subprocess.Popen(["sleep", "600"])
    try:
        cgroups.place(left, straggler.pid)
        make_daemon(libkrun=fakekrun, settings={"cgroups": str(cgdir)})
        assert straggler.wait(timeout=30) == -9
        assert not left.exists()
    finally:
        straggler.kill()
        straggler.wait()


# --- accounting -------------------------------------------------------------------

def test_metrics_and_info_read_the_runs_cgroup(daemon: DaemonProc, cgdir: Path,
                                               busybox_root: Path) -> None:
    """This host's cgroup v2 hierarchy counts CPU (cpu.stat is there without a controller)
    and nothing else: memory, pids and IO are null, and say so, rather than made up."""
    info = daemon.call("sandbox.run", sleeper("acct", busybox_root))
    m = daemon.call("sandbox.metrics", {"name": "acct"})
    assert (m["source"], m["pid"]) == ("cgroup", info["run"]["pid"])
    cpu = cgroups.keyed(run_dir(cgdir, info), "cpu.stat")
    cg = m["cgroup"]
    # The worker's interpreter started and took its spec in there: CPU was counted.
    assert 0 < cg["cpu_usage_usec"] <= cpu["usage_usec"]
    assert m["cpu_seconds"] == cg["cpu_usage_usec"] / 1e6
    assert cg["memory_current"] is cg["memory_max"] is cg["pids_current"] is None
    assert cg["io_read_bytes"] is cg["oom_kills"] is None
    d = daemon.call("daemon.info")
    assert d["cgroups"] == {"enabled": True, "root": str(cgdir), "controllers": [],
                            "reason": None}
    totals = d["cgroup_totals"]
    assert totals["runs"] == 1 and totals["cpu_usage_usec"] >= cg["cpu_usage_usec"]
    shown = msbctl(daemon, "metrics", "acct")
    assert shown.returncode == 0 and "(from cgroup)" in shown.stdout, shown.stderr
    assert "memory - (peak -, max none)" in shown.stdout
    shown = msbctl(daemon, "info")
    assert f"cgroups    on: runs under {cgdir}/runs (no controllers)" in shown.stdout
    assert "1 live runs together:" in shown.stdout
    doctor = msbd_doctor("--socket", str(daemon.socket))
    assert (f"ok       cgroups: on (the running daemon): a cgroup per run under {cgdir}/runs, "
            "with no controllers\n") in doctor
    daemon.call("sandbox.stop", {"name": "acct", "timeout": 10})
    assert daemon.call("daemon.info")["cgroup_totals"]["runs"] == 0


def test_without_cgroups_metrics_come_from_proc_and_info_says_why(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, busybox_root: Path) -> None:
    d = make_daemon(libkrun=fakekrun, settings={"cgroups": "off"})
    d.call("sandbox.run", sleeper("plain", busybox_root))
    m = d.call("sandbox.metrics", {"name": "plain"})
    assert (m["source"], m["cgroup"]) == ("proc", None) and m["rss_bytes"] > 0
    info = d.call("daemon.info")
    assert info["cgroups"] == {"enabled": False, "root": None, "controllers": [],
                               "reason": 'turned off by the setting cgroups = "off"'}
    assert info["cgroup_totals"] is None
    shown = msbctl(d, "info").stdout
    assert 'cgroups    off: turned off by the setting cgroups = "off"' in shown
    assert "(from proc)" in msbctl(d, "metrics", "plain").stdout
    doctor = msbd_doctor("--json", "--socket", str(d.socket))
    assert json.loads(doctor)["cgroups"] == {
        "as_seen_by": "the running daemon", "enabled": False, "root": None, "controllers": [],
        "reason": 'turned off by the setting cgroups = "off"'}


def test_doctor_without_a_daemon_says_what_this_process_would_find(tmp_path: Path) -> None:
    line = msbd_doctor("--socket", str(tmp_path / "none.sock")).splitlines()[-1]
    # This test's process is in no delegated cgroup (and this host may be a v1 one).
    assert line.startswith("off      cgroups: off (this process; no daemon answered): "), line


def msbd_doctor(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "msbd.cli", "doctor", *args],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout
