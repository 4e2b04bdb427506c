"""`python -m msbd.vm doctor`: each check's logic as a table, and its JSON for the daemon."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from workerproc import REPO

from msbd.contract import CheckInfo
from msbd.vm import doctor, krun


@pytest.mark.parametrize(("cpuinfo", "flags"), [
    ("processor\t: 0\nflags\t\t: fpu vme vmx sse\n", {"vmx"}),
    ("flags\t: fpu svm\nflags\t: fpu svm\n", {"svm"}),
    ("flags\t: fpu sse avx\n", set()),
    ("vmx flags\t: vnmi preemption_timer\nflags\t: fpu\n", set()),  # not the `flags` line
    ("", set()),
])
def test_virt_flags(cpuinfo: str, flags: set[str]) -> None:
    assert doctor.virt_flags(cpuinfo) == flags
    assert doctor.check_cpu(cpuinfo).ok == bool(flags)


@pytest.mark.parametrize(("sys_modules", "proc_modules", "pvm"), [
    (["kvm", "kvm_pvm"], None, True),
    (["kvm", "kvm_intel"], "kvm_intel 1 0 - Live 0x0\nkvm 2 1 kvm_intel, Live 0x0\n", False),
    ([], "kvm_pvm 1 0 - Live 0x0\n", True),
    ([], "kvm_pvmx 1 0 - Live 0x0\n", False),
    ([], None, False),
])
def test_pvm_detection(tmp_path: Path, sys_modules: list[str], proc_modules: str | None,
                       pvm: bool) -> None:
    (tmp_path / "sys").mkdir()
    for name in sys_modules:
        (tmp_path / "sys" / name).mkdir()
    modules = tmp_path / "modules"
    if proc_modules is not None:
        modules.write_text(proc_modules)
    assert doctor.pvm_loaded(tmp_path / "sys", modules) is pvm
    check = doctor.check_kvm_module(pvm)
    assert check.ok is not pvm
    if pvm:
        assert "cannot boot" in check.detail


def test_missing_kvm_device(tmp_path: Path) -> None:
    check = doctor.check_kvm_device(str(tmp_path / "kvm"))
    assert not check.ok and check.hint


def run_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "msbd.vm", "doctor", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
                          check=False)


def test_json_shape_for_the_daemon(fakekrun: Path) -> None:
    proc = run_doctor("--json", "--libkrun", str(fakekrun))
    report = json.loads(proc.stdout)
    assert set(report) == {"checks", "libkrun", "libkrun_problem", "libkrun_version",
                           "libkrunfw", "libkrunfw_version"}
    assert [c["name"] for c in report["checks"]] == [
        "virtualization", "kvm_device", "kvm_module", "libkrun", "libkrunfw"]
    for c in report["checks"]:
        assert set(c) == {"name", "ok", "detail", "hint"}
        msgspec.convert(c, CheckInfo)  # the daemon shows these as daemon.info's checks
    assert report["libkrun"] == str(fakekrun)
    assert report["libkrun_problem"] is None
    assert "TEST DOUBLE" in report["checks"][3]["detail"]
    assert proc.returncode == (0 if all(c["ok"] for c in report["checks"]) else 1)


def test_no_libkrun_in_json_and_text(tmp_path: Path) -> None:
    proc = run_doctor("--json", "--libkrun", str(tmp_path / "missing.so"))
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["libkrun"] is None
    assert str(tmp_path / "missing.so") in report["libkrun_problem"]
    text = run_doctor("--libkrun", str(tmp_path / "missing.so"))
    assert text.returncode == 1
    assert "PROBLEM  libkrun: libkrun not loadable" in text.stdout
    assert text.stdout.endswith("not ready to launch sandboxes\n")


@pytest.mark.parametrize(("name", "soname", "version"), [
    ("libkrun.so.1.19.7", "libkrun.so.1", "1.19.7"),
    ("libkrun.so.1", "libkrun.so.1", "1"),
    ("libkrunfw.so.5.6.1", "libkrunfw.so.5", "5.6.1"),
    ("libkrun.so", "libkrun.so.1", None),
    ("libfakekrun.so", "libkrun.so.1", None),
    ("libkrun.so.1.19.7-rc1", "libkrun.so.1", None),
])
def test_version_in_a_librarys_name(tmp_path: Path, name: str, soname: str,
                                    version: str | None) -> None:
    (tmp_path / name).touch()
    (tmp_path / "link").symlink_to(name)
    assert krun.version_in_name(str(tmp_path / "link"), soname) == version


def test_doctor_names_the_version_it_loaded(fakekrun: Path, tmp_path: Path) -> None:
    shutil.copy2(fakekrun, tmp_path / "libkrun.so.1.2.3")
    (tmp_path / "libkrun.so.1").symlink_to("libkrun.so.1.2.3")
    report = json.loads(run_doctor("--json", "--libkrun", str(tmp_path / "libkrun.so.1")).stdout)
    assert report["libkrun_version"] == "1.2.3"
    assert "(libkrun 1.2.3)" in report["checks"][3]["detail"]
