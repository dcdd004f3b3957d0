"""Full verification of a committed checkpoint: every shard, every chunk, every checksum.

Returns problems instead of raising on the first one, so ``ckptd verify`` can name
each corrupt or missing chunk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ckptd.format.boxes import cell_box
from ckptd.format.codecs import crc32c
from ckptd.format.errors import CheckpointError, LayoutError, MetadataError
from ckptd.format.manifest import ArrayRecord, Manifest, ShardRecord
from ckptd.format.shard import ShardGeometry, chunk_range, decode_index
from ckptd.format.store import Store
from ckptd.format.tree import check_skeleton
from ckptd.format.writer import shard_key
from ckptd.format.zarr_meta import ZARR_JSON, array_document, checkpoint_groups, root_attributes


@dataclass(frozen=True, slots=True)
class Problem:
    array: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def verify(
    store: Store,
    manifest: Manifest,
    *,
    threads: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[Problem]:
    """Check the state tree and every stored object of ``manifest`` in ``store`` (rooted at the
    checkpoint's data)."""
    jobs: list[Callable[[], list[Problem]]] = [lambda: _check_state(manifest)]
    jobs += [
        lambda g=g: _check_group_json(store, manifest, g)  # type: ignore[misc]
        for g in sorted(checkpoint_groups(manifest.arrays.values()))
    ]
    for a in manifest.arrays.values():
        for i, part in enumerate(a.parts):
            jobs.append(lambda a=a, i=i: _check_zarr_json(store, a, i))  # type: ignore[misc]
            if part.listed:
                for rec in part.shards:
                    jobs.append(lambda a=a, i=i, r=rec: _check_shard(store, a, i, r.coords, r))  # type: ignore[misc]
            else:
                for coords in part.cells():
                    jobs.append(lambda a=a, i=i, c=coords: _check_shard(store, a, i, c, None))  # type: ignore[misc]
    problems: list[Problem] = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for found in pool.map(lambda job: job(), jobs):
            problems.extend(found)
            if progress is not None:
                progress(1)
    return problems


def _check_state(manifest: Manifest) -> list[Problem]:
    """The state tree, walked by the code ``load`` restores it with: what load refuses, verify reports."""
    key = "state.json" if manifest.attempt else "manifest.json"

    def describe(path: str) -> object:
        if path not in manifest.arrays:
            raise LayoutError(f"the state refers to array {path!r}, which the checkpoint does not hold")
        return manifest.arrays[path]

    try:
        check_skeleton(manifest.state, describe)
    except CheckpointError as e:
        return [Problem("state tree", key, str(e))]
    return []


def _read_json(store: Store, array: str, key: str) -> tuple[object, list[Problem]]:
    try:
        return json.loads(store.read(key)), []
    except FileNotFoundError:
        return None, [Problem(array, key, "missing")]
    except (ValueError, RecursionError) as e:
        return None, [Problem(array, key, f"malformed Zarr metadata: {e}")]


def _check_zarr_json(store: Store, a: ArrayRecord, part_index: int) -> list[Problem]:
    """The array's zarr.json must say what the manifest says (shape, dtype, grid, codecs, attributes):
    plain zarr-python and tensorstore trust it, so a damaged one would silently misread the data."""
    key = f"{a.part_key(part_index)}/{ZARR_JSON}"
    doc, problems = _read_json(store, a.path, key)
    if problems:
        return problems
    if not isinstance(doc, dict):
        return [Problem(a.path, key, "malformed Zarr metadata: not a JSON object")]
    expected = json.loads(array_document(a, a.parts[part_index], part_index))
    wrong = sorted(k for k in expected if k != "attributes" and doc.get(k) != expected[k])
    attrs = doc.get("attributes")
    ours = attrs.get("ckptd") if isinstance(attrs, dict) else None
    want = expected["attributes"]["ckptd"]
    if not isinstance(ours, dict) or any(ours.get(k) != v for k, v in want.items()):
        wrong.append("attributes")
    if wrong:
        return [Problem(a.path, key, f"Zarr metadata disagrees with the manifest in {', '.join(wrong)}")]
    return []


def _check_group_json(store: Store, manifest: Manifest, group: str) -> list[Problem]:
    key = f"{group}/{ZARR_JSON}" if group else ZARR_JSON
    doc, problems = _read_json(store, group, key)
    if problems:
        return problems
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        return [Problem(group, key, "not a Zarr v3 group document")]
    attrs = doc.get("attributes")
    want = root_attributes(manifest.format_version, manifest.step)["ckptd"]
    if group == "" and (not isinstance(attrs, dict) or attrs.get("ckptd") != want):
        return [Problem(group, key, "root group attributes disagree with the manifest")]
    return []


def _check_shard(
    store: Store, a: ArrayRecord, part_index: int, coords: tuple[int, ...], rec: ShardRecord | None
) -> list[Problem]:
    """One shard object: its size (format v1 records it), index and every chunk's crc32c."""
    part = a.parts[part_index]
    key = f"{a.part_key(part_index)}/c" if a.kind == "scalar" else shard_key(a.part_key(part_index), coords)
    cell = cell_box(coords, part.grid, part.shape)
    geom = ShardGeometry(cell.offset, part.grid, part.chunks, part.shape)
    limit = rec.nbytes if rec is not None else (
        a.dtype.itemsize + 4 if a.kind == "scalar" else geom.max_nbytes(a.dtype.itemsize))
    try:
        (blob,) = store.read_ranges(key, [(0, limit + 1)])  # one bounded request
        if len(blob) > limit:
            return [Problem(a.path, key, f"more than {limit} bytes, larger than a shard of this array can "
                            "be (replaced or damaged)")]
    except FileNotFoundError:
        return [Problem(a.path, key, "missing")]
    except OSError as e:
        return [Problem(a.path, key, f"unreadable: {e}")]
    if rec is not None and len(blob) != rec.nbytes:
        return [
            Problem(
                a.path, key, f"size {len(blob)} bytes, manifest says {rec.nbytes} (truncated or replaced)"
            )
        ]
    if a.kind == "scalar":
        if len(blob) != a.dtype.itemsize + 4 or crc32c(blob[:-4]) != int.from_bytes(blob[-4:], "little"):
            return [Problem(a.path, key, "chunk c: crc32c mismatch")]
        return []
    data_nbytes = len(blob) - geom.index_nbytes
    if data_nbytes < 0:
        return [Problem(a.path, key, "smaller than its index")]
    mv = memoryview(blob)
    index_raw = mv[data_nbytes:]
    if rec is not None and crc32c(bytes(index_raw[:-4])) != rec.index_crc32c:
        return [Problem(a.path, key, "shard index: crc32c does not match the manifest")]
    problems: list[Problem] = []
    try:
        index = decode_index(index_raw, geom, key)
        full = 1
        for c in geom.chunk:
            full *= c
        for local in geom.all_chunks():
            if geom.chunk_box(local).is_empty():
                continue
            where = f"chunk {'/'.join(map(str, local)) or 'c'}"
            try:
                r = chunk_range(index, geom.flat_index(local), data_nbytes, key)
                if r is None:
                    problems.append(Problem(a.path, key, f"{where}: missing from the shard index"))
                    continue
                a.codec.decode(mv[r[0] : r[1]], full * a.dtype.itemsize, where)
            except CheckpointError as e:
                problems.append(Problem(a.path, key, str(e)))
    except (CheckpointError, MetadataError) as e:
        problems.append(Problem(a.path, key, str(e)))
    return problems
