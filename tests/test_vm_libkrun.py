"""The worker against a real libkrun (MSBD_LIBKRUN) on a host that can boot a guest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from workerproc import Workers, spec_bytes

from msbd.vm import doctor

pytestmark = pytest.mark.libkrun


def real_libkrun_missing() -> str | None:
    """Why this host cannot run a real guest, or None when it can."""
    why: list[str] = []
    if not os.environ.get("MSBD_LIBKRUN"):
        why.append("MSBD_LIBKRUN does not name a libkrun")
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    if not doctor.virt_flags(cpuinfo):
        why.append("no hardware virtualization (vmx/svm) in /proc/cpuinfo")
    if not doctor.check_kvm_device().ok:
        why.append("/dev/kvm is missing or not read/write")
    elif doctor.pvm_loaded():
        why.append("/dev/kvm is kvm_pvm, which cannot boot a guest kernel")
    return "; ".join(why) or None


@pytest.fixture
def real_libkrun() -> str:
    if reason := real_libkrun_missing():
        pytest.skip(reason)
    return os.environ["MSBD_LIBKRUN"]



def test_workload_exit_status(real_libkrun: str, busybox_root: Path,
                              workers: Workers) -> None:
    spec = spec_bytes(name="real", rootfs=str(busybox_root), exec="/bin/sh",
                      args=["-c", "echo hello; exit 7"], libkrun=real_libkrun)
    w = workers.start(spec, env={"MSBD_LIBKRUN": real_libkrun})
    assert w.status_line(60) == "entering"
    assert w.wait(120) == 7
    assert "hello" in w.output()


def test_watchdog_eof_stops_a_real_guest(real_libkrun: str, busybox_root: Path,
                                         workers: Workers) -> None:
    spec = spec_bytes(name="real", rootfs=str(busybox_root), exec="/bin/sleep", args=["1000"],
                      libkrun=real_libkrun, shutdown_grace=5.0)
    w = workers.start(spec, env={"MSBD_LIBKRUN": real_libkrun})
    assert w.status_line(60) == "entering"
    w.close_watchdog()
    w.wait(30)
