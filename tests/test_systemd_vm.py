"""Real guests through msbd.service under a real systemd: its hardening lets libkrun boot.

Run with `pytest -m systemd` in scripts/systemd-test (after tests/test_systemd_real.py,
whose first ping is the boot's socket activation). The lane passes `MSBD_TEST_LIBKRUN`
(`make libkrun`); without it, or outside systemd, these fail and say why.

The service runs exactly the installed unit plus one runtime drop-in
(`systemdlane.serve_guests`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from systemdlane import (
    GUEST_WAIT,
    call,
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


def test_stop_ends_a_running_guest_and_records_it(guest_root: Path) -> None:
    info = call("sandbox.run", guest("sleeper", guest_root, "echo up; exec sleep 600"))
    worker = info["run"]["pid"]
    wait_for(lambda: "up" in logs("sleeper"), "the guest's first line", timeout=GUEST_WAIT)
    # The worker is in its run's cgroup, in the subtree systemd delegated to the
    # service (KillMode=mixed decides its fate), and the daemon in the leaf beside it.
    assert Path(f"/proc/{worker}/cgroup").read_text().strip() == \
        f"0::/system.slice/msbd.service/runs/run-{info['run']['id']}"
    assert Path(f"/proc/{main_pid()}/cgroup").read_text().strip() == \
        "0::/system.slice/msbd.service/daemon"
    daemon = main_pid()
    systemctl("stop", "msbd.service")
    wait_exit(daemon)
    wait_exit(worker, timeout=5)
    props = show("msbd.service", "Result", "ExecMainCode", "ExecMainStatus")
    assert props == {"Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}
    # msbd ended the worker itself: systemd had nothing left to SIGKILL.
    assert f"Killing process {worker}" not in journal("msbd.service")
    assert "pong" in ping()
    end = call("sandbox.get", {"name": "sleeper"})
    assert end["state"] == "stopped", end
    assert end["run"]["reason"] == "stop_requested", end
    assert end["run"]["ended_at"], end
