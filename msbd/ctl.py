"""msbctl: a thin command-line client of the daemon's JSON-RPC socket.

Blocking and small: the same codec as the daemon over a plain socket, no
anyio, uvloop or aiosqlite. Exit status 0 on success, 1 on an error reply
(printed as one line), 2 on a usage error; `run --wait` and `wait` exit with
the sandbox's own exit code (128+N for a signal, as a shell does).

Output is printed to its last byte, page after page, for as long as
`sandbox.logs` says `more`. Guest environment values can come from a file
(`--env-file`) or from msbctl's own environment (`-e KEY`), so that a secret
need not sit on msbctl's command line, which every local user can read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from msbd import ctlfmt as fmt
from msbd import ctlspec
from msbd.ctlspec import UsageError
from msbd.errors import InvalidParams, MsbdError
from msbd.rpc.client import Client, default_socket_path

PROG = "msbctl"


# --- commands --------------------------------------------------------------------


def cmd_ping(c: Client, a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    result = c.call("daemon.ping")
    fmt.emit(a, result, lambda r: print(f"{r} ({(time.perf_counter() - t0) * 1000:.2f} ms)"))
    return 0


def cmd_info(c: Client, a: argparse.Namespace) -> int:
    fmt.emit(a, c.call("daemon.info"), fmt.print_info)
    return 0


def cmd_create(c: Client, a: argparse.Namespace) -> int:
    info = c.call("sandbox.create", ctlspec.spec_from_args(a))
    fmt.emit(a, info, lambda i: print(f"created {i['name']}"))
    return 0


def cmd_run(c: Client, a: argparse.Namespace) -> int:
    info = c.call("sandbox.run", ctlspec.spec_from_args(a), timeout=None)
    if not a.wait:
        fmt.emit(a, info, lambda i: print(f"{i['name']} {i['state']} (pid {i['run']['pid']})"))
        return 0
    info = c.call("sandbox.wait", {"name": a.name}, timeout=None)
    if not a.json:
        _print_log(c, {"name": a.name, "offset": 0})
    else:
        fmt.emit(a, info, print)
    return ctlspec.exit_code_of(info)


def cmd_ls(c: Client, a: argparse.Namespace) -> int:
    """Every page of `sandbox.list`, as one table (or one JSON object)."""
    params: dict[str, Any] = {k: v for k, v in (("state", a.state), ("label", a.label))
                              if v is not None}
    params |= {"spec": True, "limit": 1000}
    items: list[dict[str, Any]] = []
    while True:
        page = c.call("sandbox.list", params)
        items += page["sandboxes"]
        if not page.get("next"):
            break
        params["cursor"] = page["next"]
    fmt.emit(a, {"sandboxes": items}, lambda r: fmt.print_sandboxes(r["sandboxes"]))
    return 0


def cmd_inspect(c: Client, a: argparse.Namespace) -> int:
    print(json.dumps(c.call("sandbox.get", {"name": a.name}), indent=2))
    return 0


def cmd_rm(c: Client, a: argparse.Namespace) -> int:
    info = c.call("sandbox.remove", {"name": a.name, "force": a.force}, timeout=None)
    fmt.emit(a, info, lambda i: print(f"removed {i['name']}"))
    return 0


def _simple(method: str, extra: Callable[[argparse.Namespace], dict[str, Any]]
            ) -> Callable[[Client, argparse.Namespace], int]:
    def run(c: Client, a: argparse.Namespace) -> int:
        info = c.call(method, {"name": a.name, **extra(a)}, timeout=None)
        fmt.emit(a, info,
                 lambda i: print(f"{i['name']}: {i['state']} {fmt.status(i)}".rstrip(" -")))
        return 0
    return run


def _timeout(a: argparse.Namespace) -> dict[str, Any]:
    return {} if a.timeout is None else {"timeout": a.timeout}


def cmd_wait(c: Client, a: argparse.Namespace) -> int:
    info = c.call("sandbox.wait", {"name": a.name, **_timeout(a)}, timeout=None)
    fmt.emit(a, info, lambda i: print(f"{i['name']}: {i['state']} {fmt.status(i)}"))
    return ctlspec.exit_code_of(info)


def _print_log(c: Client, params: dict[str, Any]) -> dict[str, Any]:
    """Print console output from `params` on, page after page, until the log holds no
    more; the last reply."""
    while True:
        result: dict[str, Any] = c.call("sandbox.logs", params, timeout=None)
        sys.stdout.write(result["data"])
        sys.stdout.flush()
        if not result.get("more"):
            return result
        params = {"name": params["name"], "offset": result["offset"]}


def cmd_logs(c: Client, a: argparse.Namespace) -> int:
    params: dict[str, Any] = {"name": a.name}
    if a.tail is not None:
        params["tail"] = a.tail
    else:
        params["offset"] = 0
    while True:
        result = _print_log(c, params)
        if not a.follow:
            return 0
        params = {"name": a.name, "offset": result["offset"]}
        if not result["data"]:
            state = c.call("sandbox.get", {"name": a.name})["state"]
            if state not in ("starting", "running", "paused", "stopping"):
                _print_log(c, params)  # what came between that read and the end
                return 0
        params["wait"] = 5.0


def cmd_metrics(c: Client, a: argparse.Namespace) -> int:
    fmt.emit(a, c.call("sandbox.metrics", {"name": a.name}), fmt.print_metrics)
    return 0


def cmd_events(c: Client, a: argparse.Namespace) -> int:
    params = {} if a.since is None else {"since": a.since}
    # `seq` is the newest event when the subscription began: the replay ends there.
    head = c.call("events.subscribe", params)["seq"]
    if a.no_follow and (a.since or 0) >= head:
        return 0
    for method, params_ in c.iter_notifications():
        if method == "events.lagged":
            print(f"{PROG}: {params_['message']}", file=sys.stderr)
            return 1
        if method != "event":
            continue
        ev = params_["event"]
        if a.json:
            print(json.dumps(ev), flush=True)
        else:
            end = f" {ev['reason']}" if ev.get("reason") else ""
            end += f" exit={ev['exit_code']}" if ev.get("exit_code") is not None else ""
            end += f" signal={fmt.signame(ev['signal'])}" if ev.get("signal") else ""
            print(f"{ev['seq']:>6} {ev['time']} {ev['sandbox']} {ev['state']}{end}", flush=True)
        if a.no_follow and ev["seq"] >= head:
            return 0
    return 0


# --- argument parsing ------------------------------------------------------------


def _add_spec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="sandbox name: [A-Za-z0-9][A-Za-z0-9_.-]*, at most 128 bytes")
    root = p.add_mutually_exclusive_group(required=True)
    root.add_argument("--rootfs", metavar="DIR", help="host directory shared as the guest's root")
    root.add_argument("--root-disk", metavar="PATH:FORMAT[:ro]",
                      help="disk image as the guest's root (format raw, qcow2 or vmdk)")
    p.add_argument("--vcpus", type=int, help="virtual CPUs (1-255, default 1)")
    p.add_argument("--memory", type=int, metavar="MIB", help="guest memory in MiB (default 512)")
    p.add_argument("--workdir", metavar="PATH", help="working directory in the guest")
    p.add_argument("-e", "--env", action="append", metavar="KEY[=VALUE]",
                   help="guest environment variable (repeatable); KEY alone takes the value "
                        "from msbctl's own environment (an error if it is not set there), "
                        "which keeps a secret off msbctl's command line")
    p.add_argument("--env-file", action="append", metavar="FILE",
                   help="guest environment from FILE (repeatable, read before -e): one "
                        "KEY=VALUE per line, taken literally (no quotes, escapes or $ "
                        "expansion); a bare KEY line as -e KEY; blank lines and lines "
                        "starting with # are skipped")
    p.add_argument("--mount", action="append", metavar="TAG:HOST[:ro]",
                   help="extra host directory shared under TAG (repeatable)")
    p.add_argument("--disk", action="append", metavar="ID:HOST:FORMAT[:ro]",
                   help="extra disk image (repeatable)")
    p.add_argument("-l", "--label", action="append", metavar="KEY=VALUE",
                   help="label (repeatable)")
    p.add_argument("--network", choices=["none", "egress"],
                   help="none: no network; egress: outbound through the host, as the owner "
                        "(the daemon's default_network if not given)")
    p.add_argument("-p", "--publish", action="append", metavar="[ADDRESS:]HOST:GUEST",
                   help="publish the guest's TCP port GUEST on the host's HOST "
                        "(on ADDRESS, default 127.0.0.1; repeatable)")
    p.add_argument("--rlimit", action="append", metavar="NAME=VALUE",
                   help="a guest resource limit such as nofile=1024 (repeatable)")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS")
    p.add_argument("--max-duration", type=float, metavar="SECONDS")
    p.epilog = "The guest program and its arguments follow --: ... -- EXEC [ARGS...]"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: usage error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Control msbd, the microVM sandbox daemon.")
    parser.add_argument("--socket", default=None, metavar="PATH",
                        help=f"daemon socket (default: $MSBD_SOCKET or {default_socket_path()})")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    def add(name: str, func: Callable[[Client, argparse.Namespace], int], help_: str,
            *, named: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        if named:
            p.add_argument("name")
        p.set_defaults(func=func)
        return p

    add("ping", cmd_ping, "check that the daemon answers", named=False)
    add("info", cmd_info, "daemon version, health checks, counts and limits", named=False)
    _add_spec_flags(add("create", cmd_create, "record a sandbox without starting it", named=False))
    p = add("run", cmd_run, "create and start a sandbox", named=False)
    _add_spec_flags(p)
    p.add_argument("--wait", action="store_true",
                   help="wait for the run to end, print its output, exit with its exit code")
    p = add("ls", cmd_ls, "list sandboxes", named=False)
    p.add_argument("--state", help="only sandboxes in this state")
    p.add_argument("--label", metavar="KEY=VALUE", help="only sandboxes with this label")
    add("inspect", cmd_inspect, "show one sandbox as JSON")
    p = add("rm", cmd_rm, "remove a sandbox record")
    p.add_argument("-f", "--force", action="store_true", help="stop it first if it is running")
    p = add("start", _simple("sandbox.start", _timeout), "start a sandbox")
    p.add_argument("--timeout", type=float, help="seconds to wait for the worker to enter libkrun")
    p = add("stop", _simple("sandbox.stop", _timeout), "stop a sandbox")
    p.add_argument("--timeout", type=float, help="grace seconds before SIGKILL (default 10)")
    p = add("kill", _simple("sandbox.kill", lambda a: {"signal": a.signal}),
            "send a signal to a sandbox")
    p.add_argument("-s", "--signal", default="SIGKILL", help="signal name or number")
    p = add("restart", _simple("sandbox.restart", _timeout), "stop, then start")
    p.add_argument("--timeout", type=float, help="grace seconds before SIGKILL (default 10)")
    p = add("wait", cmd_wait, "wait for the current run to end; exit with its exit code")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    add("touch", _simple("sandbox.touch", lambda a: {}),
        "count as activity (moves the idle deadline)")
    add("pause", _simple("sandbox.pause", lambda a: {}),
        "freeze a running sandbox in place (needs cgroups; max_duration keeps counting)")
    add("resume", _simple("sandbox.resume", lambda a: {}), "thaw a paused sandbox")
    p = add("logs", cmd_logs, "print a sandbox's console output")
    p.add_argument("-n", "--tail", type=int, metavar="LINES", help="only the last LINES lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    add("metrics", cmd_metrics, "resource use of a sandbox's worker")
    p = add("events", cmd_events, "print state changes as they happen", named=False)
    p.add_argument("--since", type=int, metavar="SEQ", help="first replay events after SEQ")
    p.add_argument("--no-follow", action="store_true",
                   help="stop after the replay instead of waiting for new events")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is the guest's command line, untouched.
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    args.command = command
    path = args.socket or default_socket_path()
    try:
        with Client(path) as client:
            return int(args.func(client, args))
    except UsageError as exc:
        parser.exit(2, f"{PROG}: usage error: {exc}\n")
    except InvalidParams as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except MsbdError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
