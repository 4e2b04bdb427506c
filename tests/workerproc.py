"""Spawn `python -m msbd.vm` with an exact fd map, as the daemon does, and watch it (tests only).

The worker gets: 0 = /dev/null, 1 and 2 = the console pipe, 96 = the spec
(a sealed memfd by default), 97 = the watchdog pipe's read end, 98 = the
status pipe's write end. Any of them can be replaced or left out to break
one check. It is started with posix_spawn file actions (dup2 into place,
which also clears close-on-exec), no preexec function, and setsid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from msbd.contract import SPEC_FD, STATUS_FD, WATCHDOG_FD
from msbd.model import WorkerSpec

REPO = Path(__file__).resolve().parents[1]
# Where a caller's source fds are moved first, so no dup2 clobbers another source.
_SOURCE_FLOOR = 200
DEFAULT = object()  # in `fds=`: the helper's own pipe/memfd for that target


def spec_bytes(**fields: Any) -> bytes:
    """A WorkerSpec as the daemon would write it (checked by msgspec on the way)."""
    spec = msgspec.convert(fields, type=WorkerSpec)
    spec.check()
    return msgspec.json.encode(spec)


def memfd_with(data: bytes) -> int:
    """A sealed memfd holding `data`, its offset left at the end (as after a write)."""
    fd = os.memfd_create("msbd-spec", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW
                | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


def pipe_with(data: bytes) -> int:
    """The read end of a pipe holding `data`, its write end closed."""
    r, w = os.pipe()
    with os.fdopen(w, "wb") as f:
        f.write(data)
    return r


class LineReader:
    """Lines from a pipe with a deadline per read; no sleeps."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = b""
        self.eof = False

    def readline(self, timeout: float) -> str | None:
        """The next line without its newline; None at EOF; TimeoutError past the deadline."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if self.eof:
                return None
            self._fill(deadline)
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def read_all(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not self.eof:
            self._fill(deadline)
        data, self._buf = self._buf, b""
        return data.decode(errors="replace")

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.fd], [], [], left)[0]:
            raise TimeoutError(f"nothing on fd {self.fd} in time")
        chunk = os.read(self.fd, 65536)
        if chunk:
            self._buf += chunk
        else:
            self.eof = True


class Worker:
    """A running worker: its pid, the pipes the daemon would hold, and the test double's log."""

    def __init__(self, pid: int, *, status: int | None, console: int | None,
                 watchdog: int | None, log: Path | None) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.status = LineReader(status) if status is not None else None
        self.console = LineReader(console) if console is not None else None
        self.watchdog_w = watchdog
        self.log = log
        self.returncode: int | None = None
        self.seen: list[str] = []  # console lines `wait_output` read

    def wait(self, timeout: float = 20.0) -> int:
        """The exit status as a shell shows it (128+n for signal n); a hang guard only."""
        if self.returncode is None:
            if not select.select([self.pidfd], [], [], timeout)[0]:
                self.kill()
                raise TimeoutError(f"worker {self.pid} still running after {timeout} s")
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            self.returncode = 128 - code if code < 0 else code
        return self.returncode

    def status_line(self, timeout: float = 20.0, *, skip_heartbeats: bool = True) -> str | None:
        assert self.status is not None
        while True:
            line = self.status.readline(timeout)
            if not (skip_heartbeats and line == "heartbeat"):
                return line

    def status_lines(self, timeout: float = 20.0) -> list[str]:
        """Every status line up to EOF (the worker and its guest have exited)."""
        assert self.status is not None
        return [ln for ln in self.status.read_all(timeout).splitlines() if ln != "heartbeat"]

    def output(self, timeout: float = 20.0) -> str:
        """Everything on the console pipe (stdout and stderr) up to EOF."""
        assert self.console is not None
        return "".join(self.seen) + self.console.read_all(timeout)

    def wait_output(self, text: str, timeout: float = 20.0) -> str:
        """Console lines until one holds `text` (they still count for `output`)."""
        assert self.console is not None
        deadline = time.monotonic() + timeout
        while True:
            line = self.console.readline(max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"the console ended without {text!r}: {self.seen}")
            self.seen.append(line + "\n")
            if text in line:
                return line

    def calls(self) -> list[dict[str, Any]]:
        """The test double's records, one dict per libkrun call (or child/exit record)."""
        if self.log is None or not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def calls_named(self, *names: str) -> list[dict[str, Any]]:
        return [c for c in self.calls() if c["fn"] in names]

    def control_socket(self) -> Path:
        """Where the worker's control channel listens (the test double recorded the
        `krun_add_vsock_port2` call before `entering`)."""
        [call] = self.calls_named("krun_add_vsock_port2")
        return Path(call["filepath"])

    def close_watchdog(self) -> None:
        if self.watchdog_w is not None:
            os.close(self.watchdog_w)
            self.watchdog_w = None

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        self.kill()
        if self.returncode is None:
            self.wait(10)
        for reader in (self.status, self.console):
            if reader is not None:
                os.close(reader.fd)
        self.close_watchdog()
        os.close(self.pidfd)


def fake_spec(fakekrun: Path, root: Path, **fields: Any) -> bytes:
    """A spec for the test double: `root` as rootfs, `/bin/true`, quiet heartbeats.

    A field given as None is left out (its default applies).
    """
    base: dict[str, Any] = {"name": "t", "rootfs": str(root), "exec": "/bin/true",
                            "libkrun": str(fakekrun), "heartbeat_interval": 60.0}
    base.update(fields)
    return spec_bytes(**{k: v for k, v in base.items() if v is not None})


class Workers:
    """Workers started by one test; each is killed and reaped at the end."""

    def __init__(self) -> None:
        self._started: list[Worker] = []

    def start(self, spec: bytes | None, **kw: Any) -> Worker:
        w = spawn(spec, **kw)
        self._started.append(w)
        return w

    def close(self) -> None:
        for w in self._started:
            w.close()


def spawn(spec: bytes | None, *, log: Path | None = None, args: Sequence[str] = (),
          fds: Mapping[int, object] | None = None, env: Mapping[str, str] | None = None,
          prelude: str | None = None, shared_status_console: bool = False) -> Worker:
    """Start a worker. `fds` overrides targets: an fd number, None (leave it closed),
    or DEFAULT. `prelude` is Python run in the worker process before msbd.vm
    (to make a state exec cannot pass on, such as close-on-exec on fd 97).
    """
    wanted: dict[int, object] = {SPEC_FD: DEFAULT, WATCHDOG_FD: DEFAULT, STATUS_FD: DEFAULT}
    wanted.update(fds or {})
    mine: list[int] = []  # fds this helper opened and closes after the spawn
    kept: dict[str, int | None] = {"status": None, "console": None, "watchdog": None}

    console_r, console_w = os.pipe()
    mine.append(console_w)
    kept["console"] = console_r
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    mine.append(devnull)
    sources: dict[int, int] = {0: devnull, 1: console_w, 2: console_w}

    for target, how in wanted.items():
        if how is None:
            continue
        if how is not DEFAULT:
            assert isinstance(how, int)
            sources[target] = how
            continue
        if target == SPEC_FD:
            fd = memfd_with(spec if spec is not None else b"")
            mine.append(fd)
        elif target == WATCHDOG_FD:
            fd, kept["watchdog"] = os.pipe()
            mine.append(fd)
        elif target == STATUS_FD:
            if shared_status_console:
                fd = console_w
            else:
                kept["status"], fd = os.pipe()
                mine.append(fd)
        sources[target] = fd

    moved = {t: fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, _SOURCE_FLOOR)
             for t, src in sources.items()}
    actions = [(os.POSIX_SPAWN_DUP2, src, target) for target, src in sorted(moved.items())]
    worker_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}
    if log is not None:
        worker_env["FAKEKRUN_LOG"] = str(log)
    worker_env.update(env or {})
    argv = [sys.executable]
    if prelude is None:
        argv += ["-m", "msbd.vm", *args]
    else:
        argv += ["-c", f"{prelude}\nimport runpy\nrunpy.run_module('msbd.vm', "
                       "run_name='__main__', alter_sys=True)", *args]
    try:
        pid = os.posix_spawn(sys.executable, argv, worker_env, file_actions=actions, setsid=True)
    finally:
        for fd in {*moved.values(), *mine}:
            os.close(fd)
    if shared_status_console:
        kept["status"] = None
    return Worker(pid, status=kept["status"], console=kept["console"],
                  watchdog=kept["watchdog"], log=log)
