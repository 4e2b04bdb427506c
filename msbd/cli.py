"""`msbd`: the daemon's command line (`serve`, `doctor`, `version`)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from msbd import __version__
from msbd.config import load_settings, settable_from_text
from msbd.errors import ConfigError, MsbdError


def _serve(args: argparse.Namespace) -> int:
    flags: dict[str, Any] = {
        "socket": os.path.abspath(args.socket) if args.socket else None,
        "state_dir": os.path.abspath(args.state_dir) if args.state_dir else None,
        "libkrun": os.path.abspath(args.libkrun) if args.libkrun else None,
        "log_level": args.log_level,
        "socket_group": args.socket_group,
    }
    options = {name: value for name in settable_from_text()
               if (value := getattr(args, f"set_{name}", None)) is not None}
    try:
        settings = load_settings(config=args.config, flags=flags, options=options)
    except ConfigError as exc:
        print(f"msbd: {exc}", file=sys.stderr)
        return 2
    from msbd.daemon.app import run  # imported late: `msbd doctor` needs none of it

    return run(settings)


def _doctor(args: argparse.Namespace) -> int:
    """The worker's own host checks, in the worker's process image; then the cgroups line."""
    argv = [sys.executable, "-m", "msbd.vm", "doctor"]
    if args.json:
        argv.append("--json")
    libkrun = args.libkrun or os.environ.get("MSBD_LIBKRUN")
    if libkrun:
        argv += ["--libkrun", os.path.abspath(libkrun)]
    done = subprocess.run(argv, stdout=subprocess.PIPE, check=False)
    cgroups = cgroups_status(args.socket)
    if args.json:
        report = json.loads(done.stdout)
        print(json.dumps(report | {"cgroups": cgroups}))
    else:
        sys.stdout.write(done.stdout.decode(errors="replace"))
        print(cgroups_line(cgroups))
    return done.returncode


def cgroups_status(socket: str | None) -> dict[str, Any]:
    """Whether runs get cgroups, and why not: the running daemon's answer (`daemon.info`),
    else what a daemon started from this process would find (`msbd.daemon.cgroups.find`)."""
    from msbd.rpc.client import Client

    try:
        with Client(socket, timeout=10) as c:
            info = c.call("daemon.info")
        seen = info.get("cgroups")
        if isinstance(seen, dict):
            return {"as_seen_by": "the running daemon", **seen}
    except (OSError, MsbdError):
        pass
    from msbd.daemon.cgroups import find

    try:
        setting = load_settings().cgroups
    except ConfigError as exc:
        return {"as_seen_by": "this process", "enabled": False, "root": None,
                "controllers": [], "reason": str(exc)}
    cg = find(setting)
    return {"as_seen_by": "this process; no daemon answered", "enabled": cg.enabled,
            "root": None if cg.root is None else str(cg.root),
            "controllers": sorted(cg.controllers), "reason": cg.reason}


def cgroups_line(status: dict[str, Any]) -> str:
    who = status["as_seen_by"]
    if status["enabled"]:
        controllers = " ".join(status["controllers"]) or "no controllers"
        return (f"{'ok':8} cgroups: on ({who}): a cgroup per run under {status['root']}/runs, "
                f"with {controllers}")
    return f"{'off':8} cgroups: off ({who}): {status['reason']}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msbd", description="msbd, the microVM sandbox daemon.")
    parser.add_argument("--version", action="version", version=f"msbd {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the daemon in the foreground",
                           description="Run the daemon in the foreground until SIGTERM/SIGINT.")
    serve.add_argument("--socket", metavar="PATH",
                       help="control socket (root: /run/msbd/msbd.sock, "
                            "others: $XDG_RUNTIME_DIR/msbd/msbd.sock)")
    serve.add_argument("--state-dir", metavar="DIR",
                       help="database and logs (root: /var/lib/msbd, "
                            "others: ~/.local/state/msbd)")
    serve.add_argument("--config", metavar="FILE",
                       help="TOML settings file (default /etc/msbd/msbd.toml when present)")
    serve.add_argument("--libkrun", metavar="PATH", help="libkrun shared library to launch with")
    serve.add_argument("--socket-group", metavar="GROUP", help="group owning the socket")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    named = {"socket", "state_dir", "libkrun", "socket_group", "log_level"}
    extra = serve.add_argument_group(
        "other settings", "every setting of the settings file, by its name "
        "(e.g. --max-sandboxes-per-user 20); flags rank above MSBD_* and the file")
    for name in settable_from_text():
        if name not in named:
            extra.add_argument(f"--{name.replace('_', '-')}", dest=f"set_{name}",
                               metavar="VALUE", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)
    doctor = sub.add_parser("doctor", help="check this host can run sandboxes",
                            description="Check virtualization, /dev/kvm, libkrun and libkrunfw, "
                                        "and say whether runs get cgroups (and why not).")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--libkrun", metavar="PATH", help="libkrun shared library to check")
    doctor.add_argument("--socket", metavar="PATH",
                        help="the daemon to ask whether it uses cgroups (default: msbctl's)")
    doctor.set_defaults(func=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
