"""Tiers that fail: a full disk (a real 1 MiB tmpfs), 503s and refused connections from the S3 endpoint.

The failure surfaces as a ``CheckpointError`` at the next ``step()``/``wait()``, and every
checkpoint committed before it stays intact and loadable.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd
from ckptd.engine.config import Retention, TierConfig


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _state(value: float) -> dict[str, Any]:
    return {"w": torch.full((64 * 1024,), value), "meta": {"value": value}}  # 256 KiB


def _train_until_error(ck: ckptd.Checkpointer, state: dict[str, Any], steps: int) -> int:
    with pytest.raises(ckptd.CheckpointError) as info:
        for step in range(1, steps + 1):
            state["w"].fill_(float(step))
            state["meta"]["value"] = float(step)
            ck.step(step)
            ck.wait()
    return int(info.value is not None)


def _intact(uri: str, opts: dict[str, Any] | None = None) -> list[int]:
    run = ckptd.open_run(uri, opts)
    steps = run.steps()
    for s in steps:
        out: dict[str, Any] = {}
        ckptd.load(out, uri, step=s, storage_options=opts)
        assert torch.equal(out["w"], torch.full((64 * 1024,), float(s)))
        assert out["meta"]["value"] == float(s)
        assert run.verify(s) == []
    return steps


def test_full_disk_raises_at_next_step_and_keeps_earlier_checkpoints(tiny_disk: Path) -> None:
    state = _state(0.0)
    ck = ckptd.Checkpointer(str(tiny_disk / "run"), state=state, every=1, handle_signals=False)
    try:
        _train_until_error(ck, state, steps=20)
    finally:
        ck.close()
    steps = _intact(str(tiny_disk / "run"))
    assert 1 <= len(steps) < 20
    assert ckptd.open_run(str(tiny_disk / "run")).uncommitted() == []  # the failed attempt was cleaned up


def test_full_fast_tier_does_not_stop_the_other_tiers(tiny_disk: Path, tmp_path: Path) -> None:
    state = _state(0.0)
    fast = TierConfig(kind="local", uri=str(tiny_disk / "run"), every=1, retention=Retention())
    errors = 0
    with ckptd.Checkpointer(str(tmp_path / "big"), state=state, every=1, tiers=[fast]) as ck:
        for step in range(1, 9):
            state["w"].fill_(float(step))
            state["meta"]["value"] = float(step)
            try:
                ck.step(step)
                ck.wait()
            except ckptd.CheckpointError as e:
                assert "disk full" in str(e) or "No space" in str(e)
                errors += 1
    assert errors >= 1
    assert _intact(str(tmp_path / "big")) == list(range(1, 9))
    _intact(str(tiny_disk / "run"))


@pytest.mark.s3
# refused connections in `make test-slow` only: botocore's retries make each variant take ~20 s here
@pytest.mark.parametrize("mode", ["503", pytest.param("refuse", marks=pytest.mark.slow)])
def test_s3_errors_raise_at_next_step_and_keep_earlier_checkpoints(flaky_s3: Any, mode: str) -> None:
    proxy, url, opts = flaky_s3
    state = _state(0.0)
    with ckptd.Checkpointer(url, state=state, every=1, storage_options=opts, handle_signals=False) as ck:
        for step in (1, 2):
            state["w"].fill_(float(step))
            state["meta"]["value"] = float(step)
            ck.step(step)
            ck.wait()
        proxy.mode = mode
        state["w"].fill_(3.0)
        ck.step(3)
        with pytest.raises(ckptd.CheckpointError):
            ck.wait()
        proxy.mode = "ok"
        state["w"].fill_(4.0)
        state["meta"]["value"] = 4.0
        ck.step(4)  # the tier recovers: the next save succeeds
        ck.wait()
    assert _intact(url, opts) == [1, 2, 4]
