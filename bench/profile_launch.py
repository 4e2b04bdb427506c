"""Where a warm launch's time goes in the daemon: msbd under cProfile, warm-pool launches.

    .venv/bin/python -m bench.profile_launch [--launches N] [--top K] [--out FILE]

Starts `python -m cProfile -o FILE -m msbd.cli serve` (the libkrun test double,
the default warm pool), makes N sequential `sandbox.run` calls, each once the
pool's workers wait for their spec (as `launch.seq.msbd_warm` does), stops the
daemon (cProfile writes FILE at exit) and prints the functions of msbd's
own modules by cumulative time, then the top K of all by their own time.
cProfile sees the event loop's thread only (the database thread's work shows
as the time the loop waited for it); coroutines are counted per step.
"""

from __future__ import annotations

import argparse
import pstats
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.common import Msbd, make_rootfs, need_fakekrun, sandbox_spec, scratch
from bench.launch import POOL, wait_pool_warm


class ProfiledMsbd(Msbd):
    """The bench's daemon, run under cProfile."""

    def __init__(self, base: Path, out: Path, *, libkrun: Path,
                 settings: Mapping[str, Any]) -> None:
        super().__init__(base, libkrun=libkrun, settings=settings)
        self.out = out

    def argv(self) -> list[str]:
        python, *rest = super().argv()
        return [python, "-m", "cProfile", "-o", str(self.out), *rest]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_launch")
    p.add_argument("--launches", type=int, default=40)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("/tmp/msbd-launch.prof"))
    args = p.parse_args()
    with scratch("profile") as base:
        rootfs = make_rootfs(base)
        msbd = ProfiledMsbd(base / "msbd", args.out, libkrun=need_fakekrun(),
                            settings={"max_sandboxes": 100_000}).start()
        try:
            with msbd.client() as c:
                c.call("sandbox.run", sandbox_spec("warm-up", rootfs))
                for i in range(args.launches):
                    wait_pool_warm(msbd, POOL)
                    c.call("sandbox.run", sandbox_spec(f"p{i}", rootfs))
        finally:
            msbd.stop()
    stats = pstats.Stats(str(args.out))
    print(f"# {args.launches} warm launches; per launch = cumtime / {args.launches + 1}")
    stats.sort_stats("cumulative").print_stats(r"msbd/(daemon|db|rpc)/", args.top)
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
