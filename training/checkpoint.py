"""The trainer's checkpoints: ``ckptd.Checkpointer`` over the canonical state of every layout.

What is saved is what the state-dict adapter calls canonical (``model/<name>``,
``optim/exp_avg/<name>``, ``optim/exp_avg_sq/<name>``, ``optim/step``): every rank writes
the boxes it owns, with their layouts, so a job of *any* other layout (tp, pp, dp, ZeRO
stage) restores by reading exactly its own new boxes. Per-rank RNG states travel with the
Checkpointer; the data position follows from the step (samples are keyed by global index).

Three facts shape this module:

* The engine restores by walking the state tree of the checkpoint (rank 0's tree), so every
  rank's tree lists **every** canonical tensor: the ones a rank does not hold (other
  pipeline stages) are empty boxes it neither writes nor reads. Then any layout's tree
  matches any other's.
* Saving reads live views of the optimizer's fp32 state, copied in the background; the
  optimizer's step pre-hook waits for those copies (the only place training blocks besides
  ``step()`` itself). Restoring reads into fresh CPU tensors and hands them to
  ``adapter.from_canonical``, which also refreshes the compute weights of the new layout.
* ``ZeroAdamW`` is not part of the state tree (its tensors are, as canonical views), so it is
  passed to the Checkpointer explicitly (``optimizers=[...]``) to get the pre-step hook.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from ckptd.engine import Checkpointer, ShardSpec
from ckptd.format.boxes import ShardBox
from ckptd.format.errors import LayoutError
from ckptd.training.adapter import STEP_PATH, CanonicalSpec, GPTStateAdapter
from ckptd.training.mesh import ParallelContext
from ckptd.training.zero import ZeroAdamW

Catalog = dict[str, tuple[tuple[int, ...], torch.dtype]]


def canonical_catalog(specs: Mapping[str, CanonicalSpec], ctx: ParallelContext) -> Catalog:
    """Every canonical tensor of the model (path -> global shape, dtype), whichever rank holds it.

    Collective over the world: each rank knows only its pipeline stage's tensors.
    """
    mine = [(path, list(s.shape), str(s.dtype).removeprefix("torch.")) for path, s in specs.items()]
    parts: list[Any] = [mine]
    if ctx.world_group is not None:
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, mine, group=ctx.world_group)
    out: Catalog = {}
    for part in parts:
        for path, shape, dtype in part:
            entry = (tuple(int(n) for n in shape), getattr(torch, dtype))
            if out.setdefault(path, entry) != entry:
                raise LayoutError(f"{path}: ranks disagree on its shape or dtype: {out[path]}, {entry}")
    return dict(sorted(out.items()))


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optim/exp_avg/x": t}`` -> ``{"optim": {"exp_avg": {"x": t}}}``: the tree's paths are the keys."""
    root: dict[str, Any] = {}
    for path, value in flat.items():
        *dirs, leaf = path.split("/")
        node = root
        for d in dirs:
            node = node.setdefault(d, {})
        node[leaf] = value
    return root


class TrainerCheckpoint:
    """One rank's checkpointing of a :class:`~ckptd.training.trainer.Trainer`'s state.

    ``uri`` is the run root; ``every`` the interval in steps (0: only on SIGTERM/SIGUSR1 and
    :meth:`save`). Further keywords go to :class:`ckptd.Checkpointer`. Construction is
    collective (every rank of the job, at the same point).
    """

    def __init__(
        self, adapter: GPTStateAdapter, optimizer: ZeroAdamW, uri: str, *, every: int = 0, **options: Any
    ) -> None:
        self.adapter, self.optimizer = adapter, optimizer
        self.specs = adapter.specs()
        self.catalog = canonical_catalog(self.specs, adapter.ctx)
        self.shards: dict[str, ShardSpec] = {}
        for path, (shape, _dtype) in self.catalog.items():
            spec = self.specs.get(path)
            if spec is None:  # another pipeline stage's tensor: an empty box, never written
                nothing = (0,) * len(shape)
                self.shards[path] = ShardSpec(shape=shape, box=ShardBox(nothing, nothing), write=False)
            else:
                self.shards[path] = ShardSpec(
                    shape=spec.shape, box=spec.box, layout=spec.layout, mesh=dict(adapter.mesh),
                    write=spec.writer,
                )  # fmt: skip
        self._step = torch.zeros((), dtype=torch.int64)
        """``optim/step`` as a tensor the snapshot can copy (the optimizer keeps a Python int)."""
        self.state: dict[str, Any] = {}
        # No host-memory tier by default: the trainer never rolls back in process, and each
        # snapshot slot is a full copy of this rank's state.
        options.setdefault("memory_keep", 0)
        # The optimizer's tensors are in the state only as canonical views, so it is passed
        # explicitly: the Checkpointer's pre-step hook then guards its lazy snapshots.
        self.ckpt = Checkpointer(uri, state=self.state, every=every or None, layouts=self.shards,
                                 optimizers=[self.optimizer], **options)
        self._show(self._live())
        self._hook_wait_seen = 0.0
        self.last_block_s = 0.0
        """What the last :meth:`step` returned (also set when it raised)."""

    # ---------------------------------------------------------------- state tree
    def _box_tensor(self, path: str) -> torch.Tensor:
        """A new CPU tensor of this rank's box of ``path`` (empty for tensors it does not hold)."""
        return torch.zeros(self.shards[path].box.shape, dtype=self.catalog[path][1])

    def _live(self) -> dict[str, torch.Tensor]:
        """Views of the live optimizer state (the save path), empty boxes for the rest."""
        views = {path: ct.data for path, ct in self.adapter.to_canonical().items()}
        views[STEP_PATH] = self._step
        return {path: views[path] if path in views else self._box_tensor(path) for path in self.catalog}

    def _show(self, flat: Mapping[str, torch.Tensor]) -> None:
        # The Checkpointer keeps a reference to ``self.state``: replace its contents, never the dict.
        self.state.clear()
        self.state.update(_nest(flat))

    # ---------------------------------------------------------------- restore
    def restore(self) -> int | None:
        """Load the newest committed checkpoint into this layout; its step, or None when there is none.

        Collective. Each rank reads only its own boxes of the canonical tensors (whatever layout
        wrote them), then the adapter fills the ZeRO shards and refreshes the compute weights.
        """
        fresh = {path: self._box_tensor(path) for path in self.catalog}
        self._show(fresh)
        try:
            saved_step = self.ckpt.restore()
            if saved_step == 0:  # nothing committed (the trainer never saves step 0)
                return None
            self._check_model(saved_step)
            self.adapter.from_canonical({path: fresh[path] for path in self.specs})
        finally:
            self._show(self._live())
        return self.optimizer.step_count

    def _check_model(self, step: int) -> None:
        """A checkpoint of another model would load silently wrong (missing tensors keep zeros, a
        larger array yields a sub-box): refuse it, naming the options that likely differ."""
        if not self.ckpt.stores:
            return
        arrays = self.ckpt.stores[0].run.manifest(step).arrays
        missing = [p for p in self.catalog if p not in arrays]
        wrong = [p for p in self.catalog if p in arrays and arrays[p].shape != self.catalog[p][0]]
        if missing or wrong:
            raise LayoutError(
                f"checkpoint step {step} in {self.ckpt.config.uri} is not of this model: missing "
                f"{missing[:3]}, other shapes {wrong[:3]} (same --layers/--width/--heads/--vocab/--untied?)"
            )

    # ---------------------------------------------------------------- save
    def step(self, step: int, *, loss: float | None = None) -> float:
        """Step boundary (after optimizer step ``step``): snapshot if due. Returns the seconds training
        was blocked for checkpoints since the last call: this call plus the optimizer pre-step
        hook's waits for background copies (CPU; on CUDA that wait is on the GPU, not the host).

        After SIGTERM the checkpoint is made durable and ``SystemExit(143)`` is raised (by the
        Checkpointer, on every rank at the same step).
        """
        self._step.fill_(self.optimizer.step_count)
        hooked = self.ckpt.stager.hook_wait_s - self._hook_wait_seen
        t0 = time.perf_counter()
        try:
            self.ckpt.step(step, metrics=None if loss is None else {"loss": loss})
        finally:
            self._hook_wait_seen = self.ckpt.stager.hook_wait_s
            self.last_block_s = hooked + time.perf_counter() - t0
        return self.last_block_s

    def save(self, step: int) -> None:
        """Snapshot now unless ``step`` is the last one saved (end of a run); durable when the block exits."""
        if self.ckpt.last_saved != step:
            self._step.fill_(self.optimizer.step_count)
            self.ckpt.save(step)

    def close(self) -> None:
        self.ckpt.close()

    def __enter__(self) -> TrainerCheckpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Waits until the last snapshot is durable (also after the SIGTERM SystemExit).
        self.ckpt.__exit__(exc_type, exc, tb)
