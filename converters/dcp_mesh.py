"""Import a DCP checkpoint already laid out for a mesh (``ckptd import --from dcp DIR URI --mesh dp=4``).

A plain DCP import keeps DCP's chunks as the writer boxes: a job restoring at another layout
reads parts of several shards per tensor. With a mesh, the imported checkpoint is cut for that
mesh instead, so each rank of a trainer at that mesh reads exactly one shard per tensor.

What a mesh means for a DCP array. DCP's metadata records where chunks lie, not which mesh axes
made them, so ckptd cannot know a tensor's parallel layout and treats every array alike:

- an array of at least one dimension whose dim 0 has at least as many rows as the mesh has
  ranks is cut into row blocks along dim 0 by every mesh axis, in the order given: the first
  axis splits dim 0, the next splits each of those blocks, and so on. That is ``Shard(0)`` on
  every mesh dimension (DTensor placements ``(Shard(0), Shard(0), ...)``); with one axis it is
  the row block each rank of ``fully_shard`` holds. Splits use ceil division, as ``torch.chunk``
  and DTensor do, so the last blocks may be short or empty. Where an inner axis does not divide
  its blocks evenly (10 rows at ``dp=2,tp=2``: 3, 2, 3, 2) the blocks form no regular grid and
  the storage plan refines it (format/SPEC.md §5): still correct, but a rank reads several
  smaller shards;
- anything else (a 0-dim tensor, dim 0 shorter than the mesh has ranks) is stored whole,
  written once and recorded as replicated over every mesh axis.

The manifest records these layouts and the mesh (``world_size`` is its product). Any layout can
still read the checkpoint (the format stores canonical tensors); only the shard grid changes.

How: the DCP directory is first imported as it is into a scratch run in a temporary directory
(``scratch_dir``, default the system's, e.g. ``$TMPDIR``; it needs room for one copy of the
checkpoint), then resharded from there by the same chunk streamer ``ckptd convert`` uses. Memory
stays bounded in both passes: ``memory_bytes`` (plus the largest DCP chunk) while importing,
``threads`` chunks of ``chunk_bytes`` while cutting. Nothing is committed on failure: the scratch
run is always deleted and a failed destination attempt is removed.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptd.converters.outputs import attempt_discarded_on_failure
from ckptd.converters.reshard import write_arrays
from ckptd.format.errors import CheckpointExistsError, LayoutError, UnsafeNameError
from ckptd.format.layout import TensorLayout
from ckptd.format.manifest import Manifest
from ckptd.format.names import check_segment
from ckptd.format.plan import DEFAULT_CHUNK_BYTES
from ckptd.format.reader import CheckpointReader
from ckptd.format.run import Run
from ckptd.storage import open_store


def mesh_layout(shape: tuple[int, ...], mesh: Mapping[str, int]) -> TensorLayout:
    """The layout a DCP array gets at ``mesh``: dim 0 split by every axis in turn, or one replicated box."""
    world = math.prod(mesh.values())
    if shape and shape[0] >= world:
        return TensorLayout(partition=(tuple(mesh), *(() for _ in shape[1:])))
    return TensorLayout(replicated=tuple(mesh))


def check_mesh(mesh: Mapping[str, int]) -> dict[str, int]:
    """``mesh`` as a dict of named axes and positive sizes, or a ``LayoutError``."""
    if not mesh:
        raise LayoutError("the mesh names no axis: give at least one, e.g. dp=4")
    for axis, size in mesh.items():
        try:
            check_segment(axis)  # axis names go into the manifest's layouts
        except UnsafeNameError as e:
            raise LayoutError(f"mesh axis {axis!r} is not a usable name: {e}") from e
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise LayoutError(f"mesh axis {axis}={size!r} must be a positive integer")
    return dict(mesh)


def import_dcp_for_mesh(
    src: str | Path,
    uri: str,
    *,
    step: int,
    mesh: Mapping[str, int],
    overwrite: bool = False,
    memory_bytes: int,
    storage_options: dict[str, Any] | None = None,
    scratch_dir: str | Path | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int = 8,
) -> Manifest:
    """Save the DCP checkpoint in ``src`` as checkpoint ``step`` of run ``uri``, laid out for ``mesh``."""
    from ckptd.converters.dcp_import import import_dcp  # it delegates here: import at call time

    mesh = check_mesh(mesh)  # before any work: a bad mesh leaves nothing behind
    dst = Run(open_store(uri, storage_options))
    if dst.is_committed(step) and not overwrite:  # fail before the long first pass
        raise CheckpointExistsError(f"step {step} is already committed in {dst.url}")
    with tempfile.TemporaryDirectory(prefix="ckptd-dcp-import-", dir=scratch_dir) as scratch:
        import_dcp(src, scratch, step=step, memory_bytes=memory_bytes)
        staged = _laid_out(Run(open_store(scratch)), step, mesh, threads)
        # the destination's committed step (with overwrite) goes only once the source has imported
        out_store = dst.prepare(step, overwrite=overwrite)
        with attempt_discarded_on_failure(dst, step):
            reports, _ = write_arrays(staged, out_store, mesh, None, chunk_bytes, None, threads)
            return dst.commit(step, reports, state=staged.manifest.state, world_size=math.prod(mesh.values()),
                              mesh=mesh, metadata=dict(staged.manifest.metadata))


def _laid_out(run: Run, step: int, mesh: Mapping[str, int], threads: int) -> CheckpointReader:
    """A reader of the scratch import whose arrays carry the layouts ``mesh_layout`` gives them, which
    the reshard streamer then cuts to."""
    m = run.manifest(step)
    arrays = {path: dataclasses.replace(a, layout=mesh_layout(a.shape, mesh)) for path, a in m.arrays.items()}
    return CheckpointReader(run.data_store(step, m), dataclasses.replace(m, arrays=arrays), threads=threads)
