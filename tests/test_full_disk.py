"""A full state directory: the end of a run is kept in memory and retried, nothing sticks.

The state directory is a small tmpfs of its own; the test fills it, stops a
sandbox (so the end of its run cannot be written), watches the daemon tell
the truth meanwhile, frees space and sees the end land. Needs root (mount).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc
from storekit import tmpfs

from msbd.errors import RemoteError, RpcCode

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")


@pytest.fixture
def small_state(sock_dir: Path) -> Iterator[Path]:
    state = sock_dir / "d" / "state"
    state.mkdir(parents=True)
    with tmpfs(state, "2m"):
        yield state


def fill(path: Path) -> None:
    """Write `path` until its filesystem has no room left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    probe = os.open(path.with_name("probe"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as err:  # full now
            os.write(probe, b"\0" * 4096)
    finally:
        os.close(probe)
    assert err.value.errno == errno.ENOSPC


def wait_until(fact: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not fact():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)  # checking the daemon's log for a fact; noqa: sleep-ok


def test_a_refused_end_of_run_is_retried_and_the_daemon_never_lies(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, busybox_root: Path,
        small_state: Path) -> None:
    d = make_daemon(libkrun=fakekrun, settings={"heartbeat_interval": 0.2})
    assert d.state_dir == small_state
    spec = {"name": "x", "rootfs": str(busybox_root), "exec": "/bin/busybox",
            "args": ["sleep", "600"], "memory_mib": 64}
    d.call("sandbox.run", spec)
    filler = small_state / "filler"
    fill(filler)

    outcome: dict[str, Any] = {}

    def stop() -> None:
        try:
            outcome["stop"] = d.call("sandbox.stop", {"name": "x", "timeout": 5})
        except RemoteError as exc:
            outcome["error"] = exc

    stopper = threading.Thread(target=stop)
    stopper.start()
    wait_until(lambda: "cannot record the end of a run" in d.stderr(), "a refused write")
    # The worker is gone and the daemon says so; its end is not on disk yet.
    now = d.call("sandbox.get", {"name": "x"})
    assert (now["state"], now["run"]["reason"]) == ("stopped", "stop_requested")
    assert d.call("daemon.info")["counts"]["running"] == 1  # the database's own count
    with pytest.raises(RemoteError) as err:
        d.call("sandbox.start", {"name": "x"})
    assert err.value.rpc_code == RpcCode.CONFLICT
    assert "not recorded yet" in err.value.message
    with pytest.raises(RemoteError) as err:
        d.call("sandbox.remove", {"name": "x"})
    assert err.value.rpc_code == RpcCode.CONFLICT

    filler.unlink()  # room again: the retry lands, the waiting stop is answered
    stopper.join(90)
    assert "error" not in outcome, outcome
    assert outcome["stop"]["state"] == "stopped"
    assert outcome["stop"]["run"]["reason"] == "stop_requested"
    assert d.call("daemon.info")["counts"]["running"] == 0
    assert "recorded the end of the run after all" in d.stderr()
    d.restart()  # it is on disk, not only in memory
    again = d.call("sandbox.get", {"name": "x"})
    assert (again["state"], again["run"]["reason"]) == ("stopped", "stop_requested")
    assert d.call("sandbox.start", {"name": "x"})["state"] == "running"
