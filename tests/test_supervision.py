"""Supervision end to end: real daemon, real workers, the libkrun test double, a busybox root.

Timing tolerances: a timer-driven end (idle, max duration, heartbeat) must
happen no earlier than its deadline and no later than deadline + TOLERANCE.
TOLERANCE covers the worker's start (~0.1-0.3 s), the SIGTERM -> guest
shutdown -> exit chain and a loaded 2-core CI machine.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc

from msbd.daemon.stopping import KILL_MARGIN
from msbd.errors import RemoteError

TOLERANCE = 3.0


def spec(name: str, root: Path, script: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "rootfs": str(root), "exec": "/bin/sh", "args": ["-c", script],
            "memory_mib": 64} | extra


def run_info(d: DaemonProc, name: str) -> dict[str, Any]:
    return d.call("sandbox.get", {"name": name})


def wait_end(d: DaemonProc, name: str, timeout: float = 60) -> dict[str, Any]:
    return d.call("sandbox.wait", {"name": name, "timeout": timeout})


def wait_output(d: DaemonProc, name: str, text: str) -> str:
    """Console output of `name` up to and including `text` (long-polls, no sleeps)."""
    data, offset = "", 0
    while text not in data:
        chunk = d.call("sandbox.logs", {"name": name, "offset": offset, "wait": 30})
        assert chunk["offset"] > offset or text in data, f"no {text!r} from {name}"
        data += chunk["data"]
        offset = chunk["offset"]
    return data


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- one test per termination reason ------------------------------------------------


def test_exited_with_its_code_and_output(kdaemon: DaemonProc, busybox_root: Path) -> None:
    info = kdaemon.call("sandbox.run", spec("ex", busybox_root,
                                            "echo to-stdout; echo to-stderr >&2; exit 7"))
    assert info["state"] in ("running", "stopped")
    assert info["run"]["pid"] > 0
    end = wait_end(kdaemon, "ex")
    assert end["state"] == "stopped"
    assert end["run"]["reason"] == "exited"
    assert end["run"]["exit_code"] == 7
    assert end["run"]["signal"] is None
    logs = kdaemon.call("sandbox.logs", {"name": "ex"})
    assert "to-stdout\n" in logs["data"] and "to-stderr\n" in logs["data"]


def test_missing_executable_exits_127(kdaemon: DaemonProc, busybox_root: Path) -> None:
    kdaemon.call("sandbox.run", {"name": "nx", "rootfs": str(busybox_root),
                                 "exec": "/bin/no-such-program"})
    end = wait_end(kdaemon, "nx")
    assert (end["run"]["reason"], end["run"]["exit_code"]) == ("exited", 127)
    detail = end["run"]["detail"]
    assert detail.startswith("status 127: the workload was not found; last output: ")
    assert "/bin/no-such-program" in detail


def test_stop_requested(kdaemon: DaemonProc, busybox_root: Path) -> None:
    kdaemon.call("sandbox.run", spec("st", busybox_root, "exec sleep 600"))
    t0 = time.monotonic()
    end = kdaemon.call("sandbox.stop", {"name": "st", "timeout": 20})
    elapsed = time.monotonic() - t0
    assert end["state"] == "stopped"
    assert end["run"]["reason"] == "stop_requested"
    # The guest (here: the test double's child) got SIGTERM and died of it.
    assert end["run"]["exit_code"] == 128 + signal.SIGTERM
    assert elapsed < TOLERANCE, "SIGTERM should end it long before the 20 s grace"


def test_stop_escalates_to_sigkill_after_the_grace(kdaemon: DaemonProc,
                                                   busybox_root: Path) -> None:
    kdaemon.call("sandbox.run", spec("stubborn", busybox_root,
                                     "trap '' TERM; echo deaf; while :; do sleep 1; done"))
    # `run` answers when the worker enters libkrun; the trap is set once "deaf" is out.
    wait_output(kdaemon, "stubborn", "deaf\n")
    t0 = time.monotonic()
    end = kdaemon.call("sandbox.stop", {"name": "stubborn", "timeout": 1})
    elapsed = time.monotonic() - t0
    assert end["run"]["reason"] == "stop_requested"
    assert end["run"]["signal"] == signal.SIGKILL
    # The grace, then the margin the guest's init gets to report, then SIGKILL.
    assert 1.0 + KILL_MARGIN <= elapsed < 1.0 + KILL_MARGIN + TOLERANCE


def test_killed(kdaemon: DaemonProc, busybox_root: Path) -> None:
    kdaemon.call("sandbox.run", spec("k", busybox_root, "exec sleep 600"))
    end = kdaemon.call("sandbox.kill", {"name": "k"})
    assert end["state"] == "stopped"
    assert (end["run"]["reason"], end["run"]["signal"]) == ("killed", signal.SIGKILL)


def test_idle_timeout(kdaemon: DaemonProc, busybox_root: Path) -> None:
    t0 = time.monotonic()
    kdaemon.call("sandbox.run", spec("idle", busybox_root, "exec sleep 600", idle_timeout=1.0))
    end = wait_end(kdaemon, "idle")
    elapsed = time.monotonic() - t0
    assert end["run"]["reason"] == "idle_timeout"
    assert end["run"]["exit_code"] == 128 + signal.SIGTERM
    assert 1.0 <= elapsed < 1.0 + TOLERANCE


def test_console_output_keeps_a_sandbox_alive(kdaemon: DaemonProc, busybox_root: Path) -> None:
    t0 = time.monotonic()
    kdaemon.call("sandbox.run", spec(
        "chatty", busybox_root,
        "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.25; done; exec sleep 600",
        idle_timeout=1.0))
    end = wait_end(kdaemon, "chatty")
    elapsed = time.monotonic() - t0
    assert end["run"]["reason"] == "idle_timeout"
    assert "tick 8" in kdaemon.call("sandbox.logs", {"name": "chatty"})["data"]
    # The last tick comes 1.75 s after the start, then one idle second: never before 2.75 s.
    assert 2.75 <= elapsed < 2.75 + TOLERANCE


IDLE = 3.0


def test_touch_moves_the_idle_deadline(kdaemon: DaemonProc, busybox_root: Path) -> None:
    t0 = time.monotonic()
    # Each touch comes a second after the last activity: two seconds of margin on the
    # idle timeout, for a loaded machine (a wait's reply and the touch's call are late).
    kdaemon.call("sandbox.run", spec("touchy", busybox_root, "exec sleep 600",
                                     idle_timeout=IDLE))
    last_touch = t0
    for _ in range(4):
        # Still running a second later (the daemon's wait deadline says so), then touched.
        with pytest.raises(RemoteError) as err:
            kdaemon.call("sandbox.wait", {"name": "touchy", "timeout": 1.0})
        assert err.value.rpc_code == -32006
        assert kdaemon.call("sandbox.touch", {"name": "touchy"})["state"] == "running"
        last_touch = time.monotonic()
    # No output, only touches: alive past the first deadline (after t0 + IDLE).
    assert last_touch - t0 >= 4.0 > IDLE
    end = wait_end(kdaemon, "touchy")
    assert end["run"]["reason"] == "idle_timeout"
    assert time.monotonic() - last_touch >= IDLE - 0.05


def test_max_duration(kdaemon: DaemonProc, busybox_root: Path) -> None:
    t0 = time.monotonic()
    kdaemon.call("sandbox.run", spec("maxd", busybox_root,
                                     "while :; do echo busy; sleep 0.1; done",
                                     max_duration=1.5, idle_timeout=60))
    end = wait_end(kdaemon, "maxd")
    elapsed = time.monotonic() - t0
    assert end["run"]["reason"] == "max_duration"
    assert 1.5 <= elapsed < 1.5 + TOLERANCE


def test_heartbeat_lost(make_daemon: Any, fakekrun: Path, busybox_root: Path) -> None:
    d = make_daemon(libkrun=fakekrun, settings={"heartbeat_interval": 0.2,
                                                "heartbeat_misses": 2, "stop_timeout": 1.0})
    info = d.call("sandbox.run", spec("hb", busybox_root, "exec sleep 600"))
    pid = info["run"]["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)  # a frozen worker sends no heartbeats
    end = wait_end(d, "hb")
    elapsed = time.monotonic() - t0
    assert end["run"]["reason"] == "heartbeat_lost"
    assert end["run"]["signal"] == signal.SIGKILL  # stopped, so only SIGKILL could end it
    # Lost interval * (misses + 1) = 0.6 s after the last heartbeat, which came up to one
    # interval (0.2 s) before t0; then 1 s of grace and the margin.
    assert 0.4 + 1.0 + KILL_MARGIN <= elapsed < 0.6 + 1.0 + KILL_MARGIN + TOLERANCE
    assert not pid_alive(pid)


def test_launch_failed(make_daemon: Any, fakekrun: Path, busybox_root: Path) -> None:
    d = make_daemon(libkrun=fakekrun,
                    settings={"worker_env": {"FAKEKRUN_FAIL": "krun_set_root:13"}})
    with pytest.raises(RemoteError) as err:
        d.call("sandbox.run", spec("lf", busybox_root, "true"))
    assert err.value.rpc_code == -32005
    assert "krun_set_root" in err.value.message
    end = run_info(d, "lf")
    assert end["state"] == "failed"
    assert end["run"]["reason"] == "launch_failed"
    assert end["run"]["exit_code"] == 4
    assert "krun_set_root" in end["run"]["detail"]


def test_worker_crashed(kdaemon: DaemonProc, busybox_root: Path) -> None:
    info = kdaemon.call("sandbox.run", spec("crash", busybox_root, "exec sleep 600"))
    os.kill(info["run"]["pid"], signal.SIGKILL)
    end = wait_end(kdaemon, "crash")
    assert end["state"] == "stopped"
    assert (end["run"]["reason"], end["run"]["signal"]) == ("worker_crashed", signal.SIGKILL)
    assert "SIGKILL" in end["run"]["detail"]


def test_bad_libkrun_is_a_launch_failure_with_the_workers_words(
        make_daemon: Any, tmp_path: Path, busybox_root: Path) -> None:
    bogus = tmp_path / "libkrun.so.1"
    bogus.write_bytes(b"not an ELF file")
    d = make_daemon(libkrun=bogus)
    with pytest.raises(RemoteError) as err:
        d.call("sandbox.run", spec("badlib", busybox_root, "true"))
    assert err.value.rpc_code == -32005
    assert str(bogus) in err.value.message
    assert run_info(d, "badlib")["run"]["exit_code"] == 3


# --- msbctl ----------------------------------------------------------------------------


def msbctl(d: DaemonProc, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "msbd.ctl", "--socket", str(d.socket), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_run_wait_propagates_the_exit_code(kdaemon: DaemonProc, busybox_root: Path) -> None:
    done = msbctl(kdaemon, "run", "rw", "--rootfs", str(busybox_root), "--wait", "--",
                  "/bin/sh", "-c", "echo the answer; exit 42")
    assert done.returncode == 42, done.stderr
    assert "the answer" in done.stdout


def test_msbctl_lifecycle(kdaemon: DaemonProc, busybox_root: Path) -> None:
    assert msbctl(kdaemon, "run", "life", "--rootfs", str(busybox_root), "--",
                  "/bin/sh", "-c", "echo hi; exec sleep 600").returncode == 0
    ls = msbctl(kdaemon, "ls")
    assert ls.returncode == 0
    header, row = ls.stdout.splitlines()[:2]
    assert header.split()[:3] == ["NAME", "STATE", "PID"]
    assert row.split()[:2] == ["life", "running"]
    metrics = msbctl(kdaemon, "--json", "metrics", "life")
    assert '"rss_bytes"' in metrics.stdout
    assert msbctl(kdaemon, "logs", "life").stdout == "hi\n"
    assert msbctl(kdaemon, "stop", "life").returncode == 0
    wait = msbctl(kdaemon, "wait", "life")
    assert wait.returncode == 128 + signal.SIGTERM
    rm = msbctl(kdaemon, "rm", "life")
    assert rm.returncode == 0 and "removed life" in rm.stdout
    gone = msbctl(kdaemon, "inspect", "life")
    assert gone.returncode == 1
    assert gone.stderr.strip() == "msbctl: no sandbox named 'life'"


# --- state rules and concurrency -------------------------------------------------------


def test_remove_of_a_running_sandbox_needs_force(kdaemon: DaemonProc, busybox_root: Path
                                                 ) -> None:
    info = kdaemon.call("sandbox.run", spec("rmf", busybox_root, "exec sleep 600"))
    with pytest.raises(RemoteError) as err:
        kdaemon.call("sandbox.remove", {"name": "rmf"})
    assert err.value.rpc_code == -32002
    assert run_info(kdaemon, "rmf")["state"] == "running"
    removed = kdaemon.call("sandbox.remove", {"name": "rmf", "force": True})
    assert removed["state"] == "stopped"
    assert not pid_alive(info["run"]["pid"])
    with pytest.raises(RemoteError):
        run_info(kdaemon, "rmf")


def test_two_starts_one_wins(kdaemon: DaemonProc, busybox_root: Path) -> None:
    kdaemon.call("sandbox.create", spec("race", busybox_root, "exec sleep 600"))

    def start() -> int:
        try:
            kdaemon.call("sandbox.start", {"name": "race"})
        except RemoteError as exc:
            return exc.rpc_code
        return 0

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = sorted(pool.map(lambda _: start(), range(2)))
    assert results == [-32002, 0]
    assert run_info(kdaemon, "race")["state"] == "running"


def test_stop_during_starting_is_honoured(make_daemon: Any, fakekrun: Path,
                                          busybox_root: Path, gated_python: Path) -> None:
    # The worker is held before its interpreter starts: the stop comes while `starting`.
    kdaemon = make_daemon(libkrun=fakekrun, settings={"worker_pool": 0,
                                                      "worker_python": str(gated_python)})
    kdaemon.call("sandbox.create", spec("early", busybox_root, "exec sleep 600"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = pool.submit(kdaemon.call, "sandbox.start", {"name": "early"})
        with kdaemon.client() as c:
            for _, params in _events(c, since=0):
                if params["sandbox"] == "early" and params["state"] == "starting":
                    break
        stopped = kdaemon.call("sandbox.stop", {"name": "early"})
        with pytest.raises(RemoteError) as err:
            started.result()
    assert err.value.rpc_code in (-32002, -32005)
    assert stopped["state"] == "stopped"
    assert stopped["run"]["reason"] == "stop_requested"


def test_remove_racing_start_leaves_a_consistent_record(kdaemon: DaemonProc,
                                                        busybox_root: Path) -> None:
    for i in range(5):
        name = f"rr{i}"
        kdaemon.call("sandbox.create", spec(name, busybox_root, "exec sleep 600"))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            start = pool.submit(kdaemon.call, "sandbox.start", {"name": name})
            remove = pool.submit(kdaemon.call, "sandbox.remove", {"name": name, "force": True})
            outcomes = []
            for fut in (start, remove):
                try:
                    fut.result()
                    outcomes.append("ok")
                except RemoteError as exc:
                    outcomes.append(exc.rpc_code)
        listed = {s["name"]: s for s in kdaemon.call("sandbox.list")["sandboxes"]}
        if outcomes[1] == "ok":
            assert name not in listed
        else:
            assert listed[name]["state"] in ("running", "created", "stopped", "failed")
        assert not [s for s in listed.values() if s["state"] in ("starting", "stopping")]


def test_limits_refuse_and_start_nothing(make_daemon: Any, fakekrun: Path,
                                         busybox_root: Path) -> None:
    d = make_daemon(libkrun=fakekrun, settings={"max_sandboxes": 2, "max_memory_mib": 1000})
    d.call("sandbox.run", spec("l1", busybox_root, "exec sleep 600"))
    d.call("sandbox.run", spec("l2", busybox_root, "exec sleep 600"))
    with pytest.raises(RemoteError) as err:
        d.call("sandbox.run", spec("l3", busybox_root, "exec sleep 600"))
    assert err.value.rpc_code == -32004
    assert err.value.remote_data["limit"] == "max_sandboxes"
    assert [s["name"] for s in d.call("sandbox.list")["sandboxes"]] == ["l1", "l2"]
    d.call("sandbox.stop", {"name": "l2"})
    with pytest.raises(RemoteError) as err:
        d.call("sandbox.run", spec("big", busybox_root, "exec sleep 600", memory_mib=1000))
    assert err.value.remote_data["limit"] == "max_memory_mib"
    info = d.call("daemon.info")
    assert {k: info["limits"][k] for k in ("max_sandboxes", "max_vcpus", "max_memory_mib")
            } == {"max_sandboxes": 2, "max_vcpus": 4096, "max_memory_mib": 1000}


def test_restart_is_a_new_run(kdaemon: DaemonProc, busybox_root: Path) -> None:
    first = kdaemon.call("sandbox.run", spec("again", busybox_root, "exec sleep 600"))
    second = kdaemon.call("sandbox.restart", {"name": "again", "timeout": 5})
    assert second["state"] == "running"
    assert second["run"]["id"] > first["run"]["id"]
    assert second["run"]["pid"] != first["run"]["pid"]
    assert not pid_alive(first["run"]["pid"])


def test_wait_times_out(kdaemon: DaemonProc, busybox_root: Path) -> None:
    kdaemon.call("sandbox.run", spec("slow", busybox_root, "exec sleep 600"))
    with pytest.raises(RemoteError) as err:
        kdaemon.call("sandbox.wait", {"name": "slow", "timeout": 0.2})
    assert err.value.rpc_code == -32006


def test_metrics_and_logs(kdaemon: DaemonProc, busybox_root: Path) -> None:
    info = kdaemon.call("sandbox.run", spec("obs", busybox_root,
                                            "seq 1 1000; exec sleep 600"))
    m = kdaemon.call("sandbox.metrics", {"name": "obs"})
    assert m["pid"] == info["run"]["pid"]
    assert m["rss_bytes"] > 1024 * 1024
    assert m["cpu_seconds"] >= 0 and m["uptime"] >= 0
    data = ""
    offset = 0
    while "1000\n" not in data:
        chunk = kdaemon.call("sandbox.logs", {"name": "obs", "offset": offset, "wait": 10})
        data += chunk["data"]
        offset = chunk["offset"]
    assert data == "".join(f"{i}\n" for i in range(1, 1001))
    tail = kdaemon.call("sandbox.logs", {"name": "obs", "tail": 3})
    assert tail["data"] == "998\n999\n1000\n"
    part = kdaemon.call("sandbox.logs", {"name": "obs", "offset": 2, "limit": 4})
    assert part == {"data": "2\n3\n", "offset": 6, "more": True}


# --- events ------------------------------------------------------------------------------


def _events(client: Any, *, since: int | None = None) -> Any:
    """Subscribe now; return an iterator of (method, event) for what follows."""
    client.call("events.subscribe", {} if since is None else {"since": since})

    def stream() -> Any:
        for method, params in client.iter_notifications(timeout=60):
            assert method == "event"
            yield method, params["event"]
    return stream()


def test_events_in_order_and_replay(kdaemon: DaemonProc, busybox_root: Path) -> None:
    names = [f"ev{i}" for i in range(4)]
    with kdaemon.client() as sub:
        stream = _events(sub)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: kdaemon.call("sandbox.run", spec(n, busybox_root,
                                                                     "echo hi; exit 3")),
                          names))
        seen: list[dict[str, Any]] = []
        ended: set[str] = set()
        for _, ev in stream:
            seen.append(ev)
            if ev["state"] == "stopped":
                ended.add(ev["sandbox"])
            if ended == set(names):
                break
    seqs = [e["seq"] for e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gaps"
    for n in names:
        states = [e["state"] for e in seen if e["sandbox"] == n]
        assert states == ["created", "starting", "running", "stopped"]
        last = [e for e in seen if e["sandbox"] == n][-1]
        assert (last["reason"], last["exit_code"]) == ("exited", 3)
    # Resubscribing from the middle replays exactly what came after.
    middle = seqs[len(seqs) // 2]
    with kdaemon.client() as again:
        replay = []
        for _, ev in _events(again, since=middle):
            replay.append(ev)
            if ev["seq"] == seqs[-1]:
                break
    assert replay == [e for e in seen if e["seq"] > middle]


# --- scale --------------------------------------------------------------------------------


def test_fifty_concurrent_sandboxes(make_daemon: Any, fakekrun: Path, busybox_root: Path,
                                    tmp_path: Path) -> None:
    record = tmp_path / "fakekrun.jsonl"
    d = make_daemon(libkrun=fakekrun, settings={"worker_env": {"FAKEKRUN_LOG": str(record)}})
    names = [f"many{i:02d}" for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        infos = list(pool.map(
            lambda n: d.call("sandbox.run", spec(n, busybox_root, "exec sleep 600")), names))
    assert all(i["state"] == "running" for i in infos)
    pids = [i["run"]["pid"] for i in infos]
    assert all(pid_alive(p) for p in pids)
    assert d.call("daemon.info")["counts"]["running"] == 50
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ends = list(pool.map(lambda n: d.call("sandbox.stop", {"name": n}), names))
    assert all(e["run"]["reason"] == "stop_requested" for e in ends)
    assert not [p for p in pids if pid_alive(p)]
    _assert_no_fd_leaks(record, expected_workers=50)
    # A worker that found an fd it should not have inherited says so on its console.
    for n in names:
        assert "inherited fd" not in d.call("sandbox.logs", {"name": n})["data"]


def _assert_no_fd_leaks(record: Path, *, expected_workers: int) -> None:
    """From the test double's record: what each worker held when it entered libkrun,
    and what each "guest" saw."""
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    by_fn: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_fn.setdefault(e["fn"], []).append(e)
    enters = by_fn["krun_start_enter"]
    assert len(enters) == expected_workers
    # The root directories the workers opened, handed to libkrun as /proc/self/fd/N/.
    roots = {int(r["root_path"].split("/")[4]) for r in by_fn["krun_set_root"]}
    for e in enters:
        # stdio, the watchdog and status pipes, the opened root, and the control channel's
        # two socket fds (its listening socket, the O_PATH fd libkrun connects through).
        assert len(e["sockets"]) == 2, e
        assert set(e["fds"]) <= {0, 1, 2, 97, 98} | roots | set(e["sockets"]), e["fds"]
    children = by_fn["child"]
    assert len(children) == expected_workers
    assert all(c["fds"] == [0, 1, 2] for c in children)


def test_msbctl_logs_follow_ends_with_the_run(kdaemon: DaemonProc, busybox_root: Path) -> None:
    """`logs -f` prints output as it comes (long polls, no client-side sleeps) and
    returns once the sandbox's run has ended and everything was printed."""
    kdaemon.call("sandbox.run", spec("follow", busybox_root,
                                     "for i in 1 2 3; do echo line $i; sleep 0.3; done"))
    done = msbctl(kdaemon, "logs", "-f", "follow")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "line 1\nline 2\nline 3\n"
    assert run_info(kdaemon, "follow")["state"] == "stopped"


def test_msbctl_events_replay(kdaemon: DaemonProc, busybox_root: Path) -> None:
    kdaemon.call("sandbox.run", spec("evs", busybox_root, "exit 5"))
    kdaemon.call("sandbox.wait", {"name": "evs"})
    done = msbctl(kdaemon, "events", "--since", "0", "--no-follow")
    assert done.returncode == 0, done.stderr
    states = [line.split()[3:] for line in done.stdout.splitlines()]
    assert [s[0] for s in states] == ["created", "starting", "running", "stopped"]
    assert states[-1][1:] == ["exited", "exit=5"]
