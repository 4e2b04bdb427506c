"""The method handlers: what each JSON-RPC method does, with the caller's identity.

The server has already decoded and checked the params against the method
table (`msbd.rpc.methods`); a handler gets typed params and the caller, and
returns a result struct or raises an `MsbdError`, which the server turns into
the error reply. Who may do what is `msbd.daemon.access`: every handler that
names a sandbox looks it up through `_visible`, so a sandbox the caller does
not own is not found, and every launch checks the spec's host paths as the
caller first.
"""

from __future__ import annotations

import codecs
import os
import signal as signal_mod
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from msbd import __version__
from msbd.config import Settings
from msbd.daemon import states
from msbd.daemon.access import (
    Caller,
    check_identity,
    check_spec_paths,
    daemon_identity,
    may_see,
)
from msbd.daemon.console import log_path, remove_log
from msbd.daemon.doctor import HostCheck
from msbd.daemon.events import EventHub, Lagged, stream_events
from msbd.daemon.supervisor import Supervisor, vm_identity
from msbd.db.store import Store
from msbd.errors import Conflict, InvalidParams, LimitReached, NotFound
from msbd.model import Event, LaunchSpec, SandboxInfo, State
from msbd.rpc.methods import (
    DaemonInfo,
    EventParams,
    KillSandboxParams,
    LaggedParams,
    LimitsInfo,
    ListSandboxParams,
    LogsResult,
    LogsSandboxParams,
    MetricsResult,
    NameParams,
    NoParams,
    RemoveSandboxParams,
    RestartSandboxParams,
    SandboxList,
    StartSandboxParams,
    StopSandboxParams,
    SubscribeEventsParams,
    Subscription,
    TimerInfo,
    WaitSandboxParams,
)
from msbd.rpc.openrpc import openrpc_document
from msbd.rpc.server import CallContext

Handler = Callable[[Caller, Any, CallContext], Awaitable[Any]]


def parse_signal(value: str | int) -> int:
    if isinstance(value, int):
        return value
    name = value if value.startswith("SIG") else f"SIG{value}"
    try:
        return int(signal_mod.Signals[name])
    except KeyError:
        raise InvalidParams(f"`signal`: unknown signal {value!r}", field="signal") from None


class Api:
    def __init__(self, *, settings: Settings, store: Store, supervisor: Supervisor,
                 hub: EventHub, host: HostCheck, started: float) -> None:
        self._settings = settings
        self._store = store
        self._sup = supervisor
        self._hub = hub
        self._host = host
        self._started = started
        self._daemon = daemon_identity()
        self._daemon_uid = self._daemon.uid
        self._log_dir = supervisor.log_dir
        self._discover: dict[str, Any] | None = None
        self._table: dict[str, Handler] = {
            "daemon.ping": self.ping,
            "daemon.info": self.info,
            "sandbox.create": self.create,
            "sandbox.run": self.run,
            "sandbox.start": self.start,
            "sandbox.stop": self.stop,
            "sandbox.kill": self.kill,
            "sandbox.restart": self.restart,
            "sandbox.remove": self.remove,
            "sandbox.get": self.get,
            "sandbox.list": self.list,
            "sandbox.wait": self.wait,
            "sandbox.touch": self.touch,
            "sandbox.logs": self.logs,
            "sandbox.metrics": self.metrics,
            "events.subscribe": self.subscribe,
            "rpc.discover": self.discover,
        }

    @property
    def methods(self) -> frozenset[str]:
        return frozenset(self._table)

    async def __call__(self, ctx: CallContext, method: str, params: Any) -> Any:
        conn = ctx.connection
        caller = Caller(uid=conn.uid, gid=conn.gid, pid=conn.pid)
        check_identity(caller, method)
        return await self._table[method](caller, params, ctx)

    # --- helpers ------------------------------------------------------------------

    async def _visible(self, caller: Caller, name: str) -> SandboxInfo:
        info = await self._store.get_sandbox(name)
        if not may_see(caller, info, self._daemon_uid):
            raise NotFound(name)
        return info

    async def _check_paths(self, spec: LaunchSpec, caller: Caller) -> None:
        await anyio.to_thread.run_sync(
            lambda: check_spec_paths(spec, caller, daemon=self._daemon))

    async def _check_launch(self, info: SandboxInfo, caller: Caller) -> None:
        """Paths as the caller, and as the identity the VM will run as, if another one
        (the owner's uid, gid and groups: exactly what the worker will be given)."""
        await self._check_paths(info.spec, caller)
        uid, gid, groups = vm_identity(info.owner_uid)
        if uid is not None and gid is not None and uid != caller.uid:
            await self._check_paths(info.spec, Caller(
                uid=uid, gid=gid, groups=frozenset(groups or ())))

    def _owner_filter(self, caller: Caller) -> int | None:
        """None (everything) for an admin, else the caller's uid."""
        return None if caller.is_admin(self._daemon_uid) else caller.uid

    async def _counts(self, caller: Caller) -> dict[str, int]:
        owner = self._owner_filter(caller)
        if owner is None:
            return await self._store.counts_by_state()
        counts = dict.fromkeys((s.value for s in State), 0)
        for info in await self._store.list_sandboxes(owner_uid=owner):
            counts[info.state.value] += 1
        return counts

    # --- daemon -------------------------------------------------------------------

    async def ping(self, caller: Caller, params: NoParams, ctx: CallContext) -> str:
        return "pong"

    async def info(self, caller: Caller, params: NoParams, ctx: CallContext) -> DaemonInfo:
        report = await self._host.refresh(max_age=30.0)
        s = self._settings
        libkrun = self._sup.libkrun_path()
        late = self._sup.timer_lateness()
        return DaemonInfo(
            version=__version__, pid=os.getpid(), uid=self._daemon_uid,
            uptime=time.monotonic() - self._started, socket=s.socket, state_dir=s.state_dir,
            libkrun=libkrun, libkrun_problem=None if libkrun else self._sup.missing_libkrun(),
            checks=report.checks, counts=await self._counts(caller),
            limits=LimitsInfo(max_sandboxes=s.max_sandboxes, max_vcpus=s.max_vcpus,
                              max_memory_mib=s.max_memory_mib),
            timers=TimerInfo(fired=late.fired, late_p50=late.p50, late_p99=late.p99,
                             late_max=late.max))

    async def discover(self, caller: Caller, params: NoParams, ctx: CallContext
                       ) -> dict[str, Any]:
        if self._discover is None:
            self._discover = openrpc_document(__version__)
        return self._discover

    # --- records ------------------------------------------------------------------

    async def create(self, caller: Caller, spec: LaunchSpec, ctx: CallContext) -> SandboxInfo:
        await self._check_paths(spec, caller)
        info, _ = await self._store.create_sandbox(spec, owner_uid=caller.uid, now=time.time())
        return info

    async def get(self, caller: Caller, params: NameParams, ctx: CallContext) -> SandboxInfo:
        return await self._visible(caller, params.name)

    async def list(self, caller: Caller, params: ListSandboxParams, ctx: CallContext
                   ) -> SandboxList:
        owner = self._owner_filter(caller)
        items = await self._store.list_sandboxes(state=params.state, label=params.label_pair(),
                                                 owner_uid=owner)
        return SandboxList(sandboxes=items)

    async def remove(self, caller: Caller, params: RemoveSandboxParams, ctx: CallContext
                     ) -> SandboxInfo:
        name = params.name
        info = await self._visible(caller, name)
        if self._sup.busy(name) or info.state not in states.removable:
            if not params.force:
                raise Conflict(f"sandbox {name!r} is {info.state}; stop it first or use force",
                               data={"sandbox": name, "state": info.state})
            await self._sup.stop(name, timeout=self._settings.stop_timeout,
                                 detail="removed with force")
        removed, _ = await self._store.remove_sandbox(name, now=time.time(),
                                                      expect=states.removable)
        await anyio.to_thread.run_sync(remove_log, log_path(self._log_dir, name))
        return removed

    # --- runs ---------------------------------------------------------------------

    async def run(self, caller: Caller, spec: LaunchSpec, ctx: CallContext) -> SandboxInfo:
        self._sup.check_can_launch()
        self._sup.check_limits(spec)
        info = await self.create(caller, spec, ctx)
        try:
            return await self._sup.start(info, timeout=None)
        except LimitReached:
            # Lost a race for the last slot: start nothing, keep nothing.
            await self._store.remove_sandbox(spec.name, now=time.time(),
                                             expect=states.removable)
            raise

    async def start(self, caller: Caller, params: StartSandboxParams, ctx: CallContext
                    ) -> SandboxInfo:
        info = await self._visible(caller, params.name)
        await self._check_launch(info, caller)
        return await self._sup.start(info, timeout=params.timeout)

    async def stop(self, caller: Caller, params: StopSandboxParams, ctx: CallContext
                   ) -> SandboxInfo:
        await self._visible(caller, params.name)
        return await self._sup.stop(params.name, timeout=params.timeout)

    async def kill(self, caller: Caller, params: KillSandboxParams, ctx: CallContext
                   ) -> SandboxInfo:
        sig = parse_signal(params.signal)
        await self._visible(caller, params.name)
        return await self._sup.kill(params.name, sig)

    async def restart(self, caller: Caller, params: RestartSandboxParams, ctx: CallContext
                      ) -> SandboxInfo:
        info = await self._visible(caller, params.name)
        # Checked before the stop: a restart the caller may not make leaves the run alone.
        await self._check_launch(info, caller)
        if self._sup.busy(params.name):
            info = await self._sup.stop(params.name, timeout=params.timeout,
                                        detail="restarted")
        return await self._sup.start(info, timeout=None)

    async def wait(self, caller: Caller, params: WaitSandboxParams, ctx: CallContext
                   ) -> SandboxInfo:
        await self._visible(caller, params.name)
        return await self._sup.wait(params.name, timeout=params.timeout)

    async def touch(self, caller: Caller, params: NameParams, ctx: CallContext) -> SandboxInfo:
        info = await self._visible(caller, params.name)
        self._sup.touch(params.name)
        return info

    async def logs(self, caller: Caller, params: LogsSandboxParams, ctx: CallContext
                   ) -> LogsResult:
        await self._visible(caller, params.name)
        chunk = await self._sup.logs(params.name, offset=params.offset, tail=params.tail,
                                     limit=params.limit, wait=params.wait)
        # Never split a UTF-8 sequence: hold an incomplete tail back for the next call,
        # unless a page ended inside the only character it has (a reader must move on).
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(chunk.data, final=False)
        held = len(decoder.getstate()[0])
        if held and not text and chunk.more:
            text, held = chunk.data.decode("utf-8", "replace"), 0
        return LogsResult(data=text, offset=chunk.offset - held, more=chunk.more)

    async def metrics(self, caller: Caller, params: NameParams, ctx: CallContext
                      ) -> MetricsResult:
        await self._visible(caller, params.name)
        pid = self._sup.pid_of(params.name)
        usage = self._sup.metrics(params.name)
        assert pid is not None
        return MetricsResult(pid=pid, rss_bytes=usage.rss_bytes, cpu_seconds=usage.cpu_seconds,
                             uptime=usage.uptime)

    # --- events ---------------------------------------------------------------------

    async def subscribe(self, caller: Caller, params: SubscribeEventsParams, ctx: CallContext
                        ) -> Subscription:
        owner = self._owner_filter(caller)
        last = await self._store.last_seq()
        since = last if params.since is None else params.since
        conn = ctx.connection
        registered = anyio.Event()

        async def replay(after: int) -> list[Event]:
            return await self._store.events_since(after, limit=500, owner_uid=owner)

        async def deliver(event: Event) -> None:
            await conn.notify("event", EventParams(event=event))

        async def stream() -> None:
            try:
                await stream_events(self._hub, since=since, owner_uid=owner, replay=replay,
                                    deliver=deliver, registered=registered)
            except Lagged:
                await conn.notify("events.lagged", LaggedParams(
                    message="this subscriber fell behind and was dropped; resubscribe with "
                            "`since` set to the last seq received"))

        ctx.defer(stream)
        # The newest event now: the replay runs from `since` up to it, live events follow.
        return Subscription(seq=last)
