"""`python -m msbd.vm doctor`: can this host launch a sandbox, and if not, what to do."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec

from msbd.contract import CheckInfo, HostReport
from msbd.errors import LibraryNotLoadable
from msbd.vm import krun

KVM_DEVICE: Final = "/dev/kvm"


def virt_flags(cpuinfo: str) -> set[str]:
    """The hardware virtualization flags (`vmx`, `svm`) in /proc/cpuinfo's text."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            found |= {"vmx", "svm"} & set(value.split())
    return found


def check_cpu(cpuinfo: str) -> CheckInfo:
    if flags := virt_flags(cpuinfo):
        return CheckInfo(name="virtualization", ok=True,
                     detail=f"the CPU has hardware virtualization ({', '.join(sorted(flags))})")
    return CheckInfo(name="virtualization", ok=False,
                 detail="no vmx/svm flag in /proc/cpuinfo: no hardware virtualization",
                 hint="run on bare metal, or enable nested virtualization for this VM")


def check_kvm_device(path: str = KVM_DEVICE) -> CheckInfo:
    if not os.path.exists(path):
        return CheckInfo(name="kvm_device", ok=False, detail=f"{path} does not exist",
                     hint="load kvm_intel or kvm_amd (modprobe), or enable KVM in the host")
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return CheckInfo(name="kvm_device", ok=False,
                     detail=f"{path} is not read/write for uid {os.getuid()}: {exc.strerror}",
                     hint=f"add this user to the group owning {path} (usually `kvm`)")
    return CheckInfo(name="kvm_device", ok=True, detail=f"{path} opens read/write")


def pvm_loaded(sys_module: Path = Path("/sys/module"),
               proc_modules: Path = Path("/proc/modules")) -> bool:
    """Whether /dev/kvm is served by kvm_pvm (a paravirtual hypervisor inside a VM)."""
    if (sys_module / "kvm_pvm").exists():
        return True
    try:
        text = proc_modules.read_text()
    except OSError:
        return False
    return any(line.split(maxsplit=1)[:1] == ["kvm_pvm"] for line in text.splitlines())


def check_kvm_module(pvm: bool) -> CheckInfo:
    """kvm_pvm opens and creates VMs like KVM, but dies on an unmodified guest kernel:
    the device opening is not enough, the module serving it decides."""
    if pvm:
        return CheckInfo(name="kvm_module", ok=False,
                     detail="/dev/kvm is served by kvm_pvm, which cannot boot an unmodified "
                            "guest kernel (guests die with KVM_EXIT_INTERNAL_ERROR)",
                     hint="run on a host with hardware virtualization (kvm_intel/kvm_amd)")
    return CheckInfo(name="kvm_module", ok=True, detail="/dev/kvm is not served by kvm_pvm")


def check_libkrun(configured: str | None) -> tuple[CheckInfo, str | None, str | None]:
    """(check, path, problem): actually loads libkrun in the worker's lookup order."""
    try:
        lib = krun.load(configured)
    except LibraryNotLoadable as exc:
        return (CheckInfo(name="libkrun", ok=False, detail=str(exc),
                      hint=f"install libkrun ({krun.SONAME}) or set ${krun.ENV_VAR} "
                           "or the daemon's libkrun setting to its path"),
                None, str(exc))
    detail = f"loaded {lib.path}"
    if version := krun.version_in_name(lib.path, krun.SONAME):
        detail += f" (libkrun {version})"
    if lib.test_double:
        detail += " (msbd's libkrun TEST DOUBLE from tests/fakekrun: it runs no VM)"
    return CheckInfo(name="libkrun", ok=True, detail=detail), lib.path, None


def check_libkrunfw(beside: str | None = None) -> tuple[CheckInfo, str | None]:
    """(check, path): libkrunfw as a worker loads it (the loader, then next to libkrun)."""
    try:
        path = krun.load_libkrunfw(beside)
    except LibraryNotLoadable as exc:
        return (CheckInfo(name="libkrunfw", ok=False, detail=str(exc),
                      hint="install libkrunfw where the dynamic loader finds it (ldconfig, "
                           "LD_LIBRARY_PATH in the daemon's environment, or next to libkrun)"),
                None)
    detail = f"loaded {path}"
    if version := krun.version_in_name(path, "libkrunfw.so.5"):
        detail += f" (libkrunfw {version})"
    return CheckInfo(name="libkrunfw", ok=True, detail=detail), path


def run_checks(libkrun: str | None) -> HostReport:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    lib_check, path, problem = check_libkrun(libkrun)
    fw_check, fw_path = check_libkrunfw(path)
    checks = [check_cpu(cpuinfo), check_kvm_device(), check_kvm_module(pvm_loaded()),
              lib_check, fw_check]
    return HostReport(checks=checks, libkrun=path, libkrun_problem=problem,
                  libkrun_version=path and krun.version_in_name(path, krun.SONAME),
                  libkrunfw=fw_path,
                  libkrunfw_version=fw_path and krun.version_in_name(fw_path,
                                                                     "libkrunfw.so.5"))


def render(report: HostReport) -> str:
    lines: list[str] = []
    for c in report.checks:
        lines.append(f"{'ok' if c.ok else 'PROBLEM':8} {c.name}: {c.detail}")
        if not c.ok and c.hint:
            lines.append(f"{'':8} what to do: {c.hint}")
    lines.append("ready to launch sandboxes" if report.ok else "not ready to launch sandboxes")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    """Exit 0 when everything needed to launch is fine, 1 otherwise."""
    p = argparse.ArgumentParser(prog="python -m msbd.vm doctor",
                                description="check that this host can launch sandboxes")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--libkrun", metavar="PATH", help="the libkrun to try first")
    opts = p.parse_args(argv)
    report = run_checks(opts.libkrun)
    out = msgspec.json.encode(report) + b"\n" if opts.json else render(report).encode()
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return 0 if report.ok else 1
