"""Pause and resume of a real guest under msbd.service, in the cgroup systemd delegated.

Run with `pytest -m systemd` in scripts/systemd-test (`scripts/systemd-test -x -k pause`
runs just this). The guest setup is `systemdlane.serve_guests` (the lane's libkrun, a busybox
root), with settings that shorten the heartbeat budget to a few
seconds so that a pause can outlast it. Time passing is the daemon's own clock: a
`sandbox.wait` with a timeout answers -32006 only once that much time went by.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from systemdlane import GUEST_WAIT, call, guest, logs, serve_guests

from msbd.errors import RemoteError, RpcCode

pytestmark = pytest.mark.systemd

INTERVAL, MISSES = 1.0, 5
BUDGET = INTERVAL * (MISSES + 1)
RUNS = Path("/sys/fs/cgroup/system.slice/msbd.service/runs")
COUNTER = "i=0; while :; do echo n=$i; i=$((i+1)); sleep 0.2; done"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Guests served with a heartbeat budget a pause can outlast (after the
    guest drop-in's own heartbeat lines, so these win)."""
    settings = (f"Environment=MSBD_HEARTBEAT_INTERVAL={INTERVAL} MSBD_HEARTBEAT_MISSES={MISSES}\n"
                # Under nested TCG a guest's cgroup once took about 34 s to freeze.
                "Environment=MSBD_FREEZE_TIMEOUT=120\n")
    with serve_guests(tmp_path_factory.mktemp("roots"), settings) as root:
        yield root


def numbers(name: str) -> list[int]:
    return _counted(logs(name))


def _counted(text: str) -> list[int]:
    """The counter's numbers in whole lines of `text` (boot messages come first)."""
    whole = text[:text.rfind("\n") + 1]
    return [int(line[2:]) for line in whole.splitlines() if line.startswith("n=")]


def wait_numbers(name: str, more_than: int) -> list[int]:
    """The counter's numbers once there are more than `more_than` (logs long-polls)."""
    data, offset = "", 0
    while len(_counted(data)) <= more_than:
        chunk = call("sandbox.logs", {"name": name, "offset": offset, "wait": GUEST_WAIT})
        assert chunk["data"], f"no more output from {name}: {data[-500:]!r}"
        data, offset = data + chunk["data"], chunk["offset"]
    return _counted(data)


def let_time_pass(name: str, seconds: float) -> None:
    """Return once the daemon's clock moved `seconds` (a wait on `name` that times out)."""
    with pytest.raises(RemoteError) as err:
        call("sandbox.wait", {"name": name, "timeout": seconds})
    assert err.value.rpc_code == RpcCode.TIMED_OUT


def test_a_paused_guest_stops_in_place_and_resumes_where_it_was(root: Path) -> None:
    info = call("sandbox.run", guest("frozen", root, COUNTER))
    here = RUNS / f"run-{info['run']['id']}"
    wait_numbers("frozen", 2)  # the guest is counting

    paused = call("sandbox.pause", {"name": "frozen"})
    assert paused["state"] == "paused"
    assert (here / "cgroup.freeze").read_text() == "1\n"
    assert "frozen 1" in (here / "cgroup.events").read_text().splitlines()
    before = numbers("frozen")

    let_time_pass("frozen", BUDGET * 3)  # longer than the heartbeat budget
    assert numbers("frozen") == before, "the console went on while paused"
    got = call("sandbox.get", {"name": "frozen"})
    assert got["state"] == "paused", got

    resumed = call("sandbox.resume", {"name": "frozen"})
    assert resumed["state"] == "running"
    assert (here / "cgroup.freeze").read_text() == "0\n"
    after = wait_numbers("frozen", len(before))
    assert after[:len(before)] == before
    assert after[len(before)] == before[-1] + 1, "the guest did not go on where it was"

    let_time_pass("frozen", BUDGET * 2)  # the heartbeat budget started afresh at resume
    assert call("sandbox.get", {"name": "frozen"})["state"] == "running"
    end = call("sandbox.stop", {"name": "frozen", "timeout": 20})
    assert (end["state"], end["run"]["reason"]) == ("stopped", "stop_requested"), end
