"""Start one worker process with exactly the fd map of `msbd.contract`, and nothing else.

    0  /dev/null                        96  launch spec (sealed memfd, or a pipe)
    1  console pipe, write end          97  watchdog pipe, read end (EOF: daemon gone)
    2  console pipe, write end          98  status pipe, write end

`os.posix_spawn` runs no Python in the child. Every fd the daemon opens is
close-on-exec (PEP 446 and our own flags), so only the fds placed by the file
actions cross into the worker; the worker closes anything else it finds and
says so. The child gets a new session (its own process group, so a forced
stop can kill the worker and anything it forked) and an environment built
from nothing: no `NOTIFY_SOCKET`, no `LISTEN_*`, nothing of the daemon's.

A worker spawned without its spec (for the warm pool, `msbd.daemon.pool`)
gets the read end of a pipe on fd 96; the daemon alone holds the write end
(`Worker.spec_w`, close-on-exec, so no other child inherits it), writes the
spec there at hand-off and closes it. The worker checks its fds and then
blocks reading fd 96 until that EOF.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from msbd.contract import SPEC_FD, STATUS_FD, WATCHDOG_FD
from msbd.daemon import reaper
from msbd.errors import LaunchFailed

# Sources are first moved above every target, so no dup2 can clobber another
# source still waiting to be placed.
_SAFE_FD_FLOOR = 128
# Signals the child starts with at their default disposition: Python ignores
# SIGPIPE, and an ignored disposition would survive exec into the worker.
_DEFAULT_SIGNALS = frozenset({signal.SIGPIPE, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                              signal.SIGCHLD, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2})
# The only variables the worker process itself needs; the guest's environment
# travels in the spec, never here.
_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "TZ")


@dataclass(slots=True)
class Worker:
    """The daemon's ends of a freshly spawned worker's pipes (all non-blocking, cloexec).

    A worker is claimed (`msbd.daemon.reaper`: never reaped as an orphan) from
    its creation until `close`, which the daemon calls once it reaped it.
    """

    pid: int
    pidfd: int
    status_r: int
    console_r: int
    watchdog_w: int
    spec_w: int = -1  # the spec pipe's write end until the spec is written; -1 after

    def __post_init__(self) -> None:
        reaper.claim(self.pid)

    def close(self) -> None:
        if self.pidfd < 0:
            return  # closed already: its pid may be another worker's by now
        for fd in (self.pidfd, self.status_r, self.console_r, self.watchdog_w, self.spec_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pidfd = self.status_r = self.console_r = self.watchdog_w = self.spec_w = -1
        reaper.release(self.pid)

    def exited(self) -> bool:
        """Whether the process has ended (its pidfd is readable); it may be unreaped."""
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))


def worker_environ(extra: Mapping[str, str], base: Mapping[str, str] | None = None
                   ) -> dict[str, str]:
    """The worker's environment: a few harmless host variables plus the configured extras."""
    source = os.environ if base is None else base
    env = {k: source[k] for k in _PASSTHROUGH if k in source}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(extra)
    return env


def sealed_memfd(data: bytes, name: str = "msbd-spec") -> int:
    """A read-only, sealed in-memory file holding `data`, positioned at 0."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _high(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_FLOOR)


@dataclass(slots=True)
class WorkerEnds:
    """Both ends of a new worker's pipes, before the worker exists (all close-on-exec).

    The child's ends (`child`, in the order of `contract.FORK_FDS`) go to the
    worker, by posix_spawn here or through the fork server
    (`msbd.daemon.forkserver`), and are closed in the daemon right after;
    the daemon's become the `Worker`.
    """

    spec: int  # the child's: read end of the spec pipe, or a sealed memfd
    status_w: int
    console_w: int
    watchdog_r: int
    status_r: int  # the daemon's
    console_r: int
    watchdog_w: int
    spec_w: int  # -1 with a memfd

    @classmethod
    def open(cls, spec: bytes | None) -> WorkerEnds:
        """New pipes (and with `spec`, a memfd holding it; else a spec pipe); OSError."""
        made: list[int] = []
        try:
            spec_w = -1
            if spec is None:
                spec_fd, spec_w = os.pipe2(os.O_CLOEXEC)
                made += (spec_fd, spec_w)
            else:
                spec_fd = sealed_memfd(spec)
                made.append(spec_fd)
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            made += (status_r, status_w)
            console_r, console_w = os.pipe2(os.O_CLOEXEC)
            made += (console_r, console_w)
            watchdog_r, watchdog_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            _close_all(made)
            raise
        return cls(spec=spec_fd, status_w=status_w, console_w=console_w,
                   watchdog_r=watchdog_r, status_r=status_r, console_r=console_r,
                   watchdog_w=watchdog_w, spec_w=spec_w)

    def child(self) -> tuple[int, int, int, int]:
        """The child's ends, in the order of `contract.FORK_FDS`."""
        return (self.spec, self.status_w, self.console_w, self.watchdog_r)

    def close_child(self) -> None:
        _close_all(self.child())

    def close_parent(self) -> None:
        _close_all((self.status_r, self.console_r, self.watchdog_w, self.spec_w))

    def adopt(self, pid: int) -> Worker:
        """The `Worker` for `pid`, now started with the child's ends (the caller closes
        them). OSError if it has no pidfd: then it is SIGKILLed and reaped first."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            # Unobservable without a pidfd: end it now rather than lose track of it.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise
        for fd in (self.status_r, self.console_r, self.watchdog_w, self.spec_w):
            if fd >= 0:
                os.set_blocking(fd, False)
        return Worker(pid=pid, pidfd=pidfd, status_r=self.status_r, console_r=self.console_r,
                      watchdog_w=self.watchdog_w, spec_w=self.spec_w)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def spawn_placed(argv: list[str], env: Mapping[str, str], placed: Mapping[int, int]) -> int:
    """posix_spawn `argv` with `placed` ({target fd: source fd}) as its only fds, in a new
    session, default signal dispositions and an empty mask; its pid. OSError."""
    high = {target: _high(fd) for target, fd in placed.items()}
    try:
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in high.items()]
        return os.posix_spawn(argv[0], argv, dict(env), file_actions=actions, setsid=True,
                              setsigdef=_DEFAULT_SIGNALS, setsigmask=())
    finally:
        _close_all(high.values())


def spawn_worker(argv: list[str], env: Mapping[str, str], spec: bytes | None) -> Worker:
    """posix_spawn `argv` with the worker fd map; raise `LaunchFailed` if the OS refuses.

    `spec` None: fd 96 is a pipe, and `Worker.spec_w` its write end (see `msbd.daemon.pool`).
    """
    try:
        ends = WorkerEnds.open(spec)
    except OSError as exc:
        raise LaunchFailed(f"cannot start the worker {argv[0]}: {exc.strerror}") from exc
    try:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid = spawn_placed(argv, env, {0: null, 1: ends.console_w, 2: ends.console_w,
                                           SPEC_FD: ends.spec, WATCHDOG_FD: ends.watchdog_r,
                                           STATUS_FD: ends.status_w})
        finally:
            os.close(null)
        return ends.adopt(pid)
    except OSError as exc:
        ends.close_parent()
        raise LaunchFailed(f"cannot start the worker {argv[0]}: {exc.strerror}") from exc
    finally:
        ends.close_child()
