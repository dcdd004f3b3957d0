"""The Checkpointer at world size 1: bit-exact resume, tiers, retention, rollback, pool reuse."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from workload import assert_same, make, params, seed_all, train_step

import ckptd
from ckptd.engine.config import Retention, TierConfig
from ckptd.engine.policy import to_delete
from ckptd.format.rank_array import rank_chunk_key
from ckptd.format.run import Run, step_dir
from ckptd.storage import LocalStore
from tests.paths import shard_files


def _uninterrupted(n: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    state = make()
    seed_all(1)
    losses = [train_step(state) for _ in range(n)]
    return losses, params(state)


@pytest.mark.parametrize("lazy", [True, False])
def test_resume_is_bit_exact_after_a_crash(tmp_path: Path, lazy: bool) -> None:
    n, crash_at, every = 12, 10, 4
    ref_losses, ref_params = _uninterrupted(n)

    state = make()
    seed_all(1)
    ck = ckptd.Checkpointer(str(tmp_path / "run"), state=state, every=every, lazy=lazy)
    assert ck.restore() == 0
    losses = []
    for step in range(crash_at):
        losses.append(train_step(state))
        # no wait() here: with lazy=True the next optimizer step races the pending copies
        ck.step(step + 1, metrics={"loss": losses[-1]})
        if step + 1 == 8:
            ck.wait()  # step 8 reaches disk (a busy slow tier would otherwise skip it at close)
    ck.close()  # "crash": steps 9 and 10 are lost, the newest checkpoint is step 8
    assert losses == ref_losses[:crash_at]

    seed_all(99)  # a restarted process has other RNG states and other initial weights
    state = make(seed=5)
    with ckptd.Checkpointer(str(tmp_path / "run"), state=state, every=every, lazy=lazy) as ck:
        start = ck.restore()
        assert start == 8
        assert state["data"]["position"] == 8 * 16
        resumed = [train_step(state) for _ in range(start, n)]
    assert resumed == ref_losses[start:]
    assert_same(params(state), ref_params)


def test_memory_tier_rolls_back_in_process(tmp_path: Path) -> None:
    state = make()
    seed_all(1)
    with ckptd.Checkpointer(str(tmp_path / "run"), state=state, every=2, memory_keep=2) as ck:
        for step in range(4):
            train_step(state)
            ck.step(step + 1)
        at_4 = params(state)
        loss_5 = train_step(state)
        assert ck.rollback() == 4
        assert_same(params(state), at_4)
        assert train_step(state) == loss_5  # RNG states rolled back too


def test_restore_prefers_memory_and_falls_back_to_older_on_corruption(tmp_path: Path) -> None:
    state = make()
    seed_all(1)
    with ckptd.Checkpointer(str(tmp_path / "run"), state=state, every=1, keep_last=5) as ck:
        at: dict[int, dict[str, torch.Tensor]] = {}
        for step in range(3):
            train_step(state)
            ck.step(step + 1)
            ck.wait()
            at[step + 1] = params(state)
    run = ckptd.open_run(str(tmp_path / "run"))
    assert run.steps() == [1, 2, 3]
    # damage step 3: flip bytes of every shard of one array
    shards = shard_files(tmp_path / "run", 3, "model/0.weight")
    assert shards
    for f in shards:
        if f.is_file():
            raw = bytearray(f.read_bytes())
            raw[0] ^= 0xFF
            f.write_bytes(bytes(raw))
    fresh = make(seed=3)
    with ckptd.Checkpointer(str(tmp_path / "run"), state=fresh, every=1, keep_last=5) as ck:
        assert ck.restore() == 2
        assert any("step 3" in p for p in ck.restore_problems)
    assert_same(params(fresh), at[2])  # exactly step 2's values (the untouched state holds other ones)
    assert state["data"]["position"] == 3 * 16 and fresh["data"]["position"] == 2 * 16


def test_tiers_have_their_own_frequency_and_retention(tmp_path: Path) -> None:
    state = make()
    seed_all(1)
    fast = TierConfig(kind="local", uri=str(tmp_path / "fast"), every=1, retention=Retention(keep_last=2))
    with ckptd.Checkpointer(str(tmp_path / "slow"), state=state, every=4, keep_every=8, tiers=[fast]) as ck:
        for step in range(16):
            loss = train_step(state)
            ck.step(step + 1, metrics={"loss": loss})
            ck.wait()
    assert ckptd.open_run(str(tmp_path / "fast")).steps() == [15, 16]
    assert ckptd.open_run(str(tmp_path / "slow")).steps() == [8, 16]


def test_keep_best_by_metric_keeps_newest_too(tmp_path: Path) -> None:
    state = make()
    seed_all(1)
    losses = [5.0, 1.0, 4.0, 0.5, 3.0, 9.0]
    with ckptd.Checkpointer(str(tmp_path / "run"), state=state, every=1, keep_best=2, metric="loss") as ck:
        for step, loss in enumerate(losses):
            train_step(state)
            ck.step(step + 1, metrics={"loss": loss})
            ck.wait()
    assert ckptd.open_run(str(tmp_path / "run")).steps() == [2, 4, 6]


def test_retention_rules() -> None:
    steps = list(range(10, 110, 10))
    assert to_delete(steps, Retention()) == []
    assert to_delete(steps, Retention(keep_last=2)) == steps[:-2]
    assert to_delete(steps, Retention(keep_every=50, keep_last=1)) == [s for s in steps if s not in (50, 100)]
    metrics = {s: {"acc": float(s % 30)} for s in steps}
    kept = set(steps) - set(to_delete(steps, Retention(keep_best=1, metric="acc", mode="max"), metrics))
    assert kept == {100, 80}  # 20, 50 and 80 tie at 20.0: the newest wins; 100 is the newest overall
    assert to_delete([7], Retention(keep_last=1)) == []


def test_slow_tier_persists_the_newest_snapshot_instead_of_queueing(tmp_path: Path) -> None:
    """Saving every step to a slow tier skips intermediate snapshots; host memory stays bounded."""
    big = {"w": torch.randn(256, 1024)}
    with ckptd.Checkpointer(str(tmp_path / "run"), state=big, every=1, memory_keep=0) as ck:
        slow = ck.stores[0]
        persist = slow.persist

        def slow_persist(snap, key):  # type: ignore[no-untyped-def]
            time.sleep(0.3)
            persist(snap, key)

        slow.persist = slow_persist  # type: ignore[method-assign]
        for step in range(1, 11):
            big["w"].add_(1.0)
            ck.step(step)
            time.sleep(0.02)
        ck.wait()
        assert ck.pool.allocations <= ck.pool.max_slots == 3
    steps = ckptd.open_run(str(tmp_path / "run")).steps()
    assert steps[-1] == 10 and len(steps) < 10
    out = {"w": torch.zeros(256, 1024)}
    ckptd.load(out, str(tmp_path / "run"))
    assert torch.equal(out["w"], big["w"])


def test_pool_is_allocated_once_and_reused(tmp_path: Path) -> None:
    state = make()
    seed_all(1)
    with ckptd.Checkpointer(str(tmp_path / "run"), state=state, every=1, keep_last=1) as ck:
        for step in range(20):
            train_step(state)
            ck.step(step + 1)
        ck.wait()
        # the second snapshot grows the state once (Adam's moments appear after the first step)
        assert ck.pool.allocations <= ck.pool.max_slots + 1
        assert ck.pool.pin is torch.cuda.is_available()


def test_forced_save_and_errors_are_checkpoint_errors(tmp_path: Path) -> None:
    state = make()
    with ckptd.Checkpointer(str(tmp_path / "run"), state=state) as ck:
        assert ck.step(1) is False  # no policy: nothing is saved
        ck.save(1)
        ck.wait()
    assert ckptd.open_run(str(tmp_path / "run")).steps() == [1]
    with pytest.raises(ckptd.CheckpointError):
        ckptd.Checkpointer(str(tmp_path / "run"), state=state, every=0)
    with pytest.raises(ckptd.CheckpointError):
        ckptd.Checkpointer(str(tmp_path / "run"), state=state, keep_best=2)


def test_public_api_exports_the_checkpointer() -> None:
    for name in ("Checkpointer", "CheckpointerConfig", "Retention", "ShardSpec", "TierConfig"):
        assert name in ckptd.__all__
        assert getattr(ckptd, name) is getattr(ckptd.engine, name)


def test_a_damaged_rank_state_row_falls_back_to_the_older_checkpoint(tmp_path: Path) -> None:
    """Each rank's own state (its RNG) is part of its checkpoint: when the newest one's row fails
    its checksum, restore takes the older checkpoint, RNG included, and says why."""
    state = make()
    seed_all(1)
    rng_at: dict[int, torch.Tensor] = {}
    with ckptd.Checkpointer(str(tmp_path / "run"), state=state, every=1, keep_last=5) as ck:
        at: dict[int, dict[str, torch.Tensor]] = {}
        for step in range(3):
            train_step(state)
            rng_at[step + 1] = torch.get_rng_state()
            ck.step(step + 1)
            ck.wait()
            at[step + 1] = params(state)
    manifest = Run(LocalStore(tmp_path / "run")).manifest(3)
    assert manifest.rank_state == "array"
    row = tmp_path / "run" / step_dir(3) / rank_chunk_key(manifest.attempt, 0)
    raw = bytearray(row.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    row.write_bytes(bytes(raw))
    seed_all(7)
    fresh = make(seed=3)
    with ckptd.Checkpointer(str(tmp_path / "run"), state=fresh, every=1, keep_last=5) as ck:
        assert ck.restore() == 2
        assert any("step 3" in p for p in ck.restore_problems), ck.restore_problems
        assert torch.equal(torch.get_rng_state(), rng_at[2])
    assert_same(params(fresh), at[2])
    assert fresh["data"]["position"] == 2 * 16



def test_direct_io_checkpoints_restore_bit_exactly_and_stay_out_of_the_page_cache(tmp_path: Path) -> None:
    from tests.page_cache import MEMORY_FILESYSTEMS, fs_type, resident_fraction

    if fs_type(tmp_path) in MEMORY_FILESYSTEMS:
        pytest.skip(f"{tmp_path} is on {fs_type(tmp_path)}: its pages never leave memory")
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(1024, 1024))  # 4 MiB: a shard file written directly
    opt = torch.optim.SGD([w], lr=0.5)
    uri = str(tmp_path / "run")
    with ckptd.Checkpointer(uri, state={"w": w}, optimizers=[opt], every=1, memory_keep=0, direct_io=True,
                            handle_signals=False) as ck:
        ck.step(1)
        at_step_1 = w.detach().clone()
        w.sum().backward()
        opt.step()  # modifies w while step 1 may still be copying it (the lazy guard's job)
        ck.wait()
    shards = shard_files(uri, 1, "w")
    assert shards and all(p.stat().st_size >= 2**20 and resident_fraction(p) < 0.05 for p in shards)
    assert Run(LocalStore(uri)).verify(1) == []

    restored = torch.zeros(1024, 1024)
    with ckptd.Checkpointer(uri, state={"w": restored}, memory_keep=0, handle_signals=False) as ck:
        assert ck.restore() == 1
    assert torch.equal(restored, at_step_1) and not torch.equal(restored, w.detach())


def test_direct_io_is_for_local_tiers_only() -> None:
    with pytest.raises(ckptd.ConfigError, match="direct_io applies to local tiers only"):
        TierConfig.durable("s3://bucket/run", direct_io=True)
