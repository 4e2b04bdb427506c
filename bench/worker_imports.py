"""What a worker's start costs in CPU: `python -m msbd.vm` without its fds, interleaved runs.

    .venv/bin/python -m bench.worker_imports [--runs N] [OTHER_CHECKOUT ...]

The worker imports everything it needs at the top of its modules, then fails
its first fd check and exits with status 2: so a run without fds is exactly
a worker's interpreter start and imports, with nothing else. Each round runs
`python -c pass` (the floor), this checkout's worker, and the worker of each
OTHER_CHECKOUT (a directory holding an `msbd` package, e.g. a `git archive`
of another branch), one after the other with the same interpreter, so a
machine shared with other jobs loads them alike. Printed: CPU (the child's
user+system time) mean and wall p50 of each, and the worker's CPU minus the
floor's. Bytecode is written and used as the daemon's workers do (the
environment is cleared of PYTHONDONTWRITEBYTECODE; the first round warms it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import PYTHON, REPO


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    before = os.times()
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd="/", stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = os.times()
    if done.returncode not in (0, 2):
        raise RuntimeError(f"{argv}: exit status {done.returncode}")
    return (after.children_user - before.children_user
            + after.children_system - before.children_system), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_imports", description=__doc__)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("others", nargs="*", type=Path)
    args = parser.parse_args(argv)
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cases = {"python -c pass": ([PYTHON, "-c", "pass"], base),
             f"worker of {REPO}": ([PYTHON, "-m", "msbd.vm"], base | {"PYTHONPATH": str(REPO)})}
    for other in args.others:
        cases[f"worker of {other}"] = ([PYTHON, "-m", "msbd.vm"],
                                       base | {"PYTHONPATH": str(other.resolve())})
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for round_ in range(args.runs + 1):
        for name, (cmd, env) in cases.items():
            sample = _run(cmd, env)
            if round_:
                samples[name].append(sample)
    floor = statistics.mean(cpu for cpu, _ in samples["python -c pass"])
    for name, values in samples.items():
        cpu = statistics.mean(c for c, _ in values)
        wall = statistics.median(w for _, w in values)
        extra = "" if name == "python -c pass" else f", {(cpu - floor) * 1e3:6.1f} ms over it"
        print(f"{name}: CPU mean {cpu * 1e3:6.1f} ms{extra}; wall p50 {wall * 1e3:6.1f} ms "
              f"({len(values)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
