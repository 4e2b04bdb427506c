"""The harness the tests and the benchmarks share: a real msbd daemon process, made
ready by its own READY=1 notification; a busybox root; the libkrun test double.

`bench/common.py` imports this module too (from `tests/`, by path), so a daemon is
started, awaited and stopped one way everywhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from msbd.rpc.client import Client

START_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parent.parent
FAKEKRUN_DIR = REPO / "tests" / "fakekrun"
FAKEKRUN_LIB = FAKEKRUN_DIR / "libfakekrun.so"
BUSYBOX = Path("/bin/busybox")


class DaemonProc:
    """`msbd serve` as a child process; readiness and shutdown are facts, not sleeps."""

    def __init__(self, base: Path, *, libkrun: Path | None = None,
                 settings: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, log_level: str = "debug",
                 cwd: Path | None = None) -> None:
        self.base = base
        self.socket = base / "msbd.sock"
        self.state_dir = base / "state"
        self.libkrun = libkrun
        self.settings = dict(settings or {})
        self.extra_env = dict(env or {})
        self.log_level = log_level
        self.cwd = cwd  # the daemon's, so its workers' (None: ours)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = base / "daemon.stderr"
        self.notify_path = base / "notify.sock"
        self.ready_after = math.nan  # seconds from spawn to READY=1
        self._notify: socket.socket | None = None
        self._spawned = 0.0

    # --- lifecycle ---------------------------------------------------------------

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "msbd.cli", "serve", "--socket", str(self.socket),
                "--state-dir", str(self.state_dir), "--log-level", self.log_level]
        if self.libkrun is not None:
            argv += ["--libkrun", str(self.libkrun)]
        if self.settings:
            config = self.base / "msbd.toml"
            config.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in self.settings.items()))
            argv += ["--config", str(config)]
        return argv

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MSBD_", "NOTIFY_",
                                                                         "LISTEN_"))}
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        env.update(self.extra_env)
        return env

    def start(self, *, wait: bool = True, timeout: float = START_TIMEOUT) -> DaemonProc:
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        self._notify.bind(str(self.notify_path))
        with self.stderr_path.open("ab") as stderr:
            self._spawned = time.monotonic()
            self.proc = subprocess.Popen(self.argv(), env=self.environ(), cwd=self.cwd,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=stderr)
        if wait:
            self.wait_ready(timeout)
        return self

    def notifications(self, timeout: float = START_TIMEOUT) -> Iterator[str]:
        """Each datagram the daemon sends to NOTIFY_SOCKET, as text."""
        assert self._notify is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no notification within {timeout}s; stderr:\n{self.stderr()}")
            self._notify.settimeout(remaining)
            try:
                yield self._notify.recv(4096).decode()
            except TimeoutError:
                continue

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until READY=1 comes; RuntimeError as soon as the daemon exits instead, or when
        `timeout` passes. Waits on the notify socket and the daemon's pidfd together."""
        assert self.proc is not None and self._notify is not None
        deadline = time.monotonic() + timeout
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([self._notify, pidfd], [], [], remaining)
                if self._notify in readable:
                    if "READY=1" in self._notify.recv(4096).decode().split("\n"):
                        self.ready_after = time.monotonic() - self._spawned
                        return
                elif pidfd in readable:
                    break
        finally:
            os.close(pidfd)
        status = "did not get ready" if self.proc.poll() is None else \
            f"exited {self.proc.returncode}"
        raise RuntimeError(f"msbd {status}:\n{self.stderr()}")

    def stop(self, *, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        return code

    def close(self) -> None:
        """Kill the daemon if it still runs and release the notify socket."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    def restart(self) -> DaemonProc:
        self.stop()
        return self.start()

    def children(self) -> set[int]:
        """The daemon's unreaped child processes but its fork server: its workers, idle
        ones of the pool too."""
        return self.all_children() - set(self.zygotes())

    def all_children(self) -> set[int]:
        """The daemon's unreaped child processes, the fork server (zygote) included."""
        assert self.proc is not None
        return set(children_by_parent().get(self.proc.pid, []))

    def wait_children(self, done: Callable[[set[int]], bool], timeout: float = 30.0) -> set[int]:
        """Until `done(children())` holds (a pool refilling in the background); the set."""
        deadline = time.monotonic() + timeout
        while not done(now := self.children()):
            assert time.monotonic() < deadline, f"children never as wanted: {now}"
            time.sleep(0.005)  # another process's children, polled; noqa: sleep-ok
        return now

    def wait_fork_server(self, timeout: float = 30.0) -> int:
        """Until the daemon's fork server is ready (blocked reading its socket, which it
        does only once it said it is ready); its pid."""
        deadline = time.monotonic() + timeout
        while True:
            ready = [pid for pid in self.zygotes() if zygote_waiting(pid)]
            if ready:
                return ready[0]
            assert time.monotonic() < deadline, "no fork server got ready"
            time.sleep(0.005)

    def zygotes(self) -> list[int]:
        """The daemon's fork server processes (`python -m msbd.vm zygote`): one, or none
        while it is restarted or off."""
        return [pid for pid in self.all_children() if is_zygote(pid)]

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- calls ----------------------------------------------------------------------

    def client(self, timeout: float | None = 60.0) -> Client:
        from msbd.rpc.client import Client

        return Client(str(self.socket), timeout=timeout)

    def call(self, method: str, params: Any = None) -> Any:
        with self.client() as c:
            return c.call(method, params)


def wait_pids_gone(pids: set[int], timeout: float = 30.0) -> None:
    """Until every one of `pids` has ended (through pidfds, which work for any process)."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    try:
        for fd in fds:
            assert select.select([fd], [], [], timeout)[0], "a process did not end"
    finally:
        for fd in fds:
            os.close(fd)


def is_zygote(pid: int) -> bool:
    """Whether `pid` is a fork server: `python -m msbd.vm zygote` by its command line
    (which the workers it forks share) and without a watchdog fd (which they all have)."""
    try:
        zygote_line = Path(f"/proc/{pid}/cmdline").read_bytes().endswith(b"\0msbd.vm\0zygote\0")
    except OSError:
        return False
    return zygote_line and not os.path.lexists(f"/proc/{pid}/fd/97")


def zygote_waiting(pid: int) -> bool:
    """Whether `pid` is blocked in recvmsg(3, ...) (x86_64: syscall 47): a fork server
    waiting for a request."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[:2] == ["47", "0x3"]
    except OSError:
        return False


def children_by_parent() -> dict[int, list[int]]:
    """{ppid: [pid, ...]} of every process, from /proc (not every kernel has a
    `children` file)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def waiting_for_spec(pid: int) -> bool:
    """Whether `pid` is blocked in read(96, ...) (x86_64: syscall 0, first argument 0x60):
    a worker done starting and waiting for a spec, as the daemon's idle pool workers do."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[:2] == ["0", "0x60"]
    except OSError:
        return False


def build_fakekrun() -> Path:
    """The libkrun test double (tests/fakekrun), built with the system compiler if needed."""
    subprocess.run(["make", "-s", "-C", str(FAKEKRUN_DIR)], check=True)
    if not FAKEKRUN_LIB.exists():
        raise RuntimeError("make did not build the libkrun test double")
    return FAKEKRUN_LIB


def make_busybox_root(root: Path) -> Path:
    """A tiny root filesystem at `root` (made here): Debian's static busybox and every one
    of its applet links, and the directories a guest expects."""
    if not BUSYBOX.exists():
        raise RuntimeError("busybox-static is not installed: run `make setup` "
                           "(scripts/system-deps.sh)")
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if not link.exists():
            os.symlink("busybox", link)
    for d in ("tmp", "proc", "dev", "etc", "work"):
        (root / d).mkdir(exist_ok=True)
    return root


def python_for(uid: int, gid: int) -> tuple[str, str] | None:
    """(interpreter, PYTHONPATH) with which `uid` can import msbd (the daemon and the
    worker), or None: the test runner's own interpreter may sit where `uid` cannot read."""
    paths = sysconfig.get_paths()
    pythonpath = os.pathsep.join(dict.fromkeys([str(REPO), paths["purelib"], paths["platlib"]]))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for python in (os.path.realpath(sys.executable), f"/usr/bin/python{version}"):
        with contextlib.suppress(OSError):
            probe = subprocess.run([python, "-c", "import msbd.daemon.app, msbd.vm.main"],
                                   env={"PYTHONPATH": pythonpath}, user=uid, group=gid,
                                   extra_groups=[], capture_output=True, check=False)
            if probe.returncode == 0:
                return python, pythonpath
    return None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + "}"
    raise TypeError(value)


def read_line(sock: socket.socket) -> bytes:
    """One line from a connected socket, newline included (less if the server closed)."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def raw_exchange(path: Path, payload: bytes, *, timeout: float = 30.0) -> bytes:
    """Send bytes on a fresh connection, read one reply line (b"" if the server closed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(payload)
        return read_line(s)
