"""msbd's benchmarks: every figure is printed with its ratio to a baseline measured in the same run.

`python -m bench.run [--quick]` runs them all; see BENCHMARKS.md for what each
one measures and the figures of a full run.
"""
