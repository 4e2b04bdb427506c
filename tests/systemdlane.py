"""Helpers of the tests under a real systemd (`pytest -m systemd`, scripts/systemd-test).

What they read is systemd's own account (`systemctl show`, the journal) and /proc, so
the tests assert on facts. `why_no_systemd` is the one place that decides whether this
is the system those tests need: systemd as PID 1, msbd.socket installed and enabled, and
msbd.service running this checkout's msbd. Outside it, the tests fail with its answer.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MSBD = REPO / ".venv" / "bin" / "msbd"
MSBCTL = Path(sys.executable).parent / "msbctl"
SOCKET = Path("/run/msbd/msbd.sock")
RUNTIME_DROP_INS = Path("/run/systemd/system/msbd.service.d")
WAIT = 180.0  # a daemon start or a watchdog round under nested TCG, with room


def run(*cmd: str | Path, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, check=False)


def systemctl(*args: str) -> str:
    result = run("systemctl", *args)
    assert result.returncode == 0, f"systemctl {' '.join(args)}: {result.stderr}"
    return result.stdout


def show(unit: str, *props: str) -> dict[str, str]:
    out = systemctl("show", unit, "--property=" + ",".join(props))
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert set(values) == set(props), out
    return values


def journal(unit: str) -> str:
    result = run("journalctl", "--no-pager", "-o", "cat", "-u", unit)
    assert result.returncode == 0, result.stderr
    return result.stdout


def ping() -> str:
    result = run(MSBCTL, "ping")
    assert result.returncode == 0, f"msbctl ping: {result.stdout}{result.stderr}"
    return result.stdout


def main_pid() -> int:
    pid = int(show("msbd.service", "MainPID")["MainPID"])
    assert pid > 0, "msbd.service has no main process"
    return pid


def wait_for(fact: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not fact():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # the fact is systemd's state, polled; noqa: sleep-ok


def wait_exit(pid: int, timeout: float = WAIT) -> None:
    """Until process `pid` (not our child) is gone: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} still alive after {timeout:.0f} s"
    finally:
        os.close(fd)


def drop_in(name: str, text: str) -> Path:
    """A runtime drop-in for msbd.service (gone with the boot); daemon-reload after it."""
    RUNTIME_DROP_INS.mkdir(parents=True, exist_ok=True)
    path = RUNTIME_DROP_INS / name
    path.write_text(text)
    systemctl("daemon-reload")
    return path


def why_no_systemd() -> str | None:
    """Why this is not a system with systemd as PID 1 and msbd's units, or None."""
    if not Path("/run/systemd/system").is_dir():
        return "systemd is not PID 1 here (no /run/systemd/system); run scripts/systemd-test"
    why: list[str] = []
    socket = run("systemctl", "show", "msbd.socket", "--property=LoadState,UnitFileState")
    if "LoadState=loaded" not in socket.stdout:
        why.append("msbd.socket is not installed")
    elif "UnitFileState=enabled" not in socket.stdout:
        why.append("msbd.socket is not enabled")
    service = run("systemctl", "show", "msbd.service", "--property=ExecStart")
    if f"path={MSBD} " not in service.stdout:
        why.append(f"msbd.service does not run this checkout's {MSBD}: "
                   f"{service.stdout.strip() or service.stderr.strip()}")
    if not MSBCTL.exists():
        why.append(f"{MSBCTL} is missing (make setup)")
    return "; ".join(why) or None
