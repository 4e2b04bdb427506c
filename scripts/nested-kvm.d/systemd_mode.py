"""`scripts/nested-kvm --systemd`: the guest boots Debian's systemd as PID 1, with msbd installed.

Why it is built this way: the first-stage init already lays the host's root under a tmpfs
overlay, so "installing" is writing files into that overlay before `switch_root`. We
prepare them on the host as a tree (`RUN/root/`) that the init copies over the new root:
the project's units as an admin installs them (README, "Running under systemd"), a drop-in
pointing ExecStart at this checkout's `.venv/bin/msbd` (so nothing is installed system
wide), msbd.socket enabled by `systemctl --root=... enable` itself, and our own target
that pulls basic.target and one service running the lane's stage 2 (the same markers on
the same ports as the plain mode), so the host side does not change at all.

Boot cost under TCG is dominated by what systemd starts and execs, so everything that does
nothing useful in a throwaway guest without udev, network or consoles is masked, and every
generator is disabled (they run again on each `daemon-reload`). See docs/nested-kvm.md for
the numbers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TARGET = "nested-kvm.target"
JOB_UNIT = "nested-kvm-job.service"
KERNEL_ARGS = ("nkvm.pid1=systemd", f"systemd.unit={TARGET}", "systemd.firstboot=off")
GENERATOR_DIRS = (Path("/usr/lib/systemd/system-generators"),
                  Path("/lib/systemd/system-generators"))

# Units that cost boot time and serve nothing here. Masked (a symlink to /dev/null), so
# whatever wants them goes on without them. Kept on purpose: journald (tests read the
# journal, `systemctl status` shows it), systemd-sysusers (it creates the msbd group that
# msbd.socket needs), systemd-tmpfiles-setup (the directories other packages expect).
MASKED = (
    # udev: the first-stage init already set up /dev/kvm and the serial ports' names.
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "systemd-hwdb-update.service",
    # "/etc is older than /usr" jobs (the overlay has no /etc/.updated): slow, useless here.
    "ldconfig.service", "systemd-journal-catalog-update.service", "systemd-update-done.service",
    # first-boot, persistence and hardware jobs of a real machine.
    "systemd-firstboot.service", "systemd-machine-id-commit.service",
    "systemd-random-seed.service", "systemd-pstore.service", "systemd-timesyncd.service",
    "systemd-repart.service", "systemd-pcrphase.service", "systemd-pcrphase-sysinit.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "systemd-modules-load.service", "kmod-static-nodes.service",
    "systemd-journal-flush.service", "systemd-update-utmp.service",
    "systemd-ask-password-console.path", "systemd-ask-password-wall.path",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount", "dev-hugepages.mount", "dev-mqueue.mount",
    "systemd-sysctl.service",  # the kernel's defaults serve a throwaway guest
    # Sockets and timers of other packages; consoles, remote filesystems.
    "dbus.socket", "systemd-initctl.socket", "systemd-journald-audit.socket",
    "timers.target", "getty.target", "remote-fs.target", "e2scrub_reap.service",
)

TARGET_TEXT = f"""\
[Unit]
Description=nested-kvm: just enough of a system to run the caller's command
Requires=basic.target
Wants={JOB_UNIT}
After=basic.target
"""

JOB_TEXT = """\
[Unit]
Description=nested-kvm: the caller's command, relayed to the host
After=basic.target

[Service]
# stage2 writes the markers, runs the job on the serial ports and powers the guest off.
Type=exec
ExecStart=/run/nested-kvm/busybox sh /run/nested-kvm/stage2
StandardInput=null
"""


def drop_in(msbd: Path, checkout: Path) -> str:
    """msbd.service runs this checkout's msbd: the README's virtualenv drop-in.

    One more line: under TCG a start of msbd (Python importing its packages) takes 15-60 s
    depending on the host's load, against about a second on a real host, so the unit's
    TimeoutStartSec (90 s) is raised rather than left to kill a slow but healthy start.
    """
    text = f"[Service]\nExecStart=\nExecStart={msbd} serve\nTimeoutStartSec=300s\n"
    if checkout.is_relative_to("/tmp") or checkout.is_relative_to("/var/tmp"):
        # PrivateTmp=yes would hide a checkout there from the daemon.
        text += f"BindReadOnlyPaths={checkout}\n"
    return text


def install(root: Path, checkout: Path) -> None:
    """Write the files the guest gets on top of the host's root into `root`."""
    msbd = checkout / ".venv" / "bin" / "msbd"
    if not os.access(msbd, os.X_OK):
        raise SystemExit(f"nested-kvm: --systemd runs {msbd}, which does not exist "
                         f"(run `make setup` in {checkout} first)")
    units = root / "etc/systemd/system"
    (units / "msbd.service.d").mkdir(parents=True)
    for name in ("msbd.service", "msbd.socket"):
        shutil.copyfile(checkout / "systemd" / name, units / name)
    (units / "msbd.service.d" / "nested-kvm.conf").write_text(drop_in(msbd, checkout))
    sysusers = root / "usr/lib/sysusers.d"
    sysusers.mkdir(parents=True)
    shutil.copyfile(checkout / "systemd" / "msbd.sysusers", sysusers / "msbd.conf")
    (units / TARGET).write_text(TARGET_TEXT)
    (units / JOB_UNIT).write_text(JOB_TEXT)
    for name in MASKED:
        (units / name).symlink_to("/dev/null")
    generators = root / "etc/systemd/system-generators"
    generators.mkdir(parents=True)
    names = {p.name for d in GENERATOR_DIRS if d.is_dir() for p in d.iterdir()}
    for name in sorted(names):
        (generators / name).symlink_to("/dev/null")
    # Nothing to mount: the init did it all. The host's fstab must not make systemd wait.
    (root / "etc/fstab").write_text("# nested-kvm --systemd: everything is mounted by the init\n")
    enabled = subprocess.run(["systemctl", f"--root={root}", "enable", "msbd.socket"],
                             capture_output=True, text=True, check=False)
    if enabled.returncode != 0:
        raise SystemExit(f"nested-kvm: systemctl --root enable msbd.socket failed: "
                         f"{enabled.stderr.strip()}")
