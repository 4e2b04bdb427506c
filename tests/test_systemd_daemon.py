"""The daemon speaking systemd's protocols: readiness, status, watchdog, stopping,
socket activation (with systemd's own `systemd-socket-activate`), and a worker
environment free of all of it."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc, raw_exchange

SYSTEMD_VARS = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID")


def spec(name: str, root: Path, script: str = "exec sleep 600") -> dict[str, Any]:
    return {"name": name, "rootfs": str(root), "exec": "/bin/sh", "args": ["-c", script],
            "memory_mib": 64, "env": {"GUEST_ONLY": "1"}}


def test_ready_comes_after_reconciliation_and_calls_work_at_once(
        make_daemon: Any, fakekrun: Path, busybox_root: Path) -> None:
    d: DaemonProc = make_daemon(libkrun=fakekrun)
    for i in range(10):
        d.call("sandbox.run", spec(f"pre{i}", busybox_root))
    d.stop(sig=signal.SIGKILL)
    d.start(wait=False)
    messages = []
    for message in d.notifications():
        messages.append(message)
        if "READY=1" in message.split("\n"):
            break
    # The very first call after READY=1 already sees every lost run settled.
    listed = d.call("sandbox.list")["sandboxes"]
    assert [s["run"]["reason"] for s in listed] == ["daemon_lost"] * 10
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=0 live sandboxes" in ready


def _statuses_until(d: DaemonProc, wanted: str) -> list[str]:
    """Every `STATUS=` line the daemon sends, up to and including `wanted`
    (`notifications` raises TimeoutError if it never comes)."""
    seen: list[str] = []
    for message in d.notifications(timeout=15):
        seen += [line for line in message.split("\n") if line.startswith("STATUS=")]
        if wanted in seen:
            return seen
    raise AssertionError("unreachable: notifications() ends only by raising")


def test_status_reports_live_counts(kdaemon: DaemonProc, busybox_root: Path) -> None:
    none = "STATUS=0 live sandboxes, 0 vcpus, 0 MiB"
    one = "STATUS=1 live sandboxes, 1 vcpus, 64 MiB"
    kdaemon.call("sandbox.run", spec("counted", busybox_root))
    seen = _statuses_until(kdaemon, one)
    assert set(seen) <= {none, one}, seen  # no other count on the way
    assert kdaemon.call("sandbox.stop", {"name": "counted"})["state"] == "stopped"
    seen = _statuses_until(kdaemon, none)
    assert set(seen) <= {none, one}, seen


def test_watchdog_pings_from_the_event_loop(make_daemon: Any) -> None:
    d: DaemonProc = make_daemon(env={"WATCHDOG_USEC": "400000"})  # ping every 0.2 s
    stamps = []
    for message in d.notifications(timeout=20):
        if "WATCHDOG=1" in message.split("\n"):
            stamps.append(time.monotonic())
            if len(stamps) == 6:
                break
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # Never faster than half the watchdog period (a datagram cannot arrive early).
    assert min(gaps) >= 0.2 - 0.02, gaps


def test_watchdog_for_another_pid_is_ignored(make_daemon: Any) -> None:
    d: DaemonProc = make_daemon(env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"},
                                start=False)
    d.start(wait=False)
    seen = []
    for message in d.notifications():
        seen.append(message)
        if "READY=1" in message.split("\n"):
            break
    d.call("daemon.ping")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    for message in d.notifications():
        seen.append(message)
        if "STOPPING=1" in message.split("\n"):
            break
    # A watchdog would have pinged at once; WATCHDOG_PID names another process.
    assert not [m for m in seen if "WATCHDOG=1" in m], seen


def test_stopping_on_sigterm(daemon: DaemonProc) -> None:
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    for message in daemon.notifications():
        if "STOPPING=1" in message.split("\n"):
            break
    assert daemon.proc.wait(timeout=30) == 0


def test_worker_environment_has_nothing_of_systemd(make_daemon: Any, fakekrun: Path,
                                                   busybox_root: Path, tmp_path: Path) -> None:
    record = tmp_path / "fakekrun.jsonl"
    stream = tmp_path / "journal"
    stream.touch()
    st = os.stat(stream)
    d: DaemonProc = make_daemon(
        libkrun=fakekrun,
        settings={"worker_env": {"FAKEKRUN_LOG": str(record)}},
        env={"WATCHDOG_USEC": "30000000", "INVOCATION_ID": "abc123",
             "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "DAEMON_ONLY_SECRET": "hush"})
    info = d.call("sandbox.run", spec("clean", busybox_root))
    environ = Path(f"/proc/{info['run']['pid']}/environ").read_bytes().split(b"\0")
    names = {e.split(b"=", 1)[0].decode() for e in environ if e}
    assert not names & set(SYSTEMD_VARS), names
    assert "DAEMON_ONLY_SECRET" not in names
    assert names <= {"PATH", "LANG", "LC_ALL", "TZ", "FAKEKRUN_LOG"}, names
    # The guest gets exactly the spec's environment, plus what msbd tells the guest's init
    # (which keeps it from the workload): the control channel's port and the stop grace.
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    exec_call = next(c for c in calls if c["fn"] == "krun_set_exec")
    assert exec_call["envp"] == ["GUEST_ONLY=1", "MSBD_CONTROL_PORT=7097", "MSBD_STOP_GRACE=10"]


def test_socket_activation_with_systemd_socket_activate(sock_dir: Path, tmp_path: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.fail("systemd-socket-activate is missing: `make setup` installs Debian's systemd")
    path = sock_dir / "activated.sock"
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [activate, "-l", str(path), "-E", f"PATH={os.environ['PATH']}",
         sys.executable, "-m", "msbd.cli", "serve", "--state-dir", str(state)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        # systemd-socket-activate says when it listens; then a client may connect
        # before the daemon even exists: the kernel queues the connection.
        line = proc.stderr.readline().decode()
        assert f"Listening on {path}" in line, line
        reply = json.loads(raw_exchange(path, b'{"jsonrpc":"2.0","id":1,"method":"daemon.info"}\n'))
        info = reply["result"]
        assert info["pid"] == proc.pid  # the activator exec'd msbd in its own process
        assert info["socket"] == str(path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        # The inherited socket is systemd's: never unlinked nor re-created by msbd.
        assert path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_logs_drop_timestamps_under_journald(make_daemon: Any, sock_dir: Path) -> None:
    d: DaemonProc = make_daemon(start=False)
    # stderr goes to d.stderr_path: make JOURNAL_STREAM name exactly that file.
    d.stderr_path.touch()
    st = os.stat(d.stderr_path)
    d.extra_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    d.start()
    d.stop()
    first = d.stderr().splitlines()[0]
    assert first.startswith(("INFO ", "DEBUG ")), first


def test_logs_have_timestamps_otherwise(daemon: DaemonProc) -> None:
    daemon.stop()
    first = daemon.stderr().splitlines()[0]
    assert first[:4].isdigit(), first


def test_notify_socket_that_never_reads_does_not_stall(make_daemon: Any, fakekrun: Path,
                                                       busybox_root: Path) -> None:
    """The test's NOTIFY_SOCKET is read only until READY: later STATUS updates find a full
    queue. Calls must not wait on it."""
    d: DaemonProc = make_daemon(libkrun=fakekrun)
    for i in range(15):
        d.call("sandbox.run", spec(f"s{i}", busybox_root))
    t0 = time.monotonic()
    for i in range(15):
        d.call("sandbox.stop", {"name": f"s{i}"})
    # 15 stops with a full notify queue; each one used to block for a second.
    assert time.monotonic() - t0 < 15, "STATUS notifications block the event loop"
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(d.socket))
