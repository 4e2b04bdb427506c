"""The public method table: every JSON-RPC method, its params and result types.

This is the contract clients depend on. The server builds its typed params
decoders from it once, `rpc.discover` generates the OpenRPC document from it,
and the client uses it to decode results. Handlers are bound elsewhere
(`msbd.daemon.api`), so this module stays pure data.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from msbd.contract import CheckInfo
from msbd.model import (
    Event,
    LaunchSpec,
    Name,
    SandboxInfo,
    Seconds,
    Spec,
    State,
)

MAX_SQL_INT: Final = 2**63 - 1
"""The largest integer SQLite stores: sequence numbers and offsets never pass it."""

LabelFilter = Annotated[str, msgspec.Meta(
    pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}=[^\x00]{0,256}$", description="key=value")]


class Params(Spec, frozen=True):
    """Base of every params struct: by name, no unknown fields."""


class NoParams(Params, frozen=True):
    pass


class NameParams(Params, frozen=True):
    name: Name


class StartSandboxParams(Params, frozen=True):
    name: Name
    timeout: Seconds | None = None


class StopSandboxParams(Params, frozen=True):
    name: Name
    timeout: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 10.0


class KillSandboxParams(Params, frozen=True):
    name: Name
    signal: Annotated[str, msgspec.Meta(pattern=r"^(SIG)?[A-Z0-9+-]{1,12}$")] | Annotated[
        int, msgspec.Meta(ge=1, le=64)] = "SIGKILL"


class RestartSandboxParams(StopSandboxParams, frozen=True):
    # The same fields as a stop's (restart stops first); a name of its own in the schema.
    pass


class RemoveSandboxParams(Params, frozen=True):
    name: Name
    force: bool = False


MAX_LIST_PAGE: Final = 1000


class ListSandboxParams(Params, frozen=True):
    state: State | None = None
    label: LabelFilter | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIST_PAGE)] = 100
    # `next` of the previous page; absent for the first one.
    # At most 18 digits: every such number is a valid SQLite integer (ids are below 2**63).
    cursor: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,18}$")] | None = None
    # Include each sandbox's launch spec (left out by default: it can be large).
    spec: bool = False

    def label_pair(self) -> tuple[str, str] | None:
        if self.label is None:
            return None
        key, _, value = self.label.partition("=")
        return key, value


class WaitSandboxParams(Params, frozen=True):
    name: Name
    timeout: Seconds | None = None


class LogsSandboxParams(Params, frozen=True):
    name: Name
    tail: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None
    offset: Annotated[int, msgspec.Meta(ge=0, le=MAX_SQL_INT)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=4 * 1024 * 1024)] = 256 * 1024
    # With `offset` at the end of the output so far: wait up to this many
    # seconds for more (long poll; `msbctl logs -f` uses it).
    wait: Annotated[float, msgspec.Meta(ge=0, le=300)] | None = None


class SubscribeEventsParams(Params, frozen=True):
    since: Annotated[int, msgspec.Meta(ge=0, le=MAX_SQL_INT)] | None = None


# --- results -------------------------------------------------------------------


class Result(msgspec.Struct, frozen=True, kw_only=True):
    pass


class SandboxList(Result, frozen=True):
    """One page, oldest first; `next` is the cursor of the next page, null after the last."""

    sandboxes: list[SandboxInfo]
    next: str | None = None


class LimitsInfo(Result, frozen=True):
    max_sandboxes: int
    max_vcpus: int
    max_memory_mib: int
    max_sandboxes_per_user: int
    max_live_sandboxes_per_user: int
    max_memory_mib_per_user: int
    max_connections_per_user: int
    max_subscriptions_per_connection: int
    max_spec_bytes: int


class TimerInfo(Result, frozen=True):
    """How late the deadline scheduler fired (idle, max-duration, heartbeat, grace), in
    seconds: `fired` counts every deadline; the percentiles cover the recent ones."""

    fired: int
    late_p50: float
    late_p99: float
    late_max: float
    loop_realtime: bool = False
    """Whether the event loop runs at its real-time priority now (`realtime_loop`)."""
    loop_raised: int = 0
    """How many times the loop was raised to it, for urgent work."""


class CgroupsInfo(Result, frozen=True):
    """Whether runs get a cgroup each: `root` is the tree (its `runs/` holds them), with the
    controllers enabled for runs; when `enabled` is false, `reason` says why not."""

    enabled: bool
    root: str | None = None
    controllers: list[str] = []
    reason: str | None = None


class CgroupUsage(Result, frozen=True):
    """What a run's cgroup (or, in `daemon.info`, all live runs' cgroups together) counts:
    bytes, microseconds, processes. A field is null when its controller's file is not
    there (e.g. no memory controller); `memory_max`/`pids_max` are null when unlimited.
    For the sum, `memory_peak` adds each run's own peak."""

    memory_current: int | None = None
    memory_peak: int | None = None
    memory_max: int | None = None
    cpu_usage_usec: int | None = None
    cpu_user_usec: int | None = None
    cpu_system_usec: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    pids_current: int | None = None
    pids_max: int | None = None
    oom_kills: int | None = None


class CgroupTotals(CgroupUsage, frozen=True):
    """The sum over live runs that have a cgroup (`runs` of them)."""

    runs: int = 0


class DaemonInfo(Result, frozen=True):
    version: str
    pid: int
    uid: int
    uptime: float
    socket: str
    state_dir: str
    libkrun: str | None
    libkrun_problem: str | None
    checks: list[CheckInfo]
    counts: dict[str, int]
    limits: LimitsInfo
    timers: TimerInfo | None  # admins only
    # The network a spec without one gets, and whether the caller may ask for egress.
    default_network: str = "none"
    egress_allowed: bool = False
    unreadable: dict[str, str] | None = None  # admins only: records lists skipped, and why
    cgroups: CgroupsInfo | None = None
    cgroup_totals: CgroupTotals | None = None  # admins only, with cgroups on


class LogsResult(Result, frozen=True):
    """`offset` is where the next call continues; `more` says that output after it was
    already in the log (the page ended at `limit`): call again at once from `offset`."""

    data: str
    offset: int
    more: bool


class MetricsResult(Result, frozen=True):
    """`source` says where the figures come from: "cgroup" (the run's cgroup: every process
    of the run, `cgroup` set, `cpu_seconds` from its cpu.stat) or "proc" (cgroups off: /proc
    of the worker process alone). `rss_bytes` is always the worker's own resident memory."""

    pid: int
    rss_bytes: int
    cpu_seconds: float
    uptime: float
    source: Literal["cgroup", "proc"] = "proc"
    cgroup: CgroupUsage | None = None


class Subscription(Result, frozen=True):
    """`seq` is the newest event when the subscription began: events after `since`
    up to `seq` are replayed first, then live ones follow as `event` notifications."""

    seq: int


class EventParams(msgspec.Struct, frozen=True, kw_only=True):
    """Params of the `event` notification the daemon sends to subscribers."""

    event: Event


class MethodSpec(msgspec.Struct, frozen=True):
    name: str
    params: type[Spec]
    result: Any
    summary: str


_M = MethodSpec

METHODS: Final[dict[str, MethodSpec]] = {m.name: m for m in [
    _M("daemon.ping", NoParams, str, "Answers \"pong\": the daemon is alive and serving."),
    _M("daemon.info", NoParams, DaemonInfo,
       "Version, pid, uptime, libkrun and KVM checks, the caller's counts by state, limits, "
       "whether cgroups are on (and, for admins, timer lateness, unreadable records and the "
       "live runs' cgroup totals)."),
    _M("sandbox.create", LaunchSpec, SandboxInfo, "Record a sandbox without starting it."),
    _M("sandbox.run", LaunchSpec, SandboxInfo,
       "Create and start; answers once the worker is entering libkrun."),
    _M("sandbox.start", StartSandboxParams, SandboxInfo,
       "Start a created or ended sandbox; answers once the worker is entering libkrun."),
    _M("sandbox.stop", StopSandboxParams, SandboxInfo,
       "SIGTERM, then SIGKILL after `timeout` seconds; answers after the run ended."),
    _M("sandbox.kill", KillSandboxParams, SandboxInfo, "Send a signal to the worker."),
    _M("sandbox.pause", NameParams, SandboxInfo,
       "Freeze a running sandbox in place (its cgroup); answers once frozen. Needs cgroups."),
    _M("sandbox.resume", NameParams, SandboxInfo,
       "Thaw a paused sandbox; answers once it runs again."),
    _M("sandbox.restart", RestartSandboxParams, SandboxInfo, "Stop (if running), then start."),
    _M("sandbox.remove", RemoveSandboxParams, SandboxInfo,
       "Delete the record; a live sandbox only with `force` (stopped first)."),
    _M("sandbox.get", NameParams, SandboxInfo, "One sandbox."),
    _M("sandbox.list", ListSandboxParams, SandboxList,
       "Sandboxes visible to the caller, filtered by `state` and `label` (`k=v`), a page "
       "of `limit` at a time from `cursor`; specs only with `spec: true`."),
    _M("sandbox.wait", WaitSandboxParams, SandboxInfo, "Answers once the current run ended."),
    _M("sandbox.touch", NameParams, SandboxInfo, "Count as activity: moves the idle deadline."),
    _M("sandbox.logs", LogsSandboxParams, LogsResult,
       "Console output from `offset` (bytes, a page of at most `limit`; `more` when the "
       "log already holds more) or the last `tail` lines."),
    _M("sandbox.metrics", NameParams, MetricsResult,
       "Resource use of a running sandbox: from its run's cgroup when cgroups are on "
       "(memory, CPU, IO, pids and the limits in force), else from /proc of its worker."),
    _M("events.subscribe", SubscribeEventsParams, Subscription,
       "Replay events after `since`, then send live `event` notifications."),
    _M("rpc.discover", NoParams, dict[str, Any], "This API as an OpenRPC document."),
]}

class LaggedParams(msgspec.Struct, frozen=True, kw_only=True):
    """Params of `events.lagged`: the subscription was dropped for falling behind."""

    message: str


NOTIFICATIONS: Final[dict[str, type[msgspec.Struct]]] = {
    "event": EventParams, "events.lagged": LaggedParams}

