"""Seeded fuzzing of real small checkpoints across every reader (see fuzz.py): only ``CheckpointError``
escapes, memory stays bounded, and no reader reads or writes outside the case directory.

The default run is a fixed budget of cases (~a minute on a shared 2-core machine); the ``slow``
campaign runs ten times as many. A failing case names its seed: ``run_case(template, tmp, seed)``
replays it. Seeds that once found a bug stay in ``REGRESSION_SEEDS``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from damaged import STEP
from fuzz import MAX_TRACED_BYTES, Outcome, mutate, run_case

from ckptd.format import Run
from ckptd.storage import LocalStore

CASES = 28
SLOW_CASES = 10 * CASES
REGRESSION_SEEDS: list[int] = []


def _check(outcome: Outcome) -> None:
    assert outcome.peak_bytes < MAX_TRACED_BYTES, outcome
    # verify is the tool users trust: whatever data a reader refuses, verify refuses too
    if "reader.read" in outcome.errors or "ckptd.load" in outcome.errors:
        assert "verify" in outcome.errors and "cli verify" in outcome.errors, outcome


def _campaign(template: Path, work: Path, seeds: range | list[int]) -> list[Outcome]:
    outcomes = [run_case(template, work, seed) for seed in seeds]
    for o in outcomes:
        _check(o)
    return outcomes


def test_fuzz_default_budget(template: Path, tmp_path: Path) -> None:
    outcomes = _campaign(template, tmp_path, [*REGRESSION_SEEDS, *range(CASES)])
    refused = sum(1 for o in outcomes if o.errors)
    assert refused >= len(outcomes) // 2, "the mutations rarely damage anything: the fuzzer is not biting"
    assert {o.target for o in outcomes} >= {"record", "page", "state"}


@pytest.mark.slow
def test_fuzz_campaign(template: Path, tmp_path: Path) -> None:
    _campaign(template, tmp_path, range(CASES, CASES + SLOW_CASES))


def test_cli_subprocess_on_fuzzed_checkpoints(template: Path, tmp_path: Path) -> None:
    """The console script on damaged checkpoints: a verdict or one error line, never a traceback."""
    import shutil

    # each start imports torch (seconds), so one: a shard with bytes appended
    for seed, args, status in ((11, ["verify", "--quiet"], 1),):
        case = tmp_path / f"case-{seed}"
        shutil.copytree(template, case)
        mutate(case, seed)
        done = subprocess.run([sys.executable, "-m", "ckptd", *args, str(case)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == status, (seed, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr


def test_undamaged_case_reads_clean(template: Path, tmp_path: Path) -> None:
    """The harness itself: the same readers on an undamaged copy raise nothing."""
    import shutil

    from fuzz import readers

    shutil.copytree(template, tmp_path / "case" / "run")
    for _name, read in readers(tmp_path / "case").items():
        read()  # any exception fails the test
    assert Run(LocalStore(tmp_path / "case" / "run")).verify(STEP) == []
