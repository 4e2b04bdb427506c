"""The daemon's side of the fork server: one zygote, asked for a new worker per request.

Why: a spawned worker pays an interpreter start and its imports before it
can take a spec (tens of ms of CPU, and glibc's `posix_spawn` blocks the
event loop until the child has exec'd). The zygote (`python -m msbd.vm
zygote`, `msbd.vm.zygote`) has paid them once; a worker forked from it costs
a fork. `fork` returns a `Worker` no different from `spawn_worker(..., None)`'s:
the same fd map, a new session, the same environment and signal state, a
spec pipe whose write end only the daemon holds, and the daemon as its parent
(which needs the daemon to be a child subreaper: `msbd.daemon.reaper`).

The zygote is spawned like a worker (`spawn_placed`: posix_spawn, a new
session, default signal dispositions, the worker environment) with /dev/null
on 0, the daemon's stderr on 1 and 2, and its end of a SOCK_SEQPACKET
socketpair on `contract.FORK_SERVER_FD`. It is used once it said it is
ready (its imports take a fraction of a second; a worker wanted before
then, as the pool's first ones at the daemon's start, is spawned: nothing
waits for the zygote, and one that never gets ready delays nothing).
Requests go one at a time (a lock),
each a datagram carrying the child's ends of one worker's pipes; the answer
names the worker's pid, by then the daemon's child. It never gets a spec:
specs go into the worker's own pipe afterwards (`msbd.daemon.pool`), so the
zygote holds nothing of any tenant.

`serve` keeps a zygote running: when it dies, it is reaped, and a new one
is spawned after a back-off that grows while zygotes keep dying young.
While there is none, or a request fails, `fork` returns None and the caller
spawns the worker with `posix_spawn` instead: a launch is never lost to the
fork server. Cancelling `serve` (the daemon's shutdown) closes the socket,
which ends the zygote (EOF), and reaps it; should the daemon die instead,
the zygote reads EOF all the same.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import signal
import socket

import anyio
import anyio.abc

from msbd.config import Settings
from msbd.contract import FORK_READY, FORK_REQUEST, FORK_SERVER_FD, parse_fork_reply
from msbd.daemon import reaper
from msbd.daemon.spawn import Worker, WorkerEnds, spawn_placed, worker_environ
from msbd.log import ctx

log = logging.getLogger("msbd.forkserver")

_STOP_TIMEOUT = 5.0  # for the zygote to end on EOF before it is SIGKILLed
_BACKOFF_FIRST, _BACKOFF_MAX = 0.25, 30.0
_YOUNG = 10.0  # a zygote that dies younger than this (s) counts as a failure


class _Zygote:
    def __init__(self, pid: int, pidfd: int, sock: socket.socket) -> None:
        self.pid, self.pidfd, self.sock = pid, pidfd, sock
        self.started = anyio.current_time()
        self.ready = False  # it said FORK_READY: its imports are done

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)


class ForkServer:
    """A zygote that forks workers; `fork` is None-or-`Worker`, never an exception."""

    def __init__(self, settings: Settings) -> None:
        self._argv = [settings.worker_python, "-m", "msbd.vm", "zygote"]
        self._env = worker_environ(settings.worker_env)
        self._timeout = settings.start_timeout
        self._zygote: _Zygote | None = None
        self._lock = anyio.Lock()
        self._failures = 0
        self._readied = anyio.Event()  # set (and replaced) when a zygote becomes ready

    @property
    def pid(self) -> int | None:
        """The running zygote's pid (None: none now), ready or not."""
        return None if self._zygote is None else self._zygote.pid

    @property
    def up(self) -> bool:
        """Whether a zygote is ready for requests (else `fork` says None at once)."""
        return self._zygote is not None and self._zygote.ready

    async def wait_ready(self) -> None:
        """Until a zygote is ready (for tests and benchmarks: nothing else waits for it)."""
        while not self.up:
            await self._readied.wait()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Keep a zygote running until cancelled; then end it."""
        started = False
        try:
            while True:
                zygote = self._start()
                if not started:
                    task_status.started()
                    started = True
                if zygote is not None:
                    await self._until_ready(zygote)
                    await anyio.wait_readable(zygote.pidfd)
                    async with self._lock:  # a request in flight reads its EOF first
                        self._lost(zygote)
                if self._failures:
                    await anyio.sleep(min(_BACKOFF_FIRST * 2 ** (self._failures - 1),
                                          _BACKOFF_MAX))
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop()

    def _start(self) -> _Zygote | None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                err = 2 if _is_open(2) else null  # the daemon's stderr: its log
                pid = spawn_placed(self._argv, self._env,
                                   {0: null, 1: err, 2: err, FORK_SERVER_FD: theirs.fileno()})
            finally:
                os.close(null)
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            ours.close()
            log.warning("cannot start the fork server: %s (workers are spawned meanwhile)",
                        exc.strerror or exc)
            self._failures += 1
            return None
        finally:
            theirs.close()
        ours.setblocking(False)
        reaper.claim(pid)
        self._zygote = _Zygote(pid, pidfd, ours)
        log.debug("fork server started", extra=ctx(pid=pid))
        return self._zygote

    async def _until_ready(self, zygote: _Zygote) -> None:
        """Read the zygote's FORK_READY; return early if it ends or says anything else
        (then it is killed). Launches meanwhile spawn their workers: none waits."""
        try:
            said = await _recv(zygote.sock, 64)
        except OSError:
            said = b""
        if said == FORK_READY:
            zygote.ready = True
            self._readied.set()
            self._readied = anyio.Event()
            log.debug("fork server ready", extra=ctx(pid=zygote.pid))
        elif said:
            log.warning("the fork server said %r instead of being ready; ending it", said[:64],
                        extra=ctx(pid=zygote.pid))
            zygote.kill()

    def _lost(self, zygote: _Zygote) -> None:
        """The zygote ended: reap it, count a young death as a failure."""
        info = _reap(zygote)
        young = anyio.current_time() - zygote.started < _YOUNG
        self._failures = self._failures + 1 if young else 0
        log.warning("the fork server ended (%s); %s", info,
                    "restarting it" if not self._failures else "restarting it after a pause",
                    extra=ctx(pid=zygote.pid))
        if self._zygote is zygote:
            self._zygote = None

    async def _stop(self) -> None:
        async with self._lock:
            zygote, self._zygote = self._zygote, None
        if zygote is None:
            return
        zygote.sock.close()  # EOF: the zygote exits
        with anyio.move_on_after(_STOP_TIMEOUT) as timer:
            await anyio.wait_readable(zygote.pidfd)
        if timer.cancelled_caught:
            zygote.kill()
            with anyio.move_on_after(_STOP_TIMEOUT):
                await anyio.wait_readable(zygote.pidfd)
        _reap(zygote)

    async def fork(self) -> Worker | None:
        """A new worker waiting for its spec on a pipe (`Worker.spec_w`), forked by the
        zygote; None when no zygote is ready or it failed (then spawn one instead)."""
        if not self.up:
            return None
        try:
            ends = WorkerEnds.open(None)
        except OSError:
            return None  # let the spawn say why
        worker = None
        try:
            # Shielded: an answer left unread would be taken for the next request's.
            with anyio.CancelScope(shield=True):
                worker = await self._request(ends)
        finally:
            ends.close_child()
        return worker

    async def _request(self, ends: WorkerEnds) -> Worker | None:
        async with self._lock:
            zygote = self._zygote
            if zygote is None or not zygote.ready:
                ends.close_parent()
                return None
            with reaper.forking():  # until the worker is claimed
                pid = await self._ask(zygote, ends.child())
                worker = None if pid is None else _adopt(ends, pid)
            if worker is None:
                ends.close_parent()
            return worker

    async def _ask(self, zygote: _Zygote, fds: tuple[int, ...]) -> int | None:
        """Send one request and read its answer: the new worker's pid, or None (logged; a
        zygote that failed a request is killed, and `serve` starts another)."""
        try:
            with anyio.fail_after(self._timeout):
                while True:
                    try:
                        zygote.sock.sendmsg([FORK_REQUEST], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                              array.array("i", fds))])
                        break
                    except BlockingIOError:
                        await anyio.wait_writable(zygote.sock)
                answer = await _recv(zygote.sock, 256)
        except (OSError, TimeoutError) as exc:  # EPIPE/ECONNRESET: the zygote died
            log.warning("the fork server did not answer: %s", exc, extra=ctx(pid=zygote.pid))
            zygote.kill()
            return None
        reply = parse_fork_reply(answer) if answer else "it ended"
        if isinstance(reply, int):
            return reply
        log.warning("the fork server could not fork a worker: %s; ending it", reply,
                    extra=ctx(pid=zygote.pid))
        zygote.kill()
        return None


async def _recv(sock: socket.socket, size: int) -> bytes:
    """One `recv` on the non-blocking socket, waiting until it is readable."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            await anyio.wait_readable(sock)


def _adopt(ends: WorkerEnds, pid: int) -> Worker | None:
    """The `Worker` of a forked `pid`, after checking it is the daemon's child; else None."""
    try:
        worker = ends.adopt(pid)
    except OSError as exc:
        log.warning("no pidfd for the forked worker: %s", exc.strerror, extra=ctx(pid=pid))
        return None
    if _parent(pid) == os.getpid():
        return worker
    # Not ours to reap (no subreaper?): it would be unobservable. End it, and say so.
    log.error("a forked worker is not the daemon's child: the fork server cannot be used",
              extra=ctx(pid=pid))
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
    os.close(worker.pidfd)
    worker.pidfd = -1
    reaper.release(pid)
    return None


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _reap(zygote: _Zygote) -> str:
    """Reap the zygote if it has ended (never blocks); how it ended, in words."""
    how = "still running"
    with contextlib.suppress(ChildProcessError):
        info = os.waitid(os.P_PIDFD, zygote.pidfd, os.WEXITED | os.WNOHANG)
        if info is not None:
            how = (f"exit status {info.si_status}" if info.si_code == os.CLD_EXITED
                   else f"signal {info.si_status}")
    if how != "still running":
        reaper.release(zygote.pid)
    os.close(zygote.pidfd)
    zygote.pidfd = -1
    zygote.sock.close()
    return how


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
