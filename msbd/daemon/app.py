"""The daemon process: startup order, signals, systemd, orderly shutdown.

Startup, in this order: log setup; every inherited fd made close-on-exec; the
fd limit raised; the state dir locked (one daemon per database); the
database opened and reconciled; the control socket taken from systemd or
bound (a stale one replaced, a live one refused); the host checked; the
fork server started (the daemon, a child subreaper since its start, is the
parent of every worker it forks) and the warm worker pool filled; timers,
supervisor and RPC server started; then `READY=1`. Nothing is answered
before reconciliation is done.

On SIGTERM or SIGINT: `STOPPING=1`, stop accepting, let in-flight calls
finish until `shutdown_timeout`, stop every live sandbox (SIGTERM, SIGKILL
after `stop_timeout`) recording `stop_requested`, end the idle pool workers
and the fork server, close the database, exit 0. All along, orphans the
daemon inherits as a subreaper are reaped (`msbd.daemon.reaper`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from msbd import __version__
from msbd.config import Settings
from msbd.daemon import activation, cgroups, gcpolicy, priority, reaper, systemd
from msbd.daemon.api import Api
from msbd.daemon.console import remove_orphans
from msbd.daemon.doctor import HostCheck
from msbd.daemon.events import EventHub
from msbd.daemon.forkserver import ForkServer
from msbd.daemon.pool import WorkerPool
from msbd.daemon.reconcile import reconcile
from msbd.daemon.sockets import bind_control_socket, lock_state_dir
from msbd.daemon.spawn import worker_environ
from msbd.daemon.supervisor import Supervisor
from msbd.daemon.timers import Scheduler
from msbd.db.store import Store, open_store
from msbd.errors import AlreadyRunning, ConfigError, MsbdError
from msbd.log import setup_logging
from msbd.rpc.server import RpcLimits, RpcServer

log = logging.getLogger("msbd.daemon")


def run(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT; the process exit status."""
    setup_logging(settings.log_level)
    # The event loop shares the GIL with the database thread (aiosqlite). At the
    # default 5 ms switch interval, a busy database thread made every loop wake-up
    # (timers included) wait up to 5 ms for the GIL, many times over in a burst of
    # a thousand transitions.
    sys.setswitchinterval(0.0005)
    _close_on_exec_inherited()
    _raise_fd_limit()
    # Before anything is spawned: forked workers must become the daemon's children.
    subreaper = reaper.become_subreaper()
    if not subreaper and settings.worker_fork_server:
        log.warning("the fork server is off: workers are spawned instead")
        settings = msgspec.structs.replace(settings, worker_fork_server=False)
    try:
        anyio.run(_serve, settings, backend="asyncio", backend_options={"use_uvloop": True})
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except MsbdError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _close_on_exec_inherited() -> None:
    """Whatever fds our parent leaked to us must not reach a worker.

    systemd's socket-activation fds are excluded here: `activation.take_listen_socket`
    validates them and sets close-on-exec itself.
    """
    keep = set(range(3))
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        with contextlib.suppress(ValueError):
            keep |= set(range(3, 3 + int(os.environ.get("LISTEN_FDS", "0"))))
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd in keep:
            continue
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)


def _raise_fd_limit() -> None:
    """Each sandbox holds about six fds in the daemon; use the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(settings: Settings) -> None:
    started = time.monotonic()
    state_dir = Path(settings.state_dir)
    lock_fd = lock_state_dir(state_dir)
    notifier = systemd.Notifier.from_env(os.environ)
    watchdog = systemd.watchdog_interval(os.environ, os.getpid())
    inherited = activation.take_listen_socket(os.environ, os.getpid())
    systemd.unset_systemd_environ()
    hub = EventHub()
    try:
        async with open_store(settings.db_path, on_event=hub.publish) as store:
            closed = await reconcile(store)
            orphans = await anyio.to_thread.run_sync(
                remove_orphans, state_dir / "logs", await store.sandbox_ids())
            if orphans:
                log.info("deleted %d console log files that belong to no sandbox", orphans)
            if inherited is not None:
                # systemd's socket, used as is: report where it really is.
                settings = msgspec.structs.replace(settings, socket=inherited.getsockname())
            sock = inherited or bind_control_socket(
                Path(settings.socket), mode=settings.socket_mode, group=settings.socket_group)
            try:
                # After the socket: a daemon that cannot serve says only that, and adopts no
                # cgroup tree; before the pool, whose workers start in the daemon's leaf.
                cg = await _cgroups(settings)
                # After the cgroups (a real-time task in a cgroup can keep a controller
                # from being enabled there), before any worker or thread is started.
                loop_priority = priority.LoopPriority(settings.realtime_loop)
                log.info("event loop: %s", loop_priority.probe())
                # The loop waits on the database thread (and on the GIL it may hold):
                # at normal priority, busy guests would hold the loop up through it.
                log.info("database thread: %s",
                         await store.on_thread(lambda: priority.apply(settings.realtime_loop)))
                await _run_services(settings, store=store, hub=hub, sock=sock,
                                    notifier=notifier, watchdog=watchdog, started=started,
                                    reconciled=closed, cg=cg, loop_priority=loop_priority)
            finally:
                sock.close()
                if inherited is None:
                    _unlink_if_ours(Path(settings.socket), sock)
    finally:
        os.close(lock_fd)
    log.info("msbd stopped")


async def _cgroups(settings: Settings) -> cgroups.Cgroups:
    """The run cgroup tree, set up, with what a previous daemon left in it emptied.

    Before the pool spawns anything: pool workers start in the daemon's leaf.
    """
    cg = cgroups.adopt(cgroups.find(settings.cgroups))
    if not cg.enabled:
        log.info("cgroups off: %s", cg.reason)
        return cg
    left = cgroups.leftovers(cg)
    for path in left:  # no run is live yet: every run cgroup is a previous daemon's
        if not await cgroups.release(path):
            log.warning("cannot empty the leftover cgroup %s", path)
    log.info("cgroups on: runs under %s (%s)%s", cg.runs, " ".join(sorted(cg.controllers))
             or "no controllers", f"; emptied {len(left)} left over" if left else "")
    return cg


def _unlink_if_ours(path: Path, sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


async def _run_services(settings: Settings, *, store: Store, hub: EventHub,
                        sock: socket.socket, notifier: systemd.Notifier,
                        watchdog: float | None, started: float, reconciled: int,
                        cg: cgroups.Cgroups, loop_priority: priority.LoopPriority) -> None:
    host = HostCheck(python=settings.worker_python, libkrun=settings.libkrun,
                     env=worker_environ(settings.worker_env))
    await host.refresh()
    scheduler = Scheduler(on_late=loop_priority.late)
    limits = RpcLimits(
        max_frame_bytes=settings.max_frame_bytes, max_batch=settings.max_batch,
        max_connections=settings.max_connections,
        max_connections_per_user=settings.max_connections_per_user,
        exempt_uids=frozenset({0, os.getuid()}),
        max_inflight_per_connection=settings.max_inflight_per_connection,
        idle_timeout=settings.connection_idle_timeout,
        frame_timeout=settings.partial_frame_timeout,
        send_timeout=settings.connection_send_timeout)
    async with anyio.create_task_group() as tg:
        # No libkrun, no launch: then a pool would only cost memory (`daemon.info` says why).
        can_launch = (settings.libkrun or host.report.libkrun) is not None
        tg.start_soon(reaper.serve)
        forkserver = None
        if can_launch and settings.worker_fork_server:
            forkserver = ForkServer(settings)
            await tg.start(forkserver.serve)  # ended when `tg` is cancelled, below
        pool = WorkerPool(settings, size=None if can_launch else 0, forkserver=forkserver)
        await tg.start(pool.serve)  # its idle workers end when `tg` is cancelled, below
        supervisor = Supervisor(settings=settings, store=store, scheduler=scheduler,
                                task_group=tg, host=host, pool=pool,
                                cgroups=cg, loop_priority=loop_priority)
        await tg.start(loop_priority.serve)
        await tg.start(scheduler.run, supervisor.fire)
        await tg.start(gcpolicy.serve, scheduler.next_deadline)
        api = Api(settings=settings, store=store, supervisor=supervisor, hub=hub, host=host,
                  started=started)
        server = RpcServer(api, limits=limits, immediate=api.immediate)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await tg.start(server.serve, sock)
            log.info("msbd %s serving %s (pid %d, %d runs reconciled)", __version__,
                     settings.socket, os.getpid(), reconciled)
            notifier.ready(_status(supervisor))
            if watchdog is not None:
                await tg.start(systemd.serve_watchdog, notifier, watchdog)
            if notifier.enabled:
                tg.start_soon(_report_status, notifier, supervisor)
            tg.start_soon(_prune_events, store, settings.events_keep)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                break
        notifier.stopping("stopping")
        with anyio.CancelScope(shield=True):
            # No new connections; end the sandboxes (so calls waiting on them get
            # their answer); then give the calls still running their deadline.
            server.close_listener()
            await supervisor.shutdown(grace=settings.stop_timeout)
            await server.drain(settings.shutdown_timeout)
        tg.cancel_scope.cancel()


async def _prune_events(store: Store, keep: int) -> None:
    """Keep the events log to its newest `keep` entries: at startup, then hourly."""
    while True:
        removed = await store.prune_events(keep=keep)
        if removed:
            log.info("pruned %d old events (keeping %d)", removed, keep)
        await anyio.sleep(3600)


def _status(supervisor: Supervisor) -> str:
    used = supervisor.usage()
    return f"{used.sandboxes} live sandboxes, {used.vcpus} vcpus, {used.memory_mib} MiB"


async def _report_status(notifier: systemd.Notifier, supervisor: Supervisor) -> None:
    """`STATUS=` with live counts when they change, at most once a second."""
    last = ""
    while True:
        text = _status(supervisor)
        if text != last:
            notifier.status(text)
            last = text
            await anyio.sleep(1.0)  # coalesce bursts (50 launches are one update)
        else:
            await supervisor.changed()
