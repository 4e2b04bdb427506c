"""The method handlers: what each JSON-RPC method does, with the caller's identity.

The server has already decoded and checked the params against the method
table (`msbd.rpc.methods`); a handler gets typed params and the caller, and
returns a result struct or raises an `MsbdError`, which the server turns into
the error reply. Who may do what is `msbd.daemon.access`: every handler that
names a sandbox looks it up through `_seen`, so a sandbox the caller does
not own is not found, and every launch checks the spec's host paths as the
caller first.

After its first read a handler names the sandbox by its immutable id
(`SandboxRef`) in everything it does: when a call waits (a path check on a
thread, a stop) and meanwhile the sandbox is removed and its name taken by
someone else's, the call acts on nothing of the newcomer's; it gets
"not found". Ownership is fixed with the id, so it holds after every await.
"""

from __future__ import annotations

import inspect
import os
import signal as signal_mod
import time
from typing import Any, cast

import anyio
import msgspec

from msbd import __version__, states
from msbd.config import Settings
from msbd.daemon import cgroups
from msbd.daemon.access import (
    Caller,
    check_spec_paths,
    daemon_identity,
    may_see,
    owner_caller,
)
from msbd.daemon.calling import Handler, awaitable, caller_of, inline
from msbd.daemon.console import log_path, remove_log, text_page
from msbd.daemon.doctor import HostCheck
from msbd.daemon.events import EventHub, stream_events
from msbd.daemon.live import live_cgroups
from msbd.daemon.netpolicy import admit, check_network
from msbd.daemon.supervisor import Supervisor
from msbd.db.memory import Entry
from msbd.db.store import Store
from msbd.errors import Conflict, InvalidParams, Lagged, LimitReached, NotFound, PortInUse
from msbd.model import Event, LaunchSpec, SandboxInfo
from msbd.rpc.methods import (
    METHODS,
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
from msbd.rpc.server import CallContext, Immediate


def handler_name(method: str) -> str:
    """The `Api` method that handles `method`: its verb (`noun.verb`)."""
    return method.rpartition(".")[2]


def parse_signal(value: str | int) -> int:
    if isinstance(value, int):
        return value
    name = value if value.startswith("SIG") else f"SIG{value}"
    try:
        return int(signal_mod.Signals[name])
    except KeyError:
        raise InvalidParams(f"`signal`: unknown signal {value!r}", field="signal") from None


_SPEC_ENCODER = msgspec.json.Encoder()


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
        # Each method's handler is the method of this class named by its verb:
        # `sandbox.create` -> `create` (tests/test_api_table.py checks the pairing).
        # A handler written as a plain function never suspends: the server answers
        # it inline (`immediate`, msbd.rpc.calls); a batch still reaches it here.
        self._table: dict[str, Handler] = {}
        self.immediate: dict[str, Immediate] = {}
        for name in METHODS:
            func = getattr(self, handler_name(name))
            if inspect.iscoroutinefunction(func):
                self._table[name] = func
            else:
                self._table[name] = awaitable(func)
                self.immediate[name] = inline(name, func)

    async def __call__(self, ctx: CallContext, method: str, params: Any) -> Any:
        return await self._table[method](caller_of(ctx, method), params, ctx)

    # --- helpers ------------------------------------------------------------------

    def _seen(self, caller: Caller, name: str, *, lenient: bool = False) -> SandboxInfo:
        """From memory, as it really is (`overlay`); `NotFound` if the caller may not see it."""
        info = self._store.lookup(name, lenient=lenient)
        if not may_see(caller, info, self._daemon_uid):
            raise NotFound(name)
        return self._sup.overlay(info)

    def _listed(self, entry: Entry, with_spec: bool) -> msgspec.Raw:
        """A list entry: its record's kept JSON, sent as it is, unless `overlay` changes it."""
        info = entry.info(with_spec=with_spec)
        shown = self._sup.overlay(info)
        return msgspec.Raw(entry.json(with_spec=with_spec) if shown is info
                           else _SPEC_ENCODER.encode(shown))

    async def _check_paths(self, spec: LaunchSpec, caller: Caller) -> None:
        await anyio.to_thread.run_sync(
            lambda: check_spec_paths(spec, caller, daemon=self._daemon))

    async def _check_launch(self, info: SandboxInfo, caller: Caller) -> None:
        """Paths as the caller, and as the identity the VM will run as, if another one
        (the owner's uid, gid and groups as recorded: exactly what the worker is given)."""
        assert info.spec is not None
        await self._check_paths(info.spec, caller)
        owner = owner_caller(await self._store.owner(info.ref), self._daemon_uid)
        if owner is not None and owner.uid != caller.uid:
            await self._check_paths(info.spec, owner)
        # The network goes to the VM's identity: the owner's, or the daemon's own.
        check_network(info.spec, owner or self._daemon, settings=self._settings,
                      daemon_uid=self._daemon_uid)

    def _owner_filter(self, caller: Caller) -> int | None:
        """None (everything) for an admin, else the caller's uid."""
        return None if caller.is_admin(self._daemon_uid) else caller.uid

    def _admit(self, spec: LaunchSpec, caller: Caller) -> LaunchSpec:
        """The checks of a new spec that need no I/O; the spec with its network decided."""
        self._check_spec_size(spec)
        return admit(spec, caller, settings=self._settings, daemon_uid=self._daemon_uid)

    def _check_spec_size(self, spec: LaunchSpec) -> None:
        size = len(_SPEC_ENCODER.encode(spec))
        limit = self._settings.max_spec_bytes
        if size > limit:
            raise InvalidParams(f"the launch spec is {size} bytes as JSON, over the limit of "
                                f"{limit} (max_spec_bytes)", field="spec")

    # --- daemon -------------------------------------------------------------------

    def ping(self, caller: Caller, params: NoParams, ctx: CallContext) -> str:
        return "pong"

    async def info(self, caller: Caller, params: NoParams, ctx: CallContext) -> DaemonInfo:
        report = await self._host.refresh(max_age=30.0)
        s = self._settings
        libkrun = self._sup.libkrun_path()
        admin = caller.is_admin(self._daemon_uid)
        timers = None
        if admin:
            late = self._sup.timer_lateness()
            loop = self._sup.loop_priority
            timers = TimerInfo(fired=late.fired, late_p50=late.p50, late_p99=late.p99,
                               late_max=late.max, loop_realtime=loop.realtime,
                               loop_raised=loop.raised)
        return DaemonInfo(
            version=__version__, pid=os.getpid(), uid=self._daemon_uid,
            uptime=time.monotonic() - self._started, socket=s.socket, state_dir=s.state_dir,
            libkrun=libkrun, libkrun_problem=None if libkrun else self._sup.missing_libkrun(),
            checks=report.checks,
            counts=self._store.counts(self._owner_filter(caller)),
            # Every field of LimitsInfo is the setting of that name.
            limits=LimitsInfo(**{f: getattr(s, f) for f in LimitsInfo.__struct_fields__}),
            timers=timers, unreadable=dict(self._store.unreadable) if admin else None,
            default_network=s.default_network,
            egress_allowed=admin or s.egress == "everyone",
            cgroups=cgroups.describe(self._sup.cgroups),
            cgroup_totals=cgroups.totals(self._sup.cgroups, live_cgroups(self._sup.live))
            if admin else None)

    def discover(self, caller: Caller, params: NoParams, ctx: CallContext) -> dict[str, Any]:
        if self._discover is None:
            self._discover = openrpc_document(__version__)
        return self._discover

    # --- records ------------------------------------------------------------------

    async def create(self, caller: Caller, spec: LaunchSpec, ctx: CallContext) -> SandboxInfo:
        spec = self._admit(spec, caller)
        await self._check_paths(spec, caller)
        admin = caller.is_admin(self._daemon_uid)
        info, _ = await self._store.create_sandbox(
            spec, owner=caller.as_owner(), now=time.time(),
            max_owned=None if admin else self._settings.max_sandboxes_per_user)
        # Ids are never reused, but a log left by a replaced database must not show.
        await anyio.to_thread.run_sync(remove_log, log_path(self._log_dir, info.id))
        return info

    def get(self, caller: Caller, params: NameParams, ctx: CallContext) -> SandboxInfo:
        return self._seen(caller, params.name)

    def list(self, caller: Caller, params: ListSandboxParams, ctx: CallContext
             ) -> SandboxList:
        after = int(params.cursor) if params.cursor is not None else 0
        entries = self._store.entries(
            state=params.state, label=params.label_pair(), owner_uid=self._owner_filter(caller),
            after=after, limit=params.limit + 1, with_spec=params.spec)
        more = len(entries) > params.limit
        entries = entries[:params.limit]
        items = cast(list[SandboxInfo], [self._listed(e, params.spec) for e in entries])
        return SandboxList(sandboxes=items, next=str(entries[-1].id) if more else None)

    async def remove(self, caller: Caller, params: RemoveSandboxParams, ctx: CallContext
                     ) -> SandboxInfo:
        info = self._seen(caller, params.name, lenient=True)  # even if unreadable
        ref = info.ref
        if self._sup.busy(ref) or info.state not in states.removable:
            if not params.force:
                raise Conflict(f"sandbox {ref.name!r} is {info.state}; stop it first or use "
                               "force", data={"sandbox": ref.name, "state": info.state})
            await self._sup.stop(ref, timeout=self._settings.stop_timeout,
                                 detail="removed with force")
        if self._sup.busy(ref):  # started again while we waited: leave it alone
            raise Conflict(f"sandbox {ref.name!r} was started again; not removed",
                           data={"sandbox": ref.name})
        removed, _ = await self._store.remove_sandbox(ref, now=time.time(),
                                                      expect=states.removable)
        await anyio.to_thread.run_sync(remove_log, log_path(self._log_dir, ref.id))
        return removed

    # --- runs ---------------------------------------------------------------------

    async def run(self, caller: Caller, spec: LaunchSpec, ctx: CallContext) -> SandboxInfo:
        self._sup.check_can_launch()
        spec = self._admit(spec, caller)
        # No room, or a host port held: refused before anything is recorded.
        self._sup.check_fits(spec, owner_uid=caller.uid, name=spec.name)
        info = await self.create(caller, spec, ctx)
        try:
            return await self._sup.start(info, timeout=None)
        except (LimitReached, PortInUse):
            # Taken while the record was written: nothing started, keep nothing. (Any
            # other refusal, a stop while starting, leaves a record with its run.)
            await self._store.remove_sandbox(info.ref, now=time.time(),
                                             expect=states.removable)
            raise

    async def start(self, caller: Caller, params: StartSandboxParams, ctx: CallContext
                    ) -> SandboxInfo:
        info = self._seen(caller, params.name)
        await self._check_launch(info, caller)
        return await self._sup.start(info, timeout=params.timeout)

    async def stop(self, caller: Caller, params: StopSandboxParams, ctx: CallContext
                   ) -> SandboxInfo:
        info = self._seen(caller, params.name)
        return await self._sup.stop(info.ref, timeout=params.timeout)

    async def kill(self, caller: Caller, params: KillSandboxParams, ctx: CallContext
                   ) -> SandboxInfo:
        sig = parse_signal(params.signal)
        info = self._seen(caller, params.name)
        return await self._sup.kill(info.ref, sig)

    async def restart(self, caller: Caller, params: RestartSandboxParams, ctx: CallContext
                      ) -> SandboxInfo:
        info = self._seen(caller, params.name)
        # Checked before the stop: a restart the caller may not make leaves the run alone.
        await self._check_launch(info, caller)
        if self._sup.busy(info.ref):
            info = await self._sup.stop(info.ref, timeout=params.timeout, detail="restarted")
        return await self._sup.start(info, timeout=None)

    async def pause(self, caller: Caller, params: NameParams, ctx: CallContext) -> SandboxInfo:
        info = self._seen(caller, params.name)
        return await self._sup.freezer.pause(info.ref, self._sup.live.get(info.id))

    async def resume(self, caller: Caller, params: NameParams, ctx: CallContext) -> SandboxInfo:
        info = self._seen(caller, params.name)
        return await self._sup.freezer.resume(info.ref, self._sup.live.get(info.id))

    async def wait(self, caller: Caller, params: WaitSandboxParams, ctx: CallContext
                   ) -> SandboxInfo:
        info = self._seen(caller, params.name)
        return await self._sup.wait(info.ref, timeout=params.timeout)

    async def touch(self, caller: Caller, params: NameParams, ctx: CallContext) -> SandboxInfo:
        info = self._seen(caller, params.name)
        self._sup.touch(info.ref)
        return info

    async def logs(self, caller: Caller, params: LogsSandboxParams, ctx: CallContext
                   ) -> LogsResult:
        info = self._seen(caller, params.name)
        chunk = await self._sup.logs(info.ref, offset=params.offset, tail=params.tail,
                                     limit=params.limit, wait=params.wait)
        text, offset = text_page(chunk)
        return LogsResult(data=text, offset=offset, more=chunk.more)

    async def metrics(self, caller: Caller, params: NameParams, ctx: CallContext
                      ) -> MetricsResult:
        info = self._seen(caller, params.name)
        pid, usage, cg = self._sup.metrics(info.ref)
        cpu = None if cg is None else cg.cpu_usage_usec  # None: no cgroup, or it is gone
        return MetricsResult(pid=pid, rss_bytes=usage.rss_bytes, uptime=usage.uptime,
                             cpu_seconds=usage.cpu_seconds if cpu is None else cpu / 1e6,
                             source="proc" if cpu is None else "cgroup",
                             cgroup=None if cpu is None else cg)

    # --- events ---------------------------------------------------------------------

    async def subscribe(self, caller: Caller, params: SubscribeEventsParams, ctx: CallContext
                        ) -> Subscription:
        conn = ctx.connection
        cap = self._settings.max_subscriptions_per_connection
        if conn.subscriptions >= cap and not caller.is_admin(self._daemon_uid):
            raise LimitReached(f"limit reached: this connection already has {cap} event "
                               "subscriptions (max_subscriptions_per_connection)",
                               data={"limit": "max_subscriptions_per_connection"})
        owner = self._owner_filter(caller)
        # A non-admin learns only its own newest event, never the global head.
        last = await self._store.last_seq(owner)
        since = last if params.since is None else params.since
        conn.subscriptions += 1

        async def replay(after: int) -> list[Event]:
            return await self._store.events_since(after, limit=500, owner_uid=owner)

        async def deliver(event: Event) -> None:
            await conn.notify("event", EventParams(event=event))

        async def stream() -> None:
            try:
                await stream_events(self._hub, since=since, owner_uid=owner, replay=replay,
                                    deliver=deliver)
            except Lagged:
                await conn.notify("events.lagged", LaggedParams(
                    message="this subscriber fell behind and was dropped; resubscribe with "
                            "`since` set to the last seq received"))
            finally:
                conn.subscriptions -= 1

        ctx.defer(stream)
        # The newest event now: the replay runs from `since` up to it, live events follow.
        return Subscription(seq=last)
