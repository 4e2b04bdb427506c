"""Shared bench plumbing: figures and ratios, a real msbd process, raw clients, cleanup.

Every benchmark prints figures as `name = value unit` lines with stable dotted
names (the smoke test looks for them) and ratios against a baseline measured
in the same run, with the target they are held to.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

REPO = Path(__file__).resolve().parents[1]
# The daemon process, the busybox root and the test double are the tests' harness,
# shared: tests/daemonproc.py (tests/ is not a package, so it is found by path).
sys.path.insert(0, str(REPO / "tests"))
from daemonproc import (  # noqa: E402
    DaemonProc,
    build_fakekrun,
    children_by_parent,
    is_zygote,  # noqa: F401 (for bench/vm_launch.py)
    make_busybox_root,
    waiting_for_spec,  # noqa: F401 (for bench/launch.py, bench/vm_launch.py)
)

PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- figures ----------------------------------------------------------------------


@dataclass
class Summary:
    """Latency samples (seconds) reduced to what the report shows."""

    n: int
    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        if not samples:
            return cls(0, math.nan, math.nan, math.nan)
        ordered = sorted(samples)
        return cls(len(ordered), percentile(ordered, 50), percentile(ordered, 99),
                   sum(ordered) / len(ordered))


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted samples."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Report:
    """Collects and prints one benchmark's figures; `RESULTS` keeps them all for --json."""

    title: str
    figures: dict[str, tuple[float, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        print(f"\n== {self.title} ==", flush=True)
        RESULTS[self.title] = self.figures

    def figure(self, name: str, value: float, unit: str = "", note: str = "") -> float:
        self.figures[name] = (value, unit)
        text = f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
        tail = f"  ({note})" if note else ""
        print(f"  {name:<52} = {text:>10} {unit}{tail}", flush=True)
        return value

    def latency(self, name: str, summary: Summary, *, rate: float | None = None,
                unit: str = "calls/s") -> None:
        """`name.p50`, `name.p99` (ms or µs, whichever reads better) and `name.rate`."""
        scale, lunit = (1e6, "us") if summary.p99 < 0.01 else (1e3, "ms")
        self.figure(f"{name}.p50", summary.p50 * scale, lunit)
        self.figure(f"{name}.p99", summary.p99 * scale, lunit)
        if rate is not None:
            self.figure(f"{name}.rate", rate, unit, note=f"{summary.n} samples")

    def ratio(self, name: str, num: float, den: float, *, target: str | None = None) -> float:
        """Print num/den; `target` like '<= 2' or '>= 10' adds MET/MISSED."""
        value = num / den if den else math.inf
        verdict = ""
        if target is not None:
            op, _, bound = target.partition(" ")
            met = value <= float(bound) if op == "<=" else value >= float(bound)
            verdict = f"target {target}: {'MET' if met else 'MISSED'}"
        self.figure(f"ratio.{name}", value, "x", note=verdict)
        return value

    def target(self, name: str, value: float, unit: str, target: str) -> None:
        """An absolute target (e.g. lateness p99 <= 20 ms)."""
        op, _, bound = target.partition(" ")
        met = value <= float(bound) if op == "<=" else value >= float(bound)
        self.figure(f"target.{name}", value, unit,
                    note=f"target {target} {unit}: {'MET' if met else 'MISSED'}")

    def note(self, text: str) -> None:
        print(f"  # {text}", flush=True)


RESULTS: dict[str, dict[str, tuple[float, str]]] = {}


# --- processes --------------------------------------------------------------------


def become_subreaper() -> None:
    """Orphans of our children (workers of a killed daemon) become ours, so we can end them."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)


@contextlib.contextmanager
def contained() -> Iterator[None]:
    """Run a benchmark so that whatever it starts ends with it, errors and SIGTERM included.

    We become a child subreaper, SIGTERM/SIGHUP end the run through `finally`,
    and everything still below us is killed on the way out.
    """
    become_subreaper()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        leftover = kill_descendants()
        if leftover:
            print(f"# cleanup: killed {len(leftover)} leftover processes: "
                  + " ".join(leftover[:10]), flush=True)


def descendants(root: int | None = None) -> list[int]:
    """Every live process below `root` (default: us), found through /proc's ppid links."""
    root = os.getpid() if root is None else root
    children = children_by_parent()
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_descendants() -> list[str]:
    """SIGKILL everything we started (directly or not) and reap our own children.

    Returns what was still running (zombies not counted), for the record.
    """
    victims: list[str] = []
    for pid in descendants():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rpartition(")")[2].split()[0] != "Z":
                victims.append(stat[:stat.rfind(")") + 1])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
    reap_children()
    return victims


def reap_children() -> None:
    with contextlib.suppress(ChildProcessError):
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_runtime_seconds(pid: int) -> float:
    """CPU time of `pid` (all its threads), seconds, to the nanosecond: its process CPU
    clock (Linux encodes one as `(~pid << 3) | 2`, CPUCLOCK_SCHED), finer than utime +
    stime, which count whole clock ticks (10 ms here; /proc/<pid>/schedstat reads 0 on
    this kernel)."""
    return time.clock_gettime(((~pid) << 3) | 2)


def reaped_children_cpu_seconds(pid: int) -> float:
    """cutime + cstime of `pid`: the CPU of every child it has reaped, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[13]) + int(fields[14])) / CLK_TCK


def children(pid: int) -> list[int]:
    """The children of `pid`, from every one of its threads."""
    found: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            found += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return found


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A short temp dir (Unix socket paths must stay under 108 bytes), removed after."""
    path = Path(tempfile.mkdtemp(prefix=f"msbdb-{prefix}-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_rootfs(base: Path) -> Path:
    """A minimal guest root under `base`: the tests' busybox root."""
    try:
        return make_busybox_root(base / "rootfs")
    except RuntimeError as exc:
        raise SystemExit(f"bench: {exc}") from exc


def need_fakekrun() -> Path:
    return build_fakekrun()


class Msbd(DaemonProc):
    """`msbd serve` as our child (the tests' `DaemonProc`), with the bench's defaults:
    info-level logs, this checkout's msbd for the daemon and its workers, a raw client."""

    def __init__(self, base: Path, *, libkrun: Path | None = None,
                 settings: Mapping[str, Any] | None = None, log_level: str = "info") -> None:
        base.mkdir(parents=True, exist_ok=True)
        # cwd=REPO: the daemon, and the workers that inherit its cwd, import the
        # msbd of this checkout (sys.path[0] of `-m`), whatever is installed.
        super().__init__(base, libkrun=libkrun, settings=settings, log_level=log_level,
                         cwd=REPO)

    def start(self, *, wait: bool = True, timeout: float = 120.0) -> Msbd:
        try:
            super().start(wait=wait, timeout=timeout)
        except RuntimeError:
            self.close()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 120.0, *, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM (the daemon stops its sandboxes), SIGKILL if it takes too long."""
        if self.proc is None:
            return None
        try:
            return super().stop(sig=sig, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            return None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])

    def client(self, timeout: float | None = 120.0) -> LineClient:  # type: ignore[override]
        return LineClient(self.socket, timeout=timeout)


# --- a raw newline-delimited JSON-RPC client ---------------------------------------


class RemoteError(Exception):
    pass


class _Response(msgspec.Struct):
    id: Any = None
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: dict[str, Any] | None = None


_RESPONSE = msgspec.json.Decoder(_Response)
_RESPONSES = msgspec.json.Decoder(list[_Response])
_ENCODER = msgspec.json.Encoder()


def request(method: str, params: Any = None, rid: int = 1) -> bytes:
    """One encoded JSON-RPC request frame, newline included."""
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    return _ENCODER.encode(msg) + b"\n"


class LineClient:
    """A blocking socket speaking newline-delimited frames: what every bench client uses."""

    def __init__(self, path: Path | str, *, timeout: float | None = 120.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = bytearray()
        self.ids = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exchange(self, frame: bytes) -> bytes:
        """Send one frame, return the next reply line (without its newline)."""
        self.sock.sendall(frame)
        return self.receive()

    def receive(self) -> bytes:
        """The next line the server sends (a reply or a notification)."""
        buf = self.buf
        while (nl := buf.find(b"\n")) < 0:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
        line = bytes(buf[:nl])
        del buf[:nl + 1]
        return line

    def call(self, method: str, params: Any = None) -> Any:
        self.ids += 1
        reply = _RESPONSE.decode(self.exchange(request(method, params, self.ids)))
        if reply.error is not None:
            raise RemoteError(f"{method}: {reply.error}")
        return msgspec.json.decode(reply.result)

    def batch(self, method: str, params_list: Sequence[Any]) -> list[Any]:
        """One batch of calls of `method`; results in order (errors raise)."""
        if not params_list:
            return []
        frames = [{"jsonrpc": "2.0", "id": i, "method": method, "params": p}
                  for i, p in enumerate(params_list)]
        replies = _RESPONSES.decode(self.exchange(_ENCODER.encode(frames) + b"\n"))
        replies.sort(key=lambda r: r.id)
        errors = [r.error for r in replies if r.error is not None]
        if errors:
            raise RemoteError(f"{method}: {len(errors)} errors, first: {errors[0]}")
        return [msgspec.json.decode(r.result) for r in replies]

    def batches(self, method: str, params_list: Sequence[Any], size: int = 100) -> list[Any]:
        out: list[Any] = []
        for i in range(0, len(params_list), size):
            out += self.batch(method, params_list[i:i + size])
        return out


def sandbox_spec(name: str, rootfs: Path, **extra: Any) -> dict[str, Any]:
    """The bench's workload: `sleep 600` in the busybox root, 1 vCPU, 64 MiB."""
    return {"name": name, "rootfs": str(rootfs), "exec": "/bin/sleep", "args": ["600"],
            "vcpus": 1, "memory_mib": 64} | extra
