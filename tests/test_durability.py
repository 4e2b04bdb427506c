"""An answered change survives the daemon's SIGKILL: create, start, stop, remove, and
changes committed together in one group.

Real daemons with the libkrun test double: each change is answered, the daemon
is SIGKILLed at once (no orderly shutdown, nothing flushed on the way out),
and the next daemon on the same state directory must show it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc
from tenants import ROOT, sleeper

from msbd.errors import RemoteError, RpcCode


@pytest.fixture
def d(make_daemon: Callable[..., DaemonProc], fakekrun: Path) -> DaemonProc:
    return make_daemon(libkrun=fakekrun, settings={"heartbeat_interval": 0.2})


def killed_and_back(d: DaemonProc) -> DaemonProc:
    d.stop(sig=signal.SIGKILL)
    return d.start()


def test_create_start_stop_and_remove_survive_a_sigkill(
        d: DaemonProc, make_root: Callable[..., Path]) -> None:
    root = make_root("r", ROOT)
    d.call("sandbox.create", sleeper("made", root))
    killed_and_back(d)
    assert d.call("sandbox.get", {"name": "made"})["state"] == "created"

    started = d.call("sandbox.start", {"name": "made"})
    assert started["state"] == "running"
    killed_and_back(d)
    after = d.call("sandbox.get", {"name": "made"})
    # The run is on record; its worker went down with the daemon (reconciled as lost).
    assert after["run"]["id"] == started["run"]["id"]
    assert (after["state"], after["run"]["reason"]) == ("stopped", "daemon_lost")

    d.call("sandbox.start", {"name": "made"})
    stopped = d.call("sandbox.stop", {"name": "made", "timeout": 5})
    killed_and_back(d)
    after = d.call("sandbox.get", {"name": "made"})
    assert after["run"] == stopped["run"] and after["state"] == "stopped"
    assert after["run"]["reason"] == "stop_requested"

    d.call("sandbox.remove", {"name": "made"})
    killed_and_back(d)
    with pytest.raises(RemoteError) as gone:
        d.call("sandbox.get", {"name": "made"})
    assert gone.value.remote_code == RpcCode.NOT_FOUND


def test_changes_answered_together_survive_a_sigkill(
        d: DaemonProc, make_root: Callable[..., Path]) -> None:
    root = make_root("r", ROOT)
    answered: dict[str, Any] = {}

    def create(name: str) -> None:
        with d.client() as c:
            answered[name] = c.call("sandbox.create", sleeper(name, root))

    threads = [threading.Thread(target=create, args=(f"g{i}",)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answered) == 40
    killed_and_back(d)
    listed = {s["name"]: s for s in d.call("sandbox.list", {})["sandboxes"]}
    assert {name: listed[name]["id"] for name in answered} == \
        {name: info["id"] for name, info in answered.items()}
