"""The W4 data set's size and time origin, shared by the ckptd and MLflow sides of the benchmark."""

from datetime import UTC, datetime

RUNS, PER_RUN = 100, 100
"""100 runs of 100 checkpoints: 10,000 checkpoints (BENCHMARKS.md, W4)."""
T0 = datetime(2026, 1, 1, tzinfo=UTC)
