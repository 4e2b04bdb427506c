"""The warm worker pool: workers spawned ahead of launches, each waiting for a spec on fd 96.

How it works
------------
`serve` keeps `worker_pool` idle workers. Each is spawned exactly as a
launch spawns one (`msbd.daemon.spawn`: the same argv, the same worker
environment, the same fd map, a new session), except that fd 96 is a pipe
whose write end the daemon alone holds. An idle worker starts its
interpreter, imports what it needs, checks its fds and blocks reading fd 96.
It holds nothing of any tenant: it runs as the daemon, with the environment
every worker gets, and has no spec yet.

`launch(spec)` takes the oldest idle worker (the likeliest to be ready),
writes the spec into its pipe and closes it (`write_spec`). From there it is
a worker like any other: it decodes the spec (refusing one it cannot, as
always) and takes the identity the spec names. Identity, limits and
environment are therefore decided at hand-off, by the launch, exactly as
without a pool. Once the launch is answered, its caller calls `refill`,
which wakes `serve` to spawn replacements in the background (not before: on
a small machine a starting interpreter would slow the launch it replaces).
With no idle worker (a burst, or `worker_pool` = 0) `launch` spawns one with
its spec in a sealed memfd, as without a pool.

Each idle worker has a keeper task waiting on its pidfd, which ends in one
of three ways: taken (`launch` cancels its scope), dead (the pidfd became
readable: reaped and replaced, never handed out), or idle for
`worker_pool_idle` seconds (killed, reaped and replaced: recycled). A worker
that dies in the pool on its own counts as a failure; repeated failures
delay the refill (back-off), so a broken interpreter is not respawned in a
tight loop. The daemon's shutdown cancels `serve`; each keeper then
SIGKILLs and reaps its worker, so none outlives the daemon. Should the
daemon die instead, an idle worker reads EOF on fd 96, refuses the empty
spec and exits.

What never happens: a worker handed out twice, or after its pidfd said it
ended; a spec written anywhere but into the pipe of the worker taken for it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from msbd.config import Settings
from msbd.daemon import cgroups
from msbd.daemon.forkserver import ForkServer
from msbd.daemon.spawn import Worker, spawn_worker, worker_environ
from msbd.errors import LaunchFailed
from msbd.log import ctx

log = logging.getLogger("msbd.pool")

# How long a SIGKILLed pool worker may take to be gone before it is left unreaped.
_REAP_TIMEOUT = 5.0
# Back-off before refilling after pool workers died on their own, n in a row.
_BACKOFF_FIRST, _BACKOFF_MAX = 0.25, 30.0


@dataclass(eq=False)
class _Idle:
    worker: Worker
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    released: anyio.Event = field(default_factory=anyio.Event)  # the keeper let go
    taken: bool = False


class WorkerPool:
    """Idle workers for `launch`; an unserved pool (or size 0) spawns one per launch."""

    def __init__(self, settings: Settings, *, size: int | None = None,
                 forkserver: ForkServer | None = None) -> None:
        self._size = settings.worker_pool if size is None else size
        self._idle_timeout = settings.worker_pool_idle
        self._write_timeout = settings.start_timeout
        self._argv = [settings.worker_python, "-m", "msbd.vm"]
        self._env = worker_environ(settings.worker_env)
        self._idle: collections.deque[_Idle] = collections.deque()
        self._wanted = anyio.Event()
        self._failures = 0  # pool workers in a row that died before being taken
        self._tg: anyio.abc.TaskGroup | None = None
        self._forkserver = forkserver

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Fill the pool, report ready, keep it full until cancelled; then end every idle
        worker."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                await self._fill()
                task_status.started()
                while True:
                    await self._wanted.wait()
                    self._wanted = anyio.Event()
                    if self._failures > 1:
                        await anyio.sleep(min(_BACKOFF_FIRST * 2 ** (self._failures - 2),
                                              _BACKOFF_MAX))
                    await self._fill()
            finally:
                self._tg = None

    async def _fill(self) -> None:
        while len(self._idle) < self._size:
            try:
                worker = await self._new()
            except LaunchFailed as exc:
                log.warning("cannot fill the worker pool: %s", exc.message)
                self._failures += 1
                self._wanted.set()  # try again after the back-off
                return
            assert self._tg is not None
            idle = _Idle(worker)
            self._idle.append(idle)
            self._tg.start_soon(self._keep, idle)
            log.debug("pool worker started", extra=ctx(pid=worker.pid))

    async def _new(self) -> Worker:
        """A new worker without its spec: forked by the fork server when it is up, else
        spawned. `LaunchFailed` if the OS refuses the spawn."""
        if self._forkserver is not None:
            worker = await self._forkserver.fork()
            if worker is not None:
                return worker
        return spawn_worker(self._argv, self._env, None)

    async def _keep(self, idle: _Idle) -> None:
        """Watch one idle worker until it is taken, dies, or has idled too long."""
        recycled = False
        try:
            with idle.scope, anyio.move_on_after(self._idle_timeout) as timer:
                await anyio.wait_readable(idle.worker.pidfd)
            recycled = timer.cancelled_caught
        finally:
            idle.released.set()
            if not idle.taken:
                with contextlib.suppress(ValueError):
                    self._idle.remove(idle)
                if recycled:
                    log.debug("pool worker idled too long", extra=ctx(pid=idle.worker.pid))
                elif idle.worker.exited():
                    self._failures += 1
                    log.warning("pool worker ended while idle", extra=ctx(pid=idle.worker.pid))
                self._wanted.set()
                with anyio.CancelScope(shield=True):
                    await end_worker(idle.worker)

    def refill(self) -> None:
        """Spawn replacements for the workers taken (soon, from `serve`'s task)."""
        self._wanted.set()

    async def launch(self, spec: bytes, *, cgroup: Path | None = None) -> Worker:
        """A worker that has `spec`: a pooled one, else one spawned for it now.

        With `cgroup`, the worker is moved into that cgroup before it gets its
        spec (a worker spawned now gets a spec pipe for that, as a pooled one
        has), so all it runs after the spec is counted there. `LaunchFailed` if
        the OS refuses a spawn or the move. Callers shield this call: a
        worker taken from the pool is theirs to watch once this returns. The
        pool does not refill until `refill` is called: a caller calls it once
        its launch is answered, so a new interpreter starting never competes
        for the CPU with the worker just handed out.
        """
        while self._idle:
            idle = self._idle.popleft()
            idle.taken = True
            idle.scope.cancel()
            await idle.released.wait()
            worker = idle.worker
            if worker.exited():
                log.warning("pool worker ended while idle: not handed out",
                            extra=ctx(pid=worker.pid))
                self._failures += 1
                await end_worker(worker)
                continue
            await _place(worker, cgroup)
            try:
                await write_spec(worker, spec, timeout=self._write_timeout)
            except OSError as exc:
                log.warning("pool worker did not take its spec: %s", exc,
                            extra=ctx(pid=worker.pid))
                await end_worker(worker)
                continue
            self._failures = 0
            return worker
        if cgroup is None and (self._forkserver is None or not self._forkserver.up):
            return spawn_worker(self._argv, self._env, spec)
        worker = await self._new()
        await _place(worker, cgroup)
        try:
            await write_spec(worker, spec, timeout=self._write_timeout)
        except OSError as exc:
            await end_worker(worker)
            raise LaunchFailed(f"the worker did not take its spec: {exc}") from exc
        return worker


async def _place(worker: Worker, cgroup: Path | None) -> None:
    """Move a worker that has no spec yet into `cgroup`; on failure end it, `LaunchFailed`."""
    if cgroup is None:
        return
    try:
        cgroups.place(cgroup, worker.pid)
    except OSError as exc:
        await end_worker(worker)
        raise LaunchFailed(f"cannot move the worker into its cgroup {cgroup}: "
                           f"{exc.strerror or exc}") from exc


async def write_spec(worker: Worker, spec: bytes, *, timeout: float) -> None:
    """Write `spec` into the worker's spec pipe, then close the pipe (the worker reads to
    EOF). OSError if the worker is gone (EPIPE) or reads nothing within `timeout`."""
    view = memoryview(spec)
    try:
        with anyio.fail_after(timeout):  # TimeoutError is an OSError
            while view:
                try:
                    view = view[os.write(worker.spec_w, view):]
                except BlockingIOError:
                    await anyio.wait_writable(worker.spec_w)
    finally:
        os.close(worker.spec_w)
        worker.spec_w = -1


async def end_worker(worker: Worker) -> None:
    """SIGKILL a worker that was never handed out, reap it and close its fds.

    Through its pidfd: until it is reaped here its pid cannot be anyone else's.
    """
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
    with anyio.move_on_after(_REAP_TIMEOUT):
        await anyio.wait_readable(worker.pidfd)
    _reap(worker)


def _reap(worker: Worker) -> None:
    """Reap the worker if it is gone (never blocks), and close the daemon's ends."""
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PIDFD, worker.pidfd, os.WEXITED | os.WNOHANG)
    worker.close()
