"""scripts/nested-kvm: the marker relay as a table, and the lane itself booting real guests."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from workerproc import REPO

LANE = REPO / "scripts" / "nested-kvm"
TOKEN = "0123456789abcdef"


def load_relay() -> ModuleType:
    spec = importlib.util.spec_from_file_location("relay", REPO / "scripts/nested-kvm.d/relay.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


relay = load_relay()


def marker(event: str, token: str = TOKEN) -> bytes:
    return b"\0nkvm:" + token.encode() + b":" + event.encode() + b"\0"


STREAM = (marker("start") + b"line one\n\0nul\0" + marker("exit=9", token="someone-else")
          + b"\0nkvm:" + b"tail" + marker("exit=3"))
SHOWN = (b"line one\n\0nul\0" + marker("exit=9", token="someone-else") + b"\0nkvm:tail")


def relayed(tmp_path: Path, chunks: list[bytes]) -> tuple[bytes, Any]:
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        stream = relay.Stream(fd, TOKEN)
        for chunk in chunks:
            stream.feed(chunk)
        stream.flush()
    finally:
        os.close(fd)
    return out.read_bytes(), stream


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_relay_cuts_markers_wherever_the_chunks_split(tmp_path: Path, cut: int) -> None:
    data, stream = relayed(tmp_path, [STREAM[:cut], STREAM[cut:]])
    assert data == SHOWN
    assert (stream.started, stream.status, stream.ended) == (True, 3, True)


def test_relay_byte_by_byte(tmp_path: Path) -> None:
    data, stream = relayed(tmp_path, [bytes([b]) for b in STREAM])
    assert data == SHOWN and stream.status == 3


def test_relay_holds_back_only_what_could_start_a_marker(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        stream = relay.Stream(fd, TOKEN)
        stream.feed(b"dots...")
        assert out.read_bytes() == b"dots..."
        stream.feed(b"\0nk")
        assert out.read_bytes() == b"dots..."
        stream.feed(b"!")
        assert out.read_bytes() == b"dots...\0nk!"
        stream.feed(marker("end")[:-1] + b"x" * (relay.MAX_EVENT + 1))  # never closed
        assert out.read_bytes().endswith(b"x" * (relay.MAX_EVENT + 1))
        assert not stream.ended
    finally:
        os.close(fd)


# The lane itself: each test boots a QEMU TCG guest (5-30 s on two busy cores).

def lane(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """scripts/nested-kvm with its per-run files under tmp_path/runs."""
    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(runs), "MSBD_LANE_TEST": "passed",
           "LANE_HIDDEN": "not passed", "LANE_ASKED": "asked for"}
    return subprocess.Popen([str(LANE), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def leftover_processes(tmp_path: Path) -> list[str]:
    """Command lines that still name this test's run directory (QEMU's does)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp_path / "runs").encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


GUEST_CHECKS = """
import os, sys
print("cwd", os.getcwd())
print("uid", os.getuid())
print("env", [os.environ.get(k) for k in
              ("MSBD_LANE_TEST", "LANE_HIDDEN", "LANE_ASKED", "MSBD_NESTED_KVM")])
flags = [l for l in open("/proc/cpuinfo") if l.startswith("flags")][0].split()
print("svm", "svm" in flags)
print("kvm", os.path.exists("/dev/kvm"), os.path.exists("/sys/module/kvm_amd"),
      os.path.exists("/sys/module/kvm_pvm"))
probe = "/tmp/xattr-probe"
open(probe, "w").close()
os.setxattr(probe, "user.msbd", b"yes")
print("tmp xattr", os.getxattr(probe, "user.msbd"))
print("to stderr", file=sys.stderr)
sys.exit(3)
"""


@pytest.mark.slow
def test_lane_runs_cmd_as_root_with_nested_kvm(tmp_path: Path) -> None:
    p = lane(tmp_path, "--env", "LANE_ASKED", "--", sys.executable, "-c", GUEST_CHECKS)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 3, err.decode()
    assert out.decode().splitlines() == [
        f"cwd {REPO}",
        "uid 0",
        "env ['passed', None, 'asked for', '1']",
        "svm True",
        "kvm True True False",
        "tmp xattr b'yes'",
    ]
    assert err == b"to stderr\n"  # CMD's stderr alone: no kernel or lane messages
    assert leftover_processes(tmp_path) == []
    assert os.listdir(tmp_path / "runs") == []


@pytest.mark.slow
def test_lane_timeout_stops_the_guest(tmp_path: Path) -> None:
    # 7 s: the lane's kicks (at the start and after 5 s) come first; stage2 ignores them.
    p = lane(tmp_path, "--timeout", "7", "--", "sh", "-c", "echo before; exec sleep 600")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 124
    assert out == b"before\n"
    text = err.decode()
    assert "CMD still running after --timeout 7 s; asking the guest what its processes " \
        "are doing" in text
    # Before it is stopped, the guest says what each process waits on: here the job's sleep.
    [job] = [ln for ln in text.splitlines() if ln.startswith("--- ") and "sleep 600" in ln]
    assert job.split()[2] == "S", job
    assert text.index("nested-kvm: diag: done") < text.index("stopped the guest")
    [kept] = (tmp_path / "runs").iterdir()  # with the kernel's own dump on the console
    assert "Show Blocked State" in (kept / "console.log").read_text(errors="replace")
    assert leftover_processes(tmp_path) == []


@pytest.mark.slow
def test_lane_reports_a_guest_kernel_panic(tmp_path: Path) -> None:
    p = lane(tmp_path, "--", "sh", "-c", "echo c > /proc/sysrq-trigger; sleep 600")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 125
    assert out == b""
    assert "the guest kernel panicked: Kernel panic - not syncing: sysrq triggered crash" \
        in err.decode()
    [kept] = (tmp_path / "runs").iterdir()  # the console log stays for diagnosis
    assert "sysrq triggered crash" in (kept / "console.log").read_text(errors="replace")
    assert leftover_processes(tmp_path) == []


@pytest.mark.slow
def test_lane_sigint_stops_the_guest(tmp_path: Path) -> None:
    p = lane(tmp_path, "--", "sh", "-c", "echo ready; exec sleep 600")
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"  # CMD is running in the guest
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGINT
    assert "interrupted by signal 2; stopped the guest" in err.decode()
    assert leftover_processes(tmp_path) == []
