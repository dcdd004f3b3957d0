"""The synchronous convenience API: ``ckptd.save`` and ``ckptd.load``.

One process writes (or reads) a whole state. The asynchronous, multi-rank engine
(``ckptd.Checkpointer``) is built from the same pieces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckptd.engine.dtensor_state import LocalState, restore_boxes, save_sharded
from ckptd.format.codecs import CodecSpec
from ckptd.format.errors import CheckpointNotFoundError
from ckptd.format.manifest import Manifest
from ckptd.format.plan import DEFAULT_CHUNK_BYTES
from ckptd.format.run import Run
from ckptd.format.tree import flatten
from ckptd.format.writer import CheckpointWriter
from ckptd.storage import open_store


def open_run(uri: str, storage_options: dict[str, Any] | None = None) -> Run:
    return Run(open_store(uri, storage_options))


def save(
    state: Mapping[str, Any],
    uri: str,
    *,
    step: int,
    codec: CodecSpec | str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    threads: int = 4,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``state`` as the committed checkpoint ``step`` under the run root ``uri``.

    ``state`` is a nested mapping of tensors (any device; GPU tensors are copied to the
    host), JSON-able values and objects with ``state_dict()``. Returns once the
    checkpoint is durable and committed; a failure leaves earlier checkpoints untouched.

    A state holding DTensors (``model.state_dict()`` under FSDP2 or tensor parallelism) is
    saved by every rank of the job together: each writes the boxes it owns, rank 0 commits.
    """
    run = open_run(uri, storage_options)
    spec = CodecSpec.parse(codec) if isinstance(codec, str) else codec
    local = LocalState(state)  # DTensors (FSDP2, tensor parallel): every rank writes its own boxes
    if local.has_dtensors:
        return save_sharded(local, run, step=step, codec=spec, chunk_bytes=chunk_bytes, metadata=metadata,
                            overwrite=overwrite, threads=threads)
    skeleton, tensors = flatten(local.view)
    ckpt_store = run.prepare(step, overwrite=overwrite)
    try:
        writer = CheckpointWriter(ckpt_store, codec=spec, chunk_bytes=chunk_bytes, threads=threads)
        for path, tensor in tensors.items():
            writer.add(path, tensor)
        report = writer.finish()
        return run.commit(step, [report], state=skeleton, metadata=metadata)
    finally:
        run.abandon(step)  # a failed attempt stays for gc; a committed one needs no lease


def load(
    state: Any,
    uri: str,
    *,
    step: int | None = None,
    threads: int = 8,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Load a committed checkpoint into ``state`` in place and return its step.

    Tensors in ``state`` are filled in place (their shapes must match); entries that
    ``state`` lacks are added (new CPU tensors, JSON values); objects with
    ``load_state_dict`` receive their filled state dict. ``step=None`` loads the latest.
    DTensors of any mesh and placements are filled in place: each rank reads only its box.
    """
    run = open_run(uri, storage_options)
    if step is None:
        step = run.latest()
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {uri}")
    local = LocalState(state)  # DTensors are filled in place, each rank reading only its own box
    if local.has_dtensors:
        restore_boxes(run.reader(step, threads=threads), local, threads=threads)
    else:
        run.reader(step, threads=threads).restore(state)
    return step
