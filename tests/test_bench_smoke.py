"""The benchmarks at a tiny size, so they cannot rot: they finish and print their figures.

No timing is asserted: `--quick` figures mean nothing. The supervisord peer
is optional (bench/requirements.txt): without it the bench says the peer
part was not run, and the peer test here is skipped with that reason.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HAVE_SUPERVISOR = importlib.util.find_spec("supervisor") is not None

pytestmark = pytest.mark.slow

FIGURES = {
    "control": ["ping.seq.floor.p50", "ping.seq.msbd.p50", "ping.seq.msbd.rate",
                "ping.c16.msbd.rate", "ping.seq.msbd.server_cpu_per_call",
                "list.seq.msbd.p50", "list.c16.floor.rate",
                "ratio.ping.seq.msbd_p50_vs_floor"],
    "launch": ["launch.seq.python.p50", "launch.seq.python_S.p50", "launch.seq.worker.p50",
               "launch.seq.prespawned.p50", "launch.seq.msbd.p50", "launch.seq.msbd_warm.p50",
               "launch.seq.python_paired.p50", "ratio.launch.seq.msbd_warm_p50_vs_python",
               "launch.c8.msbd.rate", "launch.c8.msbd_nopool.rate",
               "launch.worker_cpu_until_waiting", "launch.seq.msbd.daemon_cpu_per_launch",
               "ratio.launch.seq.msbd_p50_vs_python",
               "breakdown.interpreter", "breakdown.imports", "breakdown.configured",
               "breakdown.daemon_share", "imports.worker_us"],
    "scale": ["scale.rss_per_sandbox", "scale.daemon_cpu_steady", "scale.list_8.p50",
              "idle.decided_late.p99", "idle.stopping_logged_late.p99", "idle.ended_late.p99",
              "idle.end_event_received_after_reap.p99", "idle.last_deadline_to_last_end_event",
              "idle.last_end_bound_without_daemon",
              "target.timers.late.p99",
              "reconcile.restart_delta", "reconcile.in_process"],
    "peer": ["ping.seq.supervisord.rate", "list.seq.supervisord.p50",
             "ratio.ping.seq.msbd_rate_vs_supervisord", "launch.seq.supervisord.p50",
             "launch.seq.supervisord_nowait.p50", "ratio.launch.c8.msbd_rate_vs_supervisord"],
}


@pytest.fixture(scope="module")
def bench_output(fakekrun: Path, busybox_root: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "bench.run", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def _printed(output: str) -> set[str]:
    return {line.split("=")[0].strip() for line in output.splitlines()
            if line.startswith("  ") and "=" in line and not line.lstrip().startswith("#")}


@pytest.mark.parametrize("benchmark", ["control", "launch", "scale"])
def test_each_benchmark_prints_its_figures(bench_output: str, benchmark: str) -> None:
    missing = set(FIGURES[benchmark]) - _printed(bench_output)
    assert not missing, bench_output


def test_everything_started_was_ended(bench_output: str) -> None:
    assert "all benchmarks done" in bench_output
    assert "cleanup: killed" not in bench_output, bench_output


def test_the_peer_part(bench_output: str) -> None:
    if not HAVE_SUPERVISOR:
        assert "the supervisord peer part was NOT run" in bench_output
        pytest.skip("supervisor is not installed: the supervisord peer part of the bench "
                    "was not run (pip install -r bench/requirements.txt)")
    missing = set(FIGURES["peer"]) - _printed(bench_output)
    assert not missing, bench_output


@pytest.mark.parametrize(("argv", "lines"), [
    (["bench.ping_inline", "--calls", "50"], ["task   server CPU per ping", "inline server CPU"]),
    (["bench.worker_imports", "--runs", "1", str(REPO)],
     ["python -c pass: CPU mean", f"worker of {REPO}: CPU mean"]),
])
def test_the_one_off_measurements_run(argv: list[str], lines: list[str]) -> None:
    """bench.ping_inline and bench.worker_imports (BENCHMARKS.md names them) still run."""
    out = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=300).stdout
    assert all(any(line.startswith(want) for line in out.splitlines()) for want in lines), out
