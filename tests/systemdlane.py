"""Helpers of the tests under a real systemd (`pytest -m systemd`, scripts/systemd-test).

What they read is systemd's own account (`systemctl show`, the journal) and /proc, so
the tests assert on facts. `why_no_systemd` is the one place that decides whether this
is the system those tests need: systemd as PID 1, msbd.socket installed and enabled, and
msbd.service running this checkout's msbd. Outside it, the tests fail with its answer.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonproc import make_busybox_root

from msbd.rpc.client import Client

REPO = Path(__file__).resolve().parents[1]
MSBD = REPO / ".venv" / "bin" / "msbd"
MSBCTL = Path(sys.executable).parent / "msbctl"
SOCKET = Path("/run/msbd/msbd.sock")
RUNTIME_DROP_INS = Path("/run/systemd/system/msbd.service.d")
WAIT = 180.0  # a daemon start or a watchdog round under nested TCG, with room
ROOTS = Path("/srv/msbd-roots")
GUEST_WAIT = 240.0  # a guest's whole life under nested TCG: boot, run, shut down


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


def wait_restarted(old_pid: int, restarts: int) -> None:
    """Until systemd restarted msbd once more than `restarts` times and it is active
    again with a main pid other than `old_pid`."""
    def restarted() -> bool:
        props = show("msbd.service", "NRestarts", "ActiveState", "MainPID")
        return (int(props["NRestarts"]) == restarts + 1 and props["ActiveState"] == "active"
                and int(props["MainPID"]) not in (0, old_pid))
    wait_for(restarted, "systemd to restart msbd after the watchdog fired")


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


@contextlib.contextmanager
def serve_guests(base: Path, settings: str = "") -> Iterator[Path]:
    """msbd.service restarted to launch real guests; yields a busybox root for them.

    The service runs exactly the installed unit plus one runtime drop-in, the kind an
    admin writes: where libkrun is (`MSBD_LIBKRUN`, from the lane's
    `MSBD_TEST_LIBKRUN`), patience for nested TCG, `settings` (more `Environment=`
    lines) and `ReadWritePaths=` for the directory that holds sandbox roots (the unit's
    own comments ask for that: ProtectSystem=strict and PrivateTmp=yes hide everything
    else). The roots live on the lane's ext4 /tmp under `base` (virtio-fs keeps
    ownership in xattrs there) and are bound onto ROOTS, as an admin would mount a disk
    for them. Outside the lane, or without the library, it fails and says why.
    """
    if reason := why_no_systemd():
        pytest.fail(f"not under a real systemd with msbd installed: {reason}", pytrace=False)
    lib = os.environ.get("MSBD_TEST_LIBKRUN", "")
    if not Path(lib).is_file():
        pytest.fail(f"MSBD_TEST_LIBKRUN={lib!r} does not name a libkrun.so.1 (make libkrun)",
                    pytrace=False)
    root = make_busybox_root(base / "root")
    for d in ("sys", "mnt", "run"):
        (root / d).mkdir(exist_ok=True)
    ROOTS.mkdir(exist_ok=True)
    bound = run("mount", "--bind", base, ROOTS)
    assert bound.returncode == 0, bound.stderr
    conf = drop_in("60-test-guests.conf", (
        "[Service]\n"
        f"Environment=MSBD_LIBKRUN={lib}\n"
        # Generous, as in tests/test_vm_real.py: nested TCG is slow.
        "Environment=MSBD_START_TIMEOUT=120 MSBD_HEARTBEAT_MISSES=60 MSBD_STOP_TIMEOUT=20\n"
        f"{settings}"
        f"ReadWritePaths={ROOTS}\n"))
    try:
        systemctl("restart", "msbd.service")
        yield ROOTS / "root"
    finally:
        conf.unlink()
        systemctl("daemon-reload")
        systemctl("stop", "msbd.service")
        run("umount", ROOTS)
        shutil.rmtree(base, ignore_errors=True)


def call(method: str, params: dict[str, Any]) -> Any:
    with Client(SOCKET, timeout=GUEST_WAIT + 60) as c:
        return c.call(method, params)


def guest(name: str, root: Path, script: str, memory_mib: int = 256) -> dict[str, Any]:
    return {"name": name, "rootfs": str(root), "exec": "/bin/sh", "args": ["-c", script],
            "memory_mib": memory_mib}


def logs(name: str) -> str:
    return str(call("sandbox.logs", {"name": name, "limit": 1 << 20})["data"])
