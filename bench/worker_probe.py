"""msbd's worker with a timestamp at each phase of its launch (bench only, never the daemon's).

Spawned by `bench.launch` in place of `python -m msbd.vm`, with the same fd
map (`msbd.daemon.spawn.spawn_worker`). It wraps, without changing them, the
functions `msbd.vm.main.run` calls between its phases and writes
`phase NAME MONOTONIC` lines on fd 2 (the console pipe), then runs the real
worker main line. CLOCK_MONOTONIC is shared by every process, so the parent
can subtract its own spawn time.
"""

import time

T_START = time.monotonic()  # the first line of our code: the interpreter and site are up

import functools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402


def mark(name: str, when: float | None = None) -> None:
    os.write(2, f"phase {name} {time.monotonic() if when is None else when:.6f}\n".encode())


def before(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark(name)
        return fn(*args, **kwargs)
    return wrapper


def after(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        mark(name)
        return result
    return wrapper


def main() -> int:
    mark("interpreter", T_START)
    # As `python -m msbd.vm` does (msbd/vm/__main__.py) before msgspec is first imported.
    sys.modules.setdefault("typing_extensions", None)  # type: ignore[arg-type]
    from msbd.vm import fds, krun
    from msbd.vm import main as worker

    mark("imports")
    fds.close_other_fds = before("argparse", fds.close_other_fds)
    fds.check_status_fd = before("fds_closed", fds.check_status_fd)
    worker._read_spec = after("spec_read", before("fds_checked", worker._read_spec))  # type: ignore[attr-defined]
    krun.load = after("libkrun_loaded", krun.load)
    worker.configure = after("configured", worker.configure)
    return worker.run([])


if __name__ == "__main__":
    sys.exit(main())
