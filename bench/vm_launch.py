"""Real guests: msbd's `sandbox.run` side by side with microsandbox's own `msb run`.

`python -m bench.vm_launch [--rounds N] [--libkrun PATH] [--msb PATH] [--json FILE]`
(or `bench.run --only vm`; `make bench-vm` runs it inside scripts/nested-kvm).

Both launchers boot the same busybox root directory with 1 vCPU and 512 MiB
(msb's defaults) and run `sh -c 'echo first; exit 7'`. Two figures per launch,
from one monotonic clock in this process:

- **first line**: until the workload's `first` line reached us. msbd: from the
  `sandbox.run` call until `sandbox.logs` (a long poll from offset 0) returned
  a complete `first` line. msb: from spawning `msb run --no-tty` until its
  stdout delivered it.
- **exit**: until the run was over. msbd: until `sandbox.wait` answered (the
  daemon reaped the worker and recorded the end); msb: until `msb run` exited.

Each round runs one launch of each, the order alternating, so that load drifts
on a shared host hit both; one untimed launch of each warms caches first (and
creates msb's database). Reported: p50 and p90 of each figure, of
`line_to_exit` (exit minus first line: what a launcher spends after the
workload spoke) and of msbd's `run_answered` (`sandbox.run` returned: the
worker said `entering`); the ratios msbd/msb of the medians, and the median of
each round's own msbd/msb (its two launches ran back to back). Above 1 means
msbd is slower. The exit code must be 7: a launch that ends otherwise stops the
benchmark with what it printed, since its figure would mean nothing. A process
that outlives its launch is waited for (and noted) before the next launch.
msb gets its own MSB_HOME in the scratch directory and `--no-net`, so it never
leaves loopback (its guest has an `eth0` without an address); the machine has
no route out anyway.

Nothing here sleeps: each step waits on a fact (a reply, a pipe, a pidfd).
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench.common import (
    REPO,
    RESULTS,
    LineClient,
    Msbd,
    Report,
    contained,
    descendants,
    is_zygote,
    make_rootfs,
    percentile,
    scratch,
    waiting_for_spec,
)

SCRIPT = "echo first; exit 7"  # no `"` and no control characters: the kernel command line
FIRST = "first"
EXIT_CODE = 7
VCPUS, MEMORY_MIB = 1, 512  # msb's defaults (`msb machine --vcpus 1 --memory-mib 512`)
GUEST_WAIT = 300.0  # one guest's whole life under nested TCG, with a wide margin
SETTINGS = {"start_timeout": 120.0, "heartbeat_misses": 60}  # TCG: a starved worker is alive


@dataclass
class Launch:
    """Seconds from the start of one launch."""

    first: float
    exit: float
    returned: float | None = None  # msbd: when `sandbox.run` answered (the worker `entering`)
    before: str = ""  # whatever came before the `first` line (expected: nothing)


# --- what to run --------------------------------------------------------------------------


def real_libkrun(given: str | None) -> Path:
    """The real libkrun.so.1: `--libkrun`, else $MSBD_TEST_LIBKRUN (as the real-VM tests)."""
    path = given or os.environ.get("MSBD_TEST_LIBKRUN")
    if not path:
        raise SystemExit("bench.vm_launch: name the real libkrun.so.1 with --libkrun or "
                         "MSBD_TEST_LIBKRUN (`make libkrun` prints its directory)")
    if not Path(path).is_file():
        raise SystemExit(f"bench.vm_launch: {path} does not exist (run `make libkrun`)")
    return Path(path)


def can_boot(libkrun: Path) -> None:
    """Stop with msbd doctor's reasons unless this host's KVM can boot a guest kernel."""
    from msbd.vm import doctor

    report = doctor.run_checks(str(libkrun))
    if not report.ok:
        raise SystemExit("bench.vm_launch: this host cannot run real guests (run it inside "
                         "scripts/nested-kvm, as `make bench-vm` does):\n"
                         + doctor.render(report))


def guest_root(base: Path) -> Path:
    """The busybox root both launchers boot. msb's in-guest agent resolves the user
    (root) in /etc/passwd and /etc/group before it runs a command; msbd needs neither."""
    root = make_rootfs(base)
    (root / "sys").mkdir()
    (root / "root").mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    os.chmod(base, 0o755)
    return root


# --- one launch of each ---------------------------------------------------------------------


def msbd_launch(client: LineClient, root: Path, name: str) -> Launch:
    spec = {"name": name, "rootfs": str(root), "exec": "/bin/sh", "args": ["-c", SCRIPT],
            "vcpus": VCPUS, "memory_mib": MEMORY_MIB}
    t0 = time.monotonic()
    info = client.call("sandbox.run", spec)
    returned = time.monotonic() - t0
    if info["state"] != "running":
        raise RuntimeError(f"sandbox.run of {name}: {info}")
    text, offset = "", 0
    deadline = t0 + GUEST_WAIT
    while FIRST not in text.split("\n")[:-1]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{name}: no {FIRST!r} line within {GUEST_WAIT:.0f} s: {text!r}")
        page = client.call("sandbox.logs", {"name": name, "offset": offset, "wait": left})
        text, offset = text + page["data"], page["offset"]
        if not page["data"] and not page["more"]:
            now = client.call("sandbox.get", {"name": name})
            if now["state"] != "running":  # over without the line: say what it did
                raise RuntimeError(f"{name} ended without a {FIRST!r} line: {now['run']}, "
                                   f"console {text!r}")
    first = time.monotonic() - t0
    end = client.call("sandbox.wait", {"name": name, "timeout": GUEST_WAIT})
    ended = time.monotonic() - t0
    run = end["run"]
    if (end["state"], run["reason"], run["exit_code"]) != ("stopped", "exited", EXIT_CODE):
        raise RuntimeError(f"{name} ended {end['state']}: {run}, console {text!r}")
    client.call("sandbox.remove", {"name": name})
    return Launch(first=first, exit=ended, returned=returned, before=text[:text.index(FIRST)])


def msb_argv(msb: Path, root: Path) -> list[str]:
    return [str(msb), "run", "--no-tty", "--no-net", "--cpus", str(VCPUS),
            "--memory", f"{MEMORY_MIB}M", str(root), "--", "/bin/sh", "-c", SCRIPT]


def msb_env(msb: Path, home: Path) -> dict[str, str]:
    """msb finds libkrunfw in ../lib from its binary (its doctor says so);
    LD_LIBRARY_PATH names the same directory for whatever loads it by soname."""
    return os.environ | {"MSB_HOME": str(home), "LD_LIBRARY_PATH": str(msb.parent.parent / "lib")}


def msb_launch(argv: list[str], env: dict[str, str], log: Path) -> Launch:
    with log.open("ab") as stderr:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdout is not None
    fd, out = proc.stdout.fileno(), bytearray()
    deadline = t0 + GUEST_WAIT
    try:
        while FIRST.encode() not in out.split(b"\n")[:-1]:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                why = "its stdout ended" if ready else f"nothing for {GUEST_WAIT:.0f} s"
                raise RuntimeError(f"msb run: {why} before a {FIRST!r} line: {bytes(out)!r}; "
                                   f"stderr: {_tail(log)}")
            out += chunk
        first = time.monotonic() - t0
        status = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        ended = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if status != EXIT_CODE:
        raise RuntimeError(f"msb run exited {status}, not {EXIT_CODE}: stdout {bytes(out)!r}; "
                           f"stderr: {_tail(log)}")
    return Launch(first=first, exit=ended,
                  before=out[:out.index(FIRST.encode())].decode(errors="replace"))


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def settle(daemon_pid: int, after: str, report: Report) -> None:
    """Wait until nothing but the daemon (with its fork server and idle pool workers) is
    below us, so the next launch runs alone.

    A process that outlives its launch (say a VMM still tearing down after its
    launcher exited) is waited for through a pidfd and noted with how long it
    stayed; one still there after GUEST_WAIT stops the benchmark.
    """
    t0 = time.monotonic()
    # The daemon's fork server and its idle pool workers (waiting for a spec) stay.
    stray = [p for p in descendants() if p != daemon_pid and _alive(p)
             and not is_zygote(p) and not waiting_for_spec(p)]
    for pid in stray:
        name = _cmdline(pid)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([pidfd], [], [],
                                        max(0.0, t0 + GUEST_WAIT - time.monotonic()))
        finally:
            os.close(pidfd)
        if not ready:
            raise RuntimeError(f"{after} left a process behind: {pid} {name}")
        report.note(f"{after}: {pid} {name[:80]} stayed {time.monotonic() - t0:.2f} s longer")
    for pid in stray:  # orphans handed to us (a subreaper); never the daemon
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


# --- the benchmark ---------------------------------------------------------------------------


def _orders(rounds: int) -> Iterator[tuple[int, tuple[str, str]]]:
    for i in range(rounds):
        yield i, ("msbd", "msb") if i % 2 == 0 else ("msb", "msbd")


def run(libkrun: Path, *, rounds: int = 5, msb: Path | None = None) -> dict[str, list[Launch]]:
    msb = msb or libkrun.parent.parent / "bin" / "msb"
    if not msb.is_file():
        raise SystemExit(f"bench.vm_launch: no msb at {msb} (`make libkrun` keeps it in "
                         "bin/ next to lib/)")
    can_boot(libkrun)
    report = Report("vm launch")
    report.note(f"{rounds} rounds, order alternating; workload `sh -c '{SCRIPT}'`, "
                f"{VCPUS} vCPU, {MEMORY_MIB} MiB, busybox root directory; libkrun {libkrun}; "
                f"msb {msb}")
    report.note("machine: " + ", ".join(f"{k}={v}" for k, v in machine_conditions().items()))
    launches: dict[str, list[Launch]] = {"msbd": [], "msb": []}
    with scratch("vm") as base:
        root = guest_root(base)
        msbd = Msbd(base / "msbd", libkrun=libkrun, settings=SETTINGS).start(timeout=300)
        argv, env = msb_argv(msb, root), msb_env(msb, base / "msb")
        try:
            with msbd.client(timeout=GUEST_WAIT + 60) as client:
                def one(who: str, name: str) -> Launch:
                    # progress on stderr: if the lane's guest hangs, it says where
                    print(f"vm_launch: {who} {name} starting", file=sys.stderr, flush=True)
                    if who == "msbd":
                        return msbd_launch(client, root, name)
                    return msb_launch(argv, env, base / "msb.stderr")

                for who in ("msbd", "msb"):  # warm-up, untimed: page cache, msb's database
                    warm = one(who, "warm")
                    settle(msbd.pid, f"the warm-up {who} launch", report)
                    report.note(f"warm-up {who}: first line {warm.first:.2f} s, "
                                f"exit {warm.exit:.2f} s (not counted)")
                for i, order in _orders(rounds):
                    for who in order:
                        launch = one(who, f"r{i}")
                        settle(msbd.pid, f"round {i}'s {who} launch", report)
                        launches[who].append(launch)
                        extra = (f", sandbox.run answered {launch.returned:.2f} s"
                                 if launch.returned is not None else "")
                        if launch.before:
                            extra += f", output before the line: {launch.before!r}"
                        report.note(f"round {i} {who:4}: first line {launch.first:6.2f} s, "
                                    f"exit {launch.exit:6.2f} s{extra}")
        except Exception:
            print(f"# msbd's log, last lines:\n{msbd.log_tail()}", flush=True)
            raise
        finally:
            msbd.stop()
    summarise(report, launches)
    return launches


def summarise(report: Report, launches: dict[str, list[Launch]]) -> None:
    times = {who: {"first_line": [x.first for x in done], "exit": [x.exit for x in done],
                   "line_to_exit": [x.exit - x.first for x in done]}
             for who, done in launches.items()}
    times["msbd"]["run_answered"] = [x.returned or 0.0 for x in launches["msbd"]]
    p50: dict[str, float] = {}
    for who, figures in times.items():
        for name, values in figures.items():
            ordered = sorted(values)
            p50[f"{who}.{name}"] = report.figure(f"vm.{who}.{name}.p50",
                                                 percentile(ordered, 50), "s")
            report.figure(f"vm.{who}.{name}.p90", percentile(ordered, 90), "s",
                          note=f"{len(ordered)} launches")
    for name in ("first_line", "exit"):
        report.ratio(f"vm.{name}.msbd_p50_vs_msb", p50[f"msbd.{name}"], p50[f"msb.{name}"])
    # Each round's two launches ran back to back under the same load: their ratio,
    # median over the rounds, shrugs off load that drifts between rounds.
    for name in ("first_line", "exit"):
        pairs = sorted(a / b for a, b in zip(times["msbd"][name], times["msb"][name],
                                             strict=True))
        report.figure(f"ratio.vm.{name}.msbd_vs_msb_per_round.p50", percentile(pairs, 50),
                      "x", note=f"median of {len(pairs)} rounds' msbd/msb")


def machine_conditions() -> dict[str, str]:
    """What the figures depend on, as seen from where the guests run."""
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    mem = int(Path("/proc/meminfo").read_text().split()[1])
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {"nproc": str(os.cpu_count()), "cpu": model, "memory_gib": f"{mem / 2**20:.1f}",
            "kernel": os.uname().release, "load": load,
            "nested_kvm_lane": "yes" if os.environ.get("MSBD_NESTED_KVM") == "1" else "no"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vm_launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="launches of each (default 5)")
    parser.add_argument("--libkrun", metavar="PATH",
                        help="the real libkrun.so.1 (default: $MSBD_TEST_LIBKRUN)")
    parser.add_argument("--msb", metavar="PATH",
                        help="microsandbox's msb (default: bin/msb beside libkrun's lib/)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    libkrun = real_libkrun(args.libkrun)
    os.chdir(REPO)  # the daemon and its workers run the msbd of this checkout
    t0 = time.monotonic()
    with contained():
        run(libkrun, rounds=args.rounds, msb=Path(args.msb) if args.msb else None)
    took = time.monotonic() - t0
    print(f"\nvm launch benchmark done in {took:.0f} s", flush=True)
    if args.json:
        result: dict[str, Any] = {"seconds": took, "results": RESULTS}
        Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
