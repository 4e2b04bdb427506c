"""Real guests through msbd.service under a real systemd: its hardening lets libkrun boot.

Run with `pytest -m systemd` in scripts/systemd-test (after tests/test_systemd_real.py,
whose first ping is the boot's socket activation). The lane passes `MSBD_TEST_LIBKRUN`
(`make libkrun`); without it, or outside systemd, these fail and say why.

The service runs exactly the installed unit plus one runtime drop-in
(`systemdlane.serve_guests`).
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from systemdlane import (
    GUEST_WAIT,
    call,
    drop_in,
    guest,
    journal,
    logs,
    main_pid,
    ping,
    serve_guests,
    show,
    systemctl,
    wait_exit,
    wait_for,
    wait_restarted,
)

pytestmark = pytest.mark.systemd

@pytest.fixture(scope="module")
def guest_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A busybox root under ROOTS; msbd.service restarted with the drop-in."""
    with serve_guests(tmp_path_factory.mktemp("roots")) as root:
        yield root


def test_a_guest_boots_through_the_socket_activated_service(guest_root: Path) -> None:
    call("sandbox.run", guest("hello", guest_root, "echo hello from $(uname -r); exit 7"))
    end = call("sandbox.wait", {"name": "hello", "timeout": GUEST_WAIT})
    assert (end["state"], end["run"]["reason"], end["run"]["exit_code"]) == \
        ("stopped", "exited", 7), end
    assert "hello from" in logs("hello")


def said_up(name: str) -> bool:
    return "up" in logs(name)


def start_sleepers(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Guests that say `up` and then sleep; answered once every one of them said it."""
    infos = {n: call("sandbox.run", guest(n, root, "echo up; exec sleep 600")) for n in names}
    for n in names:
        wait_for(functools.partial(said_up, n), f"{n}'s first line", timeout=GUEST_WAIT)
    return infos


def test_stop_ends_every_running_guest_and_records_each(guest_root: Path) -> None:
    infos = start_sleepers(guest_root, ["sleeper", "sleeper2", "sleeper3"])
    info = infos["sleeper"]
    worker = info["run"]["pid"]
    # The worker is in its run's cgroup, in the subtree systemd delegated to the
    # service (KillMode=mixed decides its fate), and the daemon in the leaf beside it.
    assert Path(f"/proc/{worker}/cgroup").read_text().strip() == \
        f"0::/system.slice/msbd.service/runs/run-{info['run']['id']}"
    assert Path(f"/proc/{main_pid()}/cgroup").read_text().strip() == \
        "0::/system.slice/msbd.service/daemon"
    daemon = main_pid()
    systemctl("stop", "msbd.service")
    wait_exit(daemon)
    workers = [i["run"]["pid"] for i in infos.values()]
    for pid in workers:
        wait_exit(pid, timeout=5)
    props = show("msbd.service", "Result", "ExecMainCode", "ExecMainStatus")
    assert props == {"Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}
    # msbd ended the workers itself: systemd had nothing left to SIGKILL.
    log = journal("msbd.service")
    for pid in workers:
        assert f"Killing process {pid}" not in log
    assert "pong" in ping()
    for name in infos:
        end = call("sandbox.get", {"name": name})
        assert end["state"] == "stopped", end
        assert end["run"]["reason"] == "stop_requested", end
        assert end["run"]["ended_at"], end


def test_a_watchdog_abort_takes_the_guests_down_as_the_readme_says(guest_root: Path) -> None:
    """KillMode=mixed: when the watchdog aborts msbd, systemd SIGKILLs the workers at once
    (they get no clean shutdown), and the next msbd records their runs as `daemon_lost`."""
    conf = drop_in("70-test-watchdog.conf", "[Service]\nWatchdogSec=6s\n")
    try:
        systemctl("restart", "msbd.service")
        infos = start_sleepers(guest_root, ["held1", "held2"])
        daemon = main_pid()
        restarts = int(show("msbd.service", "NRestarts")["NRestarts"])
        os.kill(daemon, signal.SIGSTOP)
        wait_exit(daemon)
        for i in infos.values():
            wait_exit(i["run"]["pid"], timeout=30)

        wait_restarted(daemon, restarts)
        log = journal("msbd.service")
        assert "Watchdog timeout" in log and "status=6/ABRT" in log, log
        for name, info in infos.items():
            end = call("sandbox.get", {"name": name})
            assert (end["state"], end["run"]["reason"]) == ("stopped", "daemon_lost"), end
            assert end["run"]["id"] == info["run"]["id"]
            # Nothing of the run is left in the delegated subtree.
            assert not Path(f"/sys/fs/cgroup/system.slice/msbd.service/runs/"
                            f"run-{info['run']['id']}").exists()
    finally:
        conf.unlink()
        systemctl("daemon-reload")
        systemctl("restart", "msbd.service")
