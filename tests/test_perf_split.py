"""bench.perf_split: reading `perf script` text back and counting it by role.

The bench's burst profile (BENCHMARKS.md §3) rests on this split; a sample
put under the wrong role would move CPU between the daemon and the workers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.perf_split import Pids, parse, split

SCRIPT = """\
swapper     0 \n\tffffffff821f4dab pv_native_safe_halt
\tffffffff821f68b5 default_idle

python   100 \n\tffffffff81000001 d_walk
\tffffffff81000002 do_waitid
\t7f0000000001 [unknown]

python   201 \n\tffffffff81000003 unmap_page_range
\tffffffff81000004 exit_mmap
\tffffffff81000005 do_exit

python   202 \n\tffffffff81000004 exit_mmap
\tffffffff81000005 do_exit

sleep   301 \n\tffffffff81000005 do_exit

kworker/0:0H-kb    10 \n\tffffffff81000006 worker_thread

python   150 \n\t7f0000000002 _PyEval_EvalFrameDefault
"""

PIDS = Pids(daemon=100, workers=frozenset({201, 202}), guests=frozenset({301}),
            others=frozenset({150}))


def test_each_sample_keeps_its_process_and_call_chain() -> None:
    got = [(s.comm, s.pid, s.stack) for s in parse(SCRIPT)]
    assert got[0] == ("swapper", 0, ["pv_native_safe_halt", "default_idle"])
    assert got[1] == ("python", 100, ["d_walk", "do_waitid", "[unknown]"])
    assert got[5] == ("kworker/0:0H-kb", 10, ["worker_thread"])  # a comm with a slash and a dash
    assert len(got) == 7


def test_samples_are_counted_by_role_against_the_busy_ones() -> None:
    lines = split(parse(SCRIPT), PIDS, top=3)
    assert lines[0].startswith("# perf: 7 samples on every CPU, 6 not idle")
    shares = {line.split("%", 1)[1].strip(): line.split("%", 1)[0].strip()
              for line in lines[1:6]}
    assert shares == {"daemon": "16.7", "workers": "33.3", "guests": "16.7",
                      "other under the daemon": "16.7", "the rest of the machine": "16.7"}


def test_the_workers_functions_are_leaf_then_inclusive() -> None:
    lines = split(parse(SCRIPT), PIDS, top=3)
    start = lines.index("# workers: 2 samples, by the function they were in:")
    leaf = lines[start + 1:start + 3]
    assert sorted(leaf) == sorted(["   50.0%  unmap_page_range", "   50.0%  exit_mmap"])
    inclusive = lines[start + 4:start + 6]
    assert sorted(inclusive) == ["  100.0%  do_exit", "  100.0%  exit_mmap"]
    assert "# daemon: 1 samples, by the function they were in:" in lines
