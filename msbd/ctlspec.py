"""msbctl's flags as a launch spec: `--disk`, `--mount`, `-e`, `--env-file` and the rest.

Secrets stay off msbctl's command line: `-e KEY` takes the value from msbctl's
own environment and `--env-file` reads KEY=VALUE lines (taken literally: no
quotes removed, nothing expanded). A problem is a `UsageError` naming the flag.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from msbd.errors import InvalidParams
from msbd.model import ENV_KEY_PATTERN, parse_disk_arg, parse_mount_arg


class UsageError(Exception):
    pass


def parse_kv(entries: list[str] | None, what: str, field: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in entries or []:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise InvalidParams(f"invalid {what} {entry!r}: expected KEY=VALUE", field=field)
        out[key] = value
    return out


def own_env(key: str, where: str) -> str:
    """`key`'s value in msbctl's own environment (`-e KEY`, a bare `KEY` line)."""
    if not re.fullmatch(ENV_KEY_PATTERN, key):
        raise UsageError(f"{where}: {key!r} is not a variable name")
    try:
        return os.environ[key]
    except KeyError:
        raise UsageError(f"{where}: {key} is not set in msbctl's environment") from None


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines, taken literally (the syntax is in README.md and `--help`)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--env-file {path}: {getattr(exc, 'strerror', None) or exc}"
                         ) from None
    out: dict[str, str] = {}
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"--env-file {path}, line {number}"
        key, sep, value = line.partition("=")
        if not re.fullmatch(ENV_KEY_PATTERN, key):
            raise UsageError(f"{where}: expected KEY=VALUE or KEY, with KEY a variable name")
        out[key] = value if sep else own_env(key, where)
    return out


def guest_env(args: argparse.Namespace) -> dict[str, str]:
    """Files first, in order, then each `-e`; a later value for a key wins."""
    env: dict[str, str] = {}
    for path in args.env_file or []:
        env.update(read_env_file(path))
    for entry in args.env or []:
        key, sep, value = entry.partition("=")
        if sep and not key:
            raise InvalidParams(f"invalid --env {entry!r}: expected KEY=VALUE or KEY",
                                field="env")
        env[key] = value if sep else own_env(key, f"-e {key}")
    return env


def absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if not args.command:
        raise UsageError("the command to run is required: ... -- EXEC [ARGS...]")
    spec: dict[str, Any] = {"name": args.name, "exec": args.command[0], "args": args.command[1:]}
    if args.rootfs:
        spec["rootfs"] = absolute(args.rootfs)
    if args.root_disk:
        parts = args.root_disk.split(":")
        disk = parse_disk_arg(":".join(["root", *parts]))
        spec["root_disk"] = {"path": absolute(disk.host), "format": disk.format.value,
                             "readonly": disk.readonly}
    env = guest_env(args)
    if env:
        spec["env"] = env
    if args.label:
        spec["labels"] = parse_kv(args.label, "--label", "labels")
    for key, flag in (("workdir", args.workdir), ("vcpus", args.vcpus),
                      ("memory_mib", args.memory), ("idle_timeout", args.idle_timeout),
                      ("max_duration", args.max_duration)):
        if flag is not None:
            spec[key] = flag
    if args.network is not None:
        spec["network"] = args.network
    if args.publish:
        spec["ports"] = [parse_publish(entry) for entry in args.publish]
    if args.rlimit:
        spec["rlimits"] = {name: parse_int(value, f"--rlimit {name}")
                           for name, value in parse_kv(args.rlimit, "--rlimit", "rlimits").items()}
    if args.mount:
        spec["mounts"] = [
            {"tag": m.tag, "host": absolute(m.host), "readonly": m.readonly}
            for m in map(parse_mount_arg, args.mount)]
    if args.disk:
        spec["disks"] = [
            {"id": d.id, "host": absolute(d.host), "format": d.format.value, "readonly": d.readonly}
            for d in map(parse_disk_arg, args.disk)]
    return spec


def parse_publish(entry: str) -> dict[str, Any]:
    """`HOST:GUEST`, `ADDRESS:HOST:GUEST` or `[IPV6]:HOST:GUEST`, as docker's `-p`."""
    address = None
    rest = entry
    if entry.startswith("["):
        address, sep, rest = entry[1:].partition("]:")
        if not sep:
            raise UsageError(f"-p {entry}: expected [ADDRESS]:HOST:GUEST")
    elif entry.count(":") == 2:
        address, _, rest = entry.partition(":")
    host, sep, guest = rest.partition(":")
    if not sep:
        raise UsageError(f"-p {entry}: expected [ADDRESS:]HOST:GUEST")
    port: dict[str, Any] = {"host": parse_int(host, f"-p {entry}"),
                            "guest": parse_int(guest, f"-p {entry}")}
    if address is not None:
        port["address"] = address
    return port


def parse_int(text: str, where: str) -> int:
    if not text.isdigit():
        raise UsageError(f"{where}: {text!r} is not a number")
    return int(text)


def exit_code_of(info: dict[str, Any]) -> int:
    run = info.get("run") or {}
    if run.get("exit_code") is not None:
        return int(run["exit_code"])
    if run.get("signal"):
        return 128 + int(run["signal"])
    return 1 if info["state"] == "failed" else 0
