"""The daemon's settings: one typed object from defaults, a TOML file, `MSBD_*` and flags.

Precedence, lowest first: built-in defaults, the TOML file (`--config`, else
`/etc/msbd/msbd.toml` when it exists), `MSBD_<FIELD>` environment variables,
command-line flags. Each source is decoded on its own with msgspec, so an
unknown key or a bad value is reported with the source it came from.
"""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from msbd.errors import ConfigError

DEFAULT_CONFIG: Final = Path("/etc/msbd/msbd.toml")
ENV_PREFIX: Final = "MSBD_"
# Variables of msbd's build and test tools that share the prefix but are no
# settings: `make libkrun`'s cache, the real-VM tests' library, the nested lane.
NOT_SETTINGS: Final = frozenset({"MSBD_CACHE", "MSBD_TEST_LIBKRUN", "MSBD_NESTED_KVM"})

Positive = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the daemon can be told. Field names are the TOML keys."""

    socket: str = ""
    state_dir: str = ""
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o660
    socket_group: str | None = None
    libkrun: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # control socket
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    max_connections: Count = 1024
    max_connections_per_user: Count = 64
    max_subscriptions_per_connection: Count = 8
    max_inflight_per_connection: Count = 64
    connection_idle_timeout: Positive = 3600.0
    partial_frame_timeout: Positive = 30.0
    connection_send_timeout: Positive = 30.0
    shutdown_timeout: Positive = 10.0
    # sandboxes
    max_sandboxes: Count = 1000
    max_vcpus: Count = 4096
    max_memory_mib: Count = 4 * 1024 * 1024
    # per user (root and the daemon's own uid are exempt)
    max_sandboxes_per_user: Count = 100
    max_live_sandboxes_per_user: Count = 50
    max_memory_mib_per_user: Count = 64 * 1024
    max_spec_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    # network (docs/network.md): a spec without `network` gets `default_network`;
    # `egress` reaches the host's loopback, so by default only admins may ask for it.
    default_network: Literal["none", "egress"] = "none"
    egress: Literal["admins", "everyone"] = "admins"
    start_timeout: Positive = 30.0
    stop_timeout: Positive = 10.0
    # how long the kernel may take to freeze or thaw a run's cgroup (msbd.daemon.freezer)
    freeze_timeout: Positive = 30.0
    heartbeat_interval: Positive = 1.0
    heartbeat_misses: Count = 5
    log_max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 8 * 1024 * 1024
    worker_python: str = ""
    worker_env: dict[str, str] = {}
    # warm workers waiting for a spec (msbd.daemon.pool); 0: one spawned per launch
    worker_pool: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    worker_pool_idle: Positive = 600.0
    # workers forked from a zygote that has done their imports (msbd.daemon.forkserver);
    # false: each one spawned as a new interpreter
    worker_fork_server: bool = True
    events_keep: Count = 100_000
    # a cgroup per run (msbd.daemon.cgroups, docs/cgroups.md): "auto" uses the cgroup
    # systemd delegated to msbd, "off" none, an absolute path a cgroup v2 directory made
    # for msbd
    cgroups: str = "auto"
    # a run's memory.max is its guest memory plus this (msbd.daemon.runlimits)
    cgroup_vmm_overhead_mib: Count = 256
    cgroup_pids_max: Count = 512
    # cap a run at `vcpus` CPUs with cpu.max (else runs share the CPU by weight)
    cgroup_cpu_max: bool = False
    # the event loop's thread at SCHED_FIFO 1, reset for every thread and child
    # (msbd.daemon.priority); false: normal priority
    realtime_loop: bool = True

    @property
    def db_path(self) -> Path:
        return Path(self.state_dir) / "msbd.db"


def default_socket(uid: int | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Where the daemon listens unless told otherwise (the clients look there too):
    /run/msbd/msbd.sock for root, else `$XDG_RUNTIME_DIR/msbd/msbd.sock`, else
    /tmp/msbd-<uid>/msbd/msbd.sock."""
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return "/run/msbd/msbd.sock"
    return f"{_runtime_dir(uid, os.environ if environ is None else environ)}/msbd/msbd.sock"


def _runtime_dir(uid: int, env: Mapping[str, str]) -> str:
    return env.get("XDG_RUNTIME_DIR") or f"/tmp/msbd-{uid}"


def default_paths(uid: int | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(socket, state_dir) defaults: system paths for root, per-user paths otherwise."""
    uid = os.getuid() if uid is None else uid
    env = os.environ if environ is None else environ
    socket = default_socket(uid, env)
    if uid == 0:
        return socket, "/var/lib/msbd"
    state = env.get("XDG_STATE_HOME")
    if not state:
        home = env.get("HOME")
        if not home:
            try:
                home = pwd.getpwuid(uid).pw_dir
            except KeyError:  # no HOME and no passwd entry: keep state with the socket
                return socket, f"{_runtime_dir(uid, env)}/msbd/state"
        state = str(Path(home) / ".local/state")
    return socket, f"{state}/msbd"


def load_settings(
    *,
    config: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    options: Mapping[str, str] | None = None,
) -> Settings:
    """Merge every source into one `Settings`, or raise `ConfigError` naming the culprit.

    `flags` are typed values; `options` are `--<setting>` flags given as text
    (converted like `MSBD_*` variables). Both rank above the environment.
    """
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    path = Path(config) if config else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is not None:
        merged |= _from_file(path)
    merged |= _from_env(env)
    merged |= _from_text(dict(options or {}), lambda key: f"flag --{key.replace('_', '-')}")
    merged |= {k: v for k, v in (flags or {}).items() if v is not None}
    socket, state_dir = default_paths(environ=env)
    merged.setdefault("socket", socket)
    merged.setdefault("state_dir", state_dir)
    merged.setdefault("worker_python", sys.executable)
    settings = _convert(merged, "settings", strict=True)
    for name in ("socket", "state_dir"):
        if not os.path.isabs(getattr(settings, name)):
            raise ConfigError(f"setting `{name}` must be an absolute path, "
                              f"got {getattr(settings, name)!r}")
    if settings.cgroups not in ("auto", "off") and not os.path.isabs(settings.cgroups):
        raise ConfigError("setting `cgroups` must be 'auto', 'off' or an absolute path, "
                          f"got {settings.cgroups!r}")
    if settings.default_network == "egress" and settings.egress != "everyone":
        raise ConfigError("setting `default_network` = 'egress' needs `egress` = 'everyone' "
                          "(else every other user's launch with the default is refused)")
    return settings


def _from_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = msgspec.toml.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table of settings")
    _convert(data, f"config file {path}", strict=True)
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    fields = set(Settings.__struct_fields__)
    data: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key in NOT_SETTINGS:
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in fields:
            known = ", ".join(ENV_PREFIX + f.upper() for f in sorted(fields))
            raise ConfigError(f"unknown environment setting {key} (known: {known})")
        data[name] = value
    return _from_text(data, lambda key: f"environment {ENV_PREFIX}{key.upper()}")


def _from_text(data: dict[str, str], source: Callable[[str], str]) -> dict[str, Any]:
    """Settings given as text (environment, flags) as typed values; `source(key)` names
    where one came from in an error."""
    typed: dict[str, Any] = {}
    for key, value in data.items():
        if key == "worker_env":
            try:
                typed[key] = msgspec.json.decode(value)
            except msgspec.DecodeError as exc:
                raise ConfigError(f"{source(key)}: expected a JSON object: {exc}") from exc
        else:
            typed[key] = value
        _convert({key: typed[key]}, source(key), strict=False)
    return _convert_partial(typed)


def settable_from_text() -> list[str]:
    """The settings a `--<setting>` flag may give (every scalar one)."""
    return [name for name in Settings.__struct_fields__ if name != "worker_env"]


def _convert_partial(data: dict[str, Any]) -> dict[str, Any]:
    """Turn env strings into typed values (e.g. "10" -> 10) without adding defaults."""
    typed = msgspec.convert(data, Settings, strict=False)
    return {key: getattr(typed, key) for key in data}


def _convert(data: Mapping[str, Any], source: str, *, strict: bool) -> Settings:
    try:
        return msgspec.convert(data, Settings, strict=strict)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from exc


def _describe(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    # "Expected `int` >= 1 - at `$.max_sandboxes`" -> "max_sandboxes: Expected `int` >= 1"
    if " - at `$." in text:
        message, _, where = text.rpartition(" - at `$.")
        return f"`{where.rstrip('`')}`: {message}"
    return text.replace("Object contains unknown field", "unknown setting")
