"""Run every benchmark: `python -m bench.run [--quick] [--only NAME ...] [--json FILE]`.

Prints the machine, then each benchmark's figures and ratios. `--quick` is a
tiny run (seconds per benchmark) for the smoke test; its figures mean nothing.
`vm` (real guests against `msb run`, bench/vm_launch.py) runs only when named:
it needs a KVM that boots a kernel and $MSBD_TEST_LIBKRUN.
Everything started is ended on the way out, even on error: the bench makes
itself a child subreaper, so workers orphaned by a killed daemon are ours too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from bench import control, launch, peer, relay, scale, vm_launch
from bench.common import REPO, RESULTS, contained

BENCHMARKS = ("control", "launch", "scale", "relay")
# Real guests: only when asked for (`--only vm`), on a KVM that boots a kernel (BENCHMARKS.md)
OPTIONAL = ("vm",)


def machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "memory_gib": f"{int(mem) / 2**20:.1f}",
            "supervisor": _supervisor_version()}


def _supervisor_version() -> str:
    if not peer.available():
        return "not installed"
    from importlib.metadata import version

    return version("supervisor")


@contextlib.contextmanager
def _took(name: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    print(f"  # {name} took {time.monotonic() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--only", action="append", choices=BENCHMARKS + OPTIONAL,
                        help="run only this benchmark (repeatable); `vm` (real guests) runs "
                             "only when named")
    parser.add_argument("--sandboxes", type=int, help="sandboxes for `scale` (default 1000)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    args = parser.parse_args(argv)
    chosen = args.only or list(BENCHMARKS)
    os.chdir(REPO)  # workers spawned by the bench inherit it, like the daemon's
    # SIGTERM/SIGHUP end the run through `contained`'s `finally`: everything started ends.
    info = machine()
    print("msbd benchmarks: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    t0 = time.monotonic()
    with contained():
        rate = None
        if "control" in chosen:
            with _took("control"):
                control.run(duration=0.3, warmup=20, rounds=1) if args.quick else control.run()
        if "launch" in chosen:
            with _took("launch"):
                rate = (launch.run(count=3, concurrent_count=8, probes=2) if args.quick
                        else launch.run())
        if "scale" in chosen:
            n = args.sandboxes or (8 if args.quick else 1000)
            with _took("scale"):
                if args.quick:
                    scale.run(sandboxes=n, launch_rate=rate, window=1.0, restarts=1,
                              margin=2.0)
                else:
                    scale.run(sandboxes=n, launch_rate=rate)
        if "relay" in chosen:
            with _took("relay"):
                (relay.run(count=50, bulk_mib=4, clients=4, each=5) if args.quick
                 else relay.run())
        if "vm" in chosen:
            with _took("vm"):
                vm_launch.run(vm_launch.real_libkrun(None), rounds=1 if args.quick else 5)
    took = time.monotonic() - t0
    print(f"\nall benchmarks done in {took:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(
            {"machine": info, "seconds": took, "results": RESULTS})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
