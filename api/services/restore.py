"""Restore plans: for every rank of a target (tp, pp, dp) mesh, the arrays and boxes it reads.

The catalog touches no data: it applies :meth:`ckptd.format.layout.TensorLayout.box_for` to the
layout metadata the checkpoint registered, with the *target* mesh — the same function a reader
in the target layout runs for itself. Ranks are numbered row-major over ``pp, dp, tp`` (tensor
parallel innermost, as Megatron and torchtitan place it); each rank's coordinates are part of the
plan so that a caller with another convention can match them. Mesh axes of the source layout
that are not ``tp``/``pp``/``dp`` (``ep``, ...) have size 1 in the target.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy.orm import Session

from ckptd.api.errors import ConflictError, InvalidRequestError
from ckptd.api.models import Checkpoint
from ckptd.api.schemas import ArrayRead, Box, LocationPublic, RankPlan, RestorePlan
from ckptd.api.services.checkpoints import get_checkpoint
from ckptd.api.uris import TIERS, array_uri
from ckptd.format.errors import LayoutError, MetadataError
from ckptd.format.layout import TensorLayout, mesh_coords

RANK_ORDER = ("pp", "dp", "tp")
MAX_PLAN_ENTRIES = 25_000
"""Ranks x arrays beyond which the caller must ask for one rank at a time: about 50 MB of plan
objects and JSON at the peak (one rank of the largest layout the catalog accepts fits)."""


def persistent_sources(ckpt: Checkpoint) -> list[LocationPublic]:
    """The checkpoint's locations a separate process can read, fastest tier first."""
    order = {t: i for i, t in enumerate(TIERS)}
    locs = sorted((loc for loc in ckpt.locations if loc.tier != "memory"), key=lambda loc: order[loc.tier])
    return [LocationPublic(tier=loc.tier, uri=loc.uri, created_at=loc.created_at) for loc in locs]  # type: ignore[arg-type]


ParsedArray = tuple[str, str, list[int], TensorLayout, float]
"""(array path, path it is stored under, global shape, layout, bytes per element)."""


def restore_plan(
    session: Session, *, checkpoint_id: int, tp: int, pp: int, dp: int, rank: int | None = None
) -> RestorePlan:
    ckpt = get_checkpoint(session, checkpoint_id=checkpoint_id)
    sources = _restorable_sources(ckpt)
    assert ckpt.layout is not None  # checked by _restorable_sources
    arrays: dict[str, dict[str, Any]] = ckpt.layout.get("arrays", {})
    world = pp * dp * tp
    _check_plan_size(rank, world, len(arrays))
    source_mesh: dict[str, int] = {str(k): int(v) for k, v in ckpt.layout.get("mesh", {}).items()}
    target: dict[str, int] = {"pp": pp, "dp": dp, "tp": tp}
    for axis in source_mesh:
        target.setdefault(axis, 1)
    parsed = _parse_arrays(ckpt.id, arrays, target)
    order = [*RANK_ORDER, *sorted(a for a in target if a not in RANK_ORDER)]
    ranks: range | list[int] = [rank] if rank is not None else range(world)
    plans = [_rank_plan(r, target, order, parsed, arrays, sources[0].uri) for r in ranks]
    return RestorePlan(
        checkpoint_id=ckpt.id,
        run=ckpt.run.name,
        step=ckpt.step,
        source_mesh=source_mesh,
        target_mesh=target,
        rank_order=order,
        sources=sources,
        ranks=plans,
    )


def _restorable_sources(ckpt: Checkpoint) -> list[LocationPublic]:
    """The persistent locations of a committed checkpoint with layout metadata (409 otherwise)."""
    if ckpt.state != "committed":
        raise ConflictError(
            f"checkpoint {ckpt.id} is {ckpt.state}; only committed checkpoints can be restored"
        )
    if ckpt.layout is None:
        raise ConflictError(f"checkpoint {ckpt.id} registered no layout metadata; sync it from its manifest")
    sources = persistent_sources(ckpt)
    if not sources:
        raise ConflictError(
            f"checkpoint {ckpt.id} has no persistent location (only in a training process's memory)"
        )
    return sources


def _check_plan_size(rank: int | None, world: int, arrays: int) -> None:
    if rank is not None and not 0 <= rank < world:
        raise InvalidRequestError(f"rank {rank} is outside the target world of {world} ranks")
    # sized from numbers alone, before one rank's plan is built (tp=pp=dp=1024 is 2**30 ranks)
    planned = 1 if rank is not None else world
    if planned * max(1, arrays) > MAX_PLAN_ENTRIES:
        raise InvalidRequestError(
            f"{planned} ranks x {arrays} arrays is too large a plan (at most {MAX_PLAN_ENTRIES} "
            "reads); ask for one rank at a time with ?rank="
        )


def _parse_arrays(
    checkpoint_id: int, arrays: dict[str, dict[str, Any]], target: dict[str, int]
) -> list[ParsedArray]:
    """Each array's layout, parsed once; mesh axes its partition names join ``target`` (size 1)."""
    parsed: list[ParsedArray] = []
    for path, spec in sorted(arrays.items()):
        try:
            layout = TensorLayout.from_json(spec.get("layout") or {"partition": []})
        except (MetadataError, LayoutError) as e:
            raise ConflictError(
                f"array {path!r} of checkpoint {checkpoint_id} has unusable layout metadata: {e}"
            ) from e
        shape = [int(s) for s in spec.get("shape", [])]
        numel = math.prod(shape)
        itemsize = (int(spec.get("nbytes", 0)) / numel) if numel else 0.0
        stored = layout.alias_of or path  # tied weights are stored once, under the array they alias
        for axes in layout.partition:
            for axis in axes:
                target.setdefault(axis, 1)
        parsed.append((path, stored, shape, layout, itemsize))
    return parsed


def _rank_plan(
    r: int,
    target: dict[str, int],
    order: list[str],
    parsed: list[ParsedArray],
    arrays: dict[str, dict[str, Any]],
    base: str,
) -> RankPlan:
    """What rank ``r`` of the target mesh reads: one box per array it holds a part of."""
    coords = mesh_coords(target, r, order)
    reads: list[ArrayRead] = []
    for path, stored, shape, layout, itemsize in parsed:
        try:
            box = layout.box_for(shape, target, coords)
        except LayoutError as e:
            raise ConflictError(f"array {path!r} cannot be laid out on mesh {target}: {e}") from e
        if box.is_empty():
            continue
        reads.append(
            ArrayRead(
                array=path,
                uri=array_uri(base, stored),
                dtype=str(arrays[path].get("dtype", "")),
                shape=shape,
                box=Box(offset=list(box.offset), shape=list(box.shape)),
                nbytes=round(box.numel * itemsize),
            )
        )
    return RankPlan(rank=r, coords=coords, reads=reads, nbytes=sum(x.nbytes for x in reads))
