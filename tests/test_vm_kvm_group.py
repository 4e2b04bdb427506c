"""The one group a worker adds when it becomes the owner: the one that opens /dev/kvm."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from msbd.vm.hostfiles import kvm_groups

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the stand-in")

KVM_GID = 64190


@pytest.mark.parametrize(("mode", "uid", "gid", "groups", "want"), [
    (0o660, 1000, 1000, set(), {KVM_GID}),  # only the group may: add it
    (0o660, 1000, KVM_GID, set(), set()),  # already its primary group
    (0o660, 1000, 1000, {KVM_GID}, set()),  # already a supplementary group
    (0o666, 1000, 1000, set(), set()),  # everyone may already
    (0o640, 1000, 1000, set(), set()),  # the group may not write: adding it would not help
    (0o600, 1000, 1000, set(), set()),
    (0o660, 0, 1000, set(), set()),  # the device's owner: the owner class decides
])
def test_kvm_groups(tmp_path: Path, mode: int, uid: int, gid: int, groups: set[int],
                    want: set[int]) -> None:
    device = tmp_path / "kvm"
    device.touch()
    os.chown(device, 0, KVM_GID)
    os.chmod(device, mode)
    assert kvm_groups(uid, gid, groups, device=str(device)) == want


def test_no_device_adds_nothing(tmp_path: Path) -> None:
    assert kvm_groups(1000, 1000, set(), device=str(tmp_path / "missing")) == set()
