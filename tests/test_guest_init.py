"""The guest init (guest/init) as PID 1 of fresh namespaces, chrooted into a busybox root.

A libkrun guest cannot boot on every host, but the init's logic does not need one:
run as PID 1 of new PID, mount, UTS and IPC namespaces it mounts, sets up, runs,
reaps and stops exactly as in a guest. What differs is the end: the root is not
virtio-fs, so instead of the exit-code ioctl the init says "no virtio-fs root to
report exit code N to" (the code these tests read), and its reboot() ends the PID
namespace, which the kernel reports as SIGHUP to our `unshare`. Real guests run
the same binary in the real-VM tests.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "env", "sort", "grep", "hostname", "sleep", "true", "pwd")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create namespaces")


@pytest.fixture(scope="session")
def init_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("init") / "msbd-init"
    subprocess.run(["make", "-s", "-C", str(REPO / "guest" / "init"), f"OUT={out}"], check=True)
    return out


@pytest.fixture
def root(tmp_path: Path, init_binary: Path) -> Path:
    """A busybox root with the init where libkrun puts it, /init.krun."""
    if not BUSYBOX.exists():
        pytest.fail("busybox-static is not installed: run `make setup` (scripts/system-deps.sh)")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    (root / "work").mkdir()
    (root / "not-executable").write_text("data\n")
    shutil.copy2(init_binary, root / "init.krun")
    return root


@dataclass
class Boot:
    output: str
    code: int  # the exit code the init reported

    @property
    def lines(self) -> list[str]:
        return self.output.splitlines()


def boot(root: Path, env: dict[str, str], *args: str, timeout: float = 30) -> Boot:
    """Run the init as PID 1 the way the kernel starts it: HOME and TERM, then ours."""
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--propagation", "private",
         "chroot", str(root), "/init.krun", *args],
        env={"PATH": os.environ["PATH"], "HOME": "/", "TERM": "linux", **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == -signal.SIGHUP, f"init did not reboot: {proc}"
    found = re.findall(r"msbd-init: no virtio-fs root to report exit code (\d+) to", proc.stdout)
    assert len(found) == 1, proc.stdout
    return Boot(proc.stdout, int(found[0]))


def test_workload_gets_its_args_env_workdir_hostname_and_rlimits(root: Path) -> None:
    script = 'echo "argv: $0|$1|$2"; pwd; hostname; ulimit -n; env | sort; exit 7'
    run = boot(root, {"KRUN_INIT": "/bin/sh", "KRUN_WORKDIR": "/work", "HOSTNAME": "guest-1",
                      "KRUN_RLIMITS": "7=123:456", "KRUN_TERM": "xterm", "FOO": "a b",
                      "MSBD_STOP_GRACE": "1"},
               "-c", script, "first", "second arg")
    assert run.code == 7
    assert "argv: first|second arg|" in run.lines
    assert run.lines[1:4] == ["/work", "guest-1", "123"]
    env = [line for line in run.lines if "=" in line and not line.startswith("msbd-init")]
    assert "FOO=a b" in env
    assert "TERM=xterm" in env
    assert "HOSTNAME=guest-1" in env
    assert not [v for v in env if v.startswith(("KRUN_", "MSBD_"))], "init's variables leaked"


def test_pseudo_file_systems_are_mounted(root: Path) -> None:
    run = boot(root, {"KRUN_INIT": "/bin/cat"}, "/proc/mounts")
    assert run.code == 0
    mounts = {line.split()[1]: line.split()[2] for line in run.lines if line.count(" ") >= 3}
    for path, fstype in {"/dev": "devtmpfs", "/proc": "proc", "/sys": "sysfs",
                         "/dev/pts": "devpts", "/dev/shm": "tmpfs", "/tmp": "tmpfs"}.items():
        assert mounts.get(path) == fstype, (path, mounts)


def test_an_existing_tmp_is_left_alone(root: Path) -> None:
    (root / "tmp").mkdir()
    (root / "tmp" / "kept").write_text("")
    run = boot(root, {"KRUN_INIT": "/bin/cat"}, "/proc/mounts")
    assert " /tmp " not in run.output
    assert (root / "tmp" / "kept").exists()


@pytest.mark.parametrize(("env", "code", "line"), [
    ({"KRUN_INIT": "/no/such/program"}, 127,
     "msbd-init: cannot run /no/such/program: No such file or directory"),
    ({"KRUN_INIT": "/not-executable"}, 126, "msbd-init: cannot run /not-executable: "
                                            "Permission denied"),
    ({"KRUN_INIT": "/bin/true", "KRUN_WORKDIR": "/missing"}, 125,
     "msbd-init: cannot enter workdir /missing: No such file or directory"),
    ({"KRUN_INIT": "/bin/true", "KRUN_RLIMITS": "7=1"}, 125,
     "msbd-init: bad KRUN_RLIMITS entry '7=1' (want ID=CUR:MAX)"),
    ({"KRUN_INIT": "/bin/true", "MSBD_STOP_GRACE": "soon"}, 125,
     "msbd-init: bad MSBD_STOP_GRACE 'soon' (want seconds)"),
])
def test_setup_failures_have_a_code_and_one_line(root: Path, env: dict[str, str], code: int,
                                                 line: str) -> None:
    run = boot(root, env)
    assert run.code == code
    assert line in run.lines


def test_sigterm_to_init_stops_the_workload_which_decides_its_code(root: Path) -> None:
    script = "trap 'echo got TERM; exit 42' TERM; kill -TERM 1; while :; do sleep 1; done"
    run = boot(root, {"KRUN_INIT": "/bin/sh"}, "-c", script)
    assert run.code == 42
    assert "got TERM" in run.lines
    assert "msbd-init: stopping (SIGTERM): SIGTERM to every process, SIGKILL after 10000 ms" \
        in run.lines


def test_after_the_grace_what_is_left_is_killed(root: Path) -> None:
    # `wait` returns as soon as a trapped signal arrives (a foreground `sleep 1` would
    # hold the trap back past the 0.2 s grace).
    script = ("trap 'echo ignoring TERM' TERM; kill -TERM 1; "
              "while :; do sleep 1 & wait $!; done")
    run = boot(root, {"KRUN_INIT": "/bin/sh", "MSBD_STOP_GRACE": "0.2"}, "-c", script)
    assert run.code == 137
    assert "ignoring TERM" in run.lines
    assert "msbd-init: grace over: SIGKILL to every process" in run.lines


def test_the_run_ends_with_the_workload_not_its_leftovers(root: Path) -> None:
    run = boot(root, {"KRUN_INIT": "/bin/sh"}, "-c", "sleep 1000 & exit 3", timeout=20)
    assert run.code == 3


@pytest.fixture
def attach_disk(tmp_path: Path, root: Path) -> Iterator[Callable[[bool], str]]:
    """attach(read_only) -> a loop device holding an ext4 image of a second root."""
    disk_root = tmp_path / "disk-root"
    shutil.copytree(root, disk_root, symlinks=True)
    for d in ("dev", "proc", "sys"):  # a read-only disk cannot grow them
        (disk_root / d).mkdir()
    (disk_root / "on-the-disk").write_text("yes\n")
    image = tmp_path / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(disk_root), str(image), "16M"], check=True)
    devices: list[str] = []

    def attach(read_only: bool) -> str:
        flags = ["--read-only"] if read_only else []
        dev = subprocess.run(["losetup", "--find", "--show", *flags, str(image)], check=True,
                             capture_output=True, text=True).stdout.strip()
        devices.append(dev)
        return dev

    yield attach
    for dev in devices:
        subprocess.run(["losetup", "--detach", dev], check=False)


@pytest.mark.parametrize(("read_only", "fstype", "mode"), [
    (False, "ext4", "rw"),
    (False, "auto", "rw"),
    (True, "ext4", "ro"),  # a read-only disk is mounted read-only
])
def test_a_disk_root_is_mounted_and_entered(root: Path, attach_disk: Callable[[bool], str],
                                            read_only: bool, fstype: str, mode: str) -> None:
    device = attach_disk(read_only)
    run = boot(root, {"KRUN_INIT": "/bin/sh", "KRUN_BLOCK_ROOT_DEVICE": device,
                      "KRUN_BLOCK_ROOT_FSTYPE": fstype},
               "-c", "cat /on-the-disk; grep ' / ' /proc/mounts")
    assert run.code == 0, run.output
    assert run.lines[0] == "yes"
    assert re.search(rf"^{re.escape(device)} / ext4 {mode},", run.output, re.M), run.output
