"""A cgroup per run under a real systemd: limits, accounting and OOM kills of real guests.

Run in scripts/systemd-test (`pytest -m systemd`). msbd.service is restarted with the
settings of each test in a runtime drop-in (`systemdlane.serve_guests`): what is checked
is that the kernel's own files in the run's cgroup say what those settings say, that
`sandbox.metrics` reports those same files, and that a guest whose VMM outgrows its
`memory.max` ends as `oom_killed` while the daemon and another guest go on.

The VMM overhead of a small guest (what its run takes of the host beyond the guest's
own pages) is measured here too, and printed (`-s` shows it; docs/cgroups.md records
it): `memory.peak` of the run minus the guest RAM the VMM has resident.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from systemdlane import (
    GUEST_WAIT,
    MSBCTL,
    MSBD,
    call,
    drop_in,
    guest,
    logs,
    ping,
    run,
    serve_guests,
    systemctl,
    wait_for,
)

from msbd.config import Settings
from msbd.daemon import cgroups
from msbd.errors import RemoteError

pytestmark = pytest.mark.systemd

SERVICE_CGROUP = Path("/sys/fs/cgroup/system.slice/msbd.service")
MIB = 1024 * 1024
PIDS_MAX = 300  # not the default: the setting is what reaches the kernel
DEFAULT_OVERHEAD = next(f.default for f in msgspec.structs.fields(Settings)
                        if f.name == "cgroup_vmm_overhead_mib")


@pytest.fixture(scope="module")
def guest_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with serve_guests(tmp_path_factory.mktemp("roots"),
                      f"Environment=MSBD_CGROUP_PIDS_MAX={PIDS_MAX}\n") as root:
        yield root


def run_cgroup(info: dict[str, Any]) -> Path:
    """The run's cgroup, where /proc says its worker is (and where msbd says it put it)."""
    pid, run_id = info["run"]["pid"], info["run"]["id"]
    path = Path(f"/proc/{pid}/cgroup").read_text().strip().removeprefix("0::")
    assert path == f"/system.slice/msbd.service/runs/run-{run_id}"
    return SERVICE_CGROUP / "runs" / f"run-{run_id}"


def value(cg: Path, name: str) -> int:
    return int((cg / name).read_text())


def guest_ram_resident(pid: int, memory_mib: int) -> int:
    """Bytes of the guest's RAM the VMM has resident: the `Rss` of its anonymous mappings
    of at least the guest's size (libkrun maps a small guest's RAM in one piece)."""
    mappings: list[tuple[str, int, int]] = []  # (header, size in KiB, Rss in KiB)
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if header := re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line):
            size = (int(header[2], 16) - int(header[1], 16)) // 1024
            mappings.append((line, size, 0))
        elif line.startswith("Rss:") and mappings:
            head, size, _ = mappings[-1]
            mappings[-1] = (head, size, int(line.split()[1]))
    ram = [m for m in mappings if m[1] >= memory_mib * 1024 and len(m[0].split()) == 5]
    assert len(ram) == 1, f"no single anonymous mapping of {memory_mib} MiB or more: " + \
        "; ".join(f"{h} size {s} kB rss {r} kB" for h, s, r in mappings if s >= 16384)
    return ram[0][2] * 1024


def test_a_running_guest_has_the_limits_the_settings_say_and_its_metrics_are_the_cgroups(
        guest_root: Path) -> None:
    info = call("sandbox.run", guest("counted", guest_root, "echo up; exec sleep 600"))
    wait_for(lambda: "up" in logs("counted"), "the guest's first line", timeout=GUEST_WAIT)
    cg = run_cgroup(info)
    assert value(cg, "memory.max") == (256 + DEFAULT_OVERHEAD) * MIB
    assert (cg / "memory.swap.max").read_text().strip() == "0"
    assert (cg / "memory.oom.group").read_text().strip() == "1"
    assert value(cg, "pids.max") == PIDS_MAX
    assert (cg / "cpu.max").read_text().split() == ["max", "100000"]  # cgroup_cpu_max off

    # The files before and after the call bracket what it reports (monotonic counters),
    # and the limits and pids of a quiet guest are the same on both sides.
    before_cpu, before_peak = cgroups.keyed(cg, "cpu.stat"), value(cg, "memory.peak")
    before_pids, before_mem = value(cg, "pids.current"), value(cg, "memory.current")
    m = call("sandbox.metrics", {"name": "counted"})
    after_cpu, after_peak = cgroups.keyed(cg, "cpu.stat"), value(cg, "memory.peak")
    after_pids, after_mem = value(cg, "pids.current"), value(cg, "memory.current")
    got = m["cgroup"]
    assert m["source"] == "cgroup" and m["pid"] == info["run"]["pid"]
    assert got["memory_max"] == value(cg, "memory.max") and got["pids_max"] == PIDS_MAX
    assert before_peak <= got["memory_peak"] <= after_peak
    for key in ("usage_usec", "user_usec", "system_usec"):
        assert before_cpu[key] <= got[f"cpu_{key}"] <= after_cpu[key], key
    assert got["oom_kills"] == 0
    if before_pids == after_pids:
        assert got["pids_current"] == before_pids
    low, high = sorted((before_mem, after_mem))
    assert low - 4 * MIB <= got["memory_current"] <= high + 4 * MIB
    assert got["memory_peak"] >= got["memory_current"] > 0
    assert got["io_read_bytes"] is not None and got["io_write_bytes"] is not None

    totals = call("daemon.info", {})
    assert totals["cgroups"]["enabled"] and totals["cgroups"]["root"] == str(SERVICE_CGROUP)
    assert {"memory", "pids"} <= set(totals["cgroups"]["controllers"])
    assert totals["cgroup_totals"]["runs"] == 1
    assert totals["cgroup_totals"]["pids_max"] == PIDS_MAX
    doctor = run(MSBD, "doctor").stdout.splitlines()[-1]
    assert doctor.startswith(f"ok       cgroups: on (the running daemon): a cgroup per run under "
                             f"{SERVICE_CGROUP}/runs, with "), doctor

    assert_overhead_fits(cg, info["run"]["pid"], 256, "idle")
    call("sandbox.stop", {"name": "counted", "timeout": 20})
    wait_for(lambda: not cg.exists(), "the run's cgroup to be removed", timeout=30)


def assert_overhead_fits(cg: Path, pid: int, memory_mib: int, what: str) -> None:
    """The run's memory.peak minus its guest RAM resident: printed, and at most half the
    default allowance (the margin the default is chosen with)."""
    peak = value(cg, "memory.peak")
    overhead = peak - guest_ram_resident(pid, memory_mib)
    print(f"\nVMM overhead, {memory_mib} MiB guest, {what}: memory.peak {peak / MIB:.1f} MiB,"
          f" guest RAM resident {(peak - overhead) / MIB:.1f} MiB, overhead "
          f"{overhead / MIB:.1f} MiB")
    assert overhead * 2 <= DEFAULT_OVERHEAD * MIB, "the default leaves less than 2x margin"


def test_the_vmm_overhead_of_a_busier_guest_fits_the_default(guest_root: Path) -> None:
    """Two vCPUs, 512 MiB, 64 MiB written and read back through virtio-fs."""
    script = ("dd if=/dev/zero of=/work/io bs=1M count=64 2>/dev/null && "
              "cat /work/io > /dev/null && rm /work/io && echo done; exec sleep 600")
    info = call("sandbox.run", guest("busier", guest_root, script, memory_mib=512) |
                {"vcpus": 2})
    wait_for(lambda: "done" in logs("busier"), "the guest's IO", timeout=GUEST_WAIT)
    assert_overhead_fits(run_cgroup(info), info["run"]["pid"], 512, "2 vCPUs, 64 MiB of IO")
    call("sandbox.stop", {"name": "busier", "timeout": 20})


OOM_GUEST_MIB = 512
OOM_OVERHEAD_MIB = 1
# Fills a tmpfs as large as the guest's RAM, 16 MiB at a time: the guest's pages become
# the VMM's resident memory, and guest RAM plus the VMM's own (about 70 MiB, measured
# above) passes memory.max = guest RAM + 1 MiB well before the guest runs out.
HOG = ("echo up; mount -t tmpfs -o size=100% fill /mnt || exit 3; i=0; "
       "while dd if=/dev/zero of=/mnt/f$i bs=1M count=16 2>/dev/null; do "
       "i=$((i+1)); echo filled $((i*16)) MiB; done; echo survived; exec sleep 600")


def test_a_guest_that_outgrows_memory_max_ends_oom_killed_and_nothing_else_does(
        guest_root: Path) -> None:
    """memory.max is the guest's RAM and 1 MiB: a guest that fills its RAM takes the VMM
    past it (the VMM's own memory comes on top)."""
    conf = drop_in("61-test-oom.conf",
                   f"[Service]\nEnvironment=MSBD_CGROUP_VMM_OVERHEAD_MIB={OOM_OVERHEAD_MIB}\n")
    try:
        systemctl("restart", "msbd.service")
        bystander = call("sandbox.run", guest("bystander", guest_root,
                                              "echo up; exec sleep 600"))
        wait_for(lambda: "up" in logs("bystander"), "the bystander's first line",
                 timeout=GUEST_WAIT)
        hog = call("sandbox.run", guest("hog", guest_root, HOG, memory_mib=OOM_GUEST_MIB))
        hog_cg = run_cgroup(hog)
        assert value(hog_cg, "memory.max") == (OOM_GUEST_MIB + OOM_OVERHEAD_MIB) * MIB
        try:
            end = call("sandbox.wait", {"name": "hog", "timeout": GUEST_WAIT})
        except RemoteError as exc:
            raise AssertionError(f"{exc}; memory.peak {value(hog_cg, 'memory.peak') / MIB:.1f}"
                                 f" MiB; the guest said:\n{logs('hog')}") from exc
        assert (end["state"], end["run"]["reason"]) == ("stopped", "oom_killed"), \
            (end, logs("hog"))
        assert f"memory.max of {OOM_GUEST_MIB + OOM_OVERHEAD_MIB} MiB" in end["run"]["detail"]
        said = logs("hog")
        assert "survived" not in said
        filled = [line for line in said.splitlines() if line.startswith("filled")]
        print(f"\nhog: {end['run']['detail']}; the guest had {filled[-1:] or 'nothing filled'}")
        listed = run(MSBCTL, "ls")
        assert any(line.split()[:1] == ["hog"] and "oom_killed" in line
                   for line in listed.stdout.splitlines()), listed.stdout

        # The other guest and the daemon are untouched.
        assert call("sandbox.get", {"name": "bystander"})["state"] == "running"
        os.kill(bystander["run"]["pid"], 0)
        assert cgroups.keyed(run_cgroup(bystander), "memory.events")["oom_kill"] == 0
        assert "pong" in ping()
        assert run("systemctl", "is-active", "msbd.service").stdout.strip() == "active"
        events = run(MSBCTL, "events", "--since", "0", "--no-follow")
        assert any(line.split()[2:5] == ["hog", "stopped", "oom_killed"]
                   for line in events.stdout.splitlines()), events.stdout
        call("sandbox.stop", {"name": "bystander", "timeout": 20})
    finally:
        conf.unlink()
        systemctl("daemon-reload")
