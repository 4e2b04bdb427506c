"""The host side of `scripts/nested-kvm --systemd` and of scripts/systemd-test, without a boot.

The boot itself is exercised by scripts/systemd-test (every `-m systemd` test runs in
it); here, in the default run, what that lane relies on: the files it lays over the
guest's root install the units as README says, with msbd.socket enabled by systemctl
itself, and the plain mode's kernel command line is untouched. And since the lane
collects only tests/test_systemd_*.py (collecting the whole suite under TCG costs
minutes), a test marked `systemd` anywhere else would never run: that is caught here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from workerproc import REPO

LANE_DIR = REPO / "scripts" / "nested-kvm.d"


def load(name: str) -> ModuleType:
    sys.path.insert(0, str(LANE_DIR))  # guest.py imports its siblings by name
    try:
        unique = f"nested_kvm_{name}"  # not the repository's guest/ directory
        spec = importlib.util.spec_from_file_location(unique, LANE_DIR / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(LANE_DIR))


systemd_mode = load("systemd_mode")
guest = load("guest")


def test_every_systemd_test_lives_where_the_lane_collects() -> None:
    marked = {p.name for p in (REPO / "tests").glob("*.py")
              if re.search(r"pytest\.mark\.systemd\b", p.read_text())}
    assert {"test_systemd_real.py", "test_systemd_vm.py"} <= marked
    assert all(name.startswith("test_systemd_") for name in marked), sorted(marked)
    assert "tests/test_systemd_*.py" in (REPO / "scripts" / "systemd-test").read_text()


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    systemd_mode.install(root, REPO)
    return root


def test_the_units_are_installed_as_the_readme_says(installed: Path) -> None:
    units = installed / "etc/systemd/system"
    for name in ("msbd.service", "msbd.socket"):
        assert (units / name).read_bytes() == (REPO / "systemd" / name).read_bytes()
    assert (installed / "usr/lib/sysusers.d/msbd.conf").read_bytes() == \
        (REPO / "systemd/msbd.sysusers").read_bytes()
    drop_in = (units / "msbd.service.d/nested-kvm.conf").read_text()
    assert drop_in.splitlines()[1:3] == [
        "ExecStart=", f"ExecStart={REPO}/.venv/bin/msbd serve"]
    # `systemctl --root enable msbd.socket` made exactly the link WantedBy= asks for.
    link = units / "sockets.target.wants/msbd.socket"
    assert os.readlink(link) == "/etc/systemd/system/msbd.socket"
    assert not (units / "multi-user.target.wants").exists(), "msbd.service is not enabled"


def test_the_target_runs_stage2_and_masks_point_at_dev_null(installed: Path) -> None:
    units = installed / "etc/systemd/system"
    assert f"Wants={systemd_mode.JOB_UNIT}" in (units / systemd_mode.TARGET).read_text()
    assert "ExecStart=/run/nested-kvm/busybox sh /run/nested-kvm/stage2" in \
        (units / systemd_mode.JOB_UNIT).read_text()
    for name in systemd_mode.MASKED:
        assert os.readlink(units / name) == "/dev/null", name
    generators = list((installed / "etc/systemd/system-generators").iterdir())
    assert generators and all(os.readlink(g) == "/dev/null" for g in generators)
    assert f"systemd.unit={systemd_mode.TARGET}" in systemd_mode.KERNEL_ARGS


def test_install_refuses_a_checkout_without_its_venv(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="make setup"):
        systemd_mode.install(tmp_path / "root", tmp_path)


def test_the_plain_mode_boots_as_before(tmp_path: Path) -> None:
    opts = guest.Options(cpus=1, memory_mib=1024, timeout=None, boot_timeout=300.0,
                         verbose=False)
    boot = guest.artifacts.Boot(dir=tmp_path, kernel=tmp_path / "k", initramfs=tmp_path / "i")
    cmd = guest.qemu_command(opts, boot, tmp_path)
    append = cmd[cmd.index("-append") + 1].split()
    assert append == [*guest.artifacts.KERNEL_ARGS, f"nkvm.run={tmp_path}"]
    systemd = guest.qemu_command(
        guest.Options(cpus=1, memory_mib=1024, timeout=None, boot_timeout=300.0,
                      verbose=False, kernel_args=systemd_mode.KERNEL_ARGS), boot, tmp_path)
    assert systemd[systemd.index("-append") + 1].split() == [
        *guest.artifacts.KERNEL_ARGS, *systemd_mode.KERNEL_ARGS, f"nkvm.run={tmp_path}"]
