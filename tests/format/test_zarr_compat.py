"""Every array of a committed checkpoint opens with plain zarr-python in its global shape,
with the same data; bf16/fp8 come back exactly by reinterpreting the stored bits."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
import zarr.storage
from fmt_helpers import ALL_DTYPES, assert_bits_equal, random_bits

from ckptd.format import CheckpointWriter, CodecSpec, Manifest, Run, ShardBox
from ckptd.format.run import step_dir
from ckptd.storage import open_store
from tests.paths import data_path

STEP = 3


def _from_stored(arr: np.ndarray, logical: str) -> torch.Tensor:
    """What a user without ckptd does: take the stored bits and view them as the logical dtype."""
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        arr = arr.view(f"<i{arr.dtype.itemsize}")
    t = torch.from_numpy(np.array(arr, order="C", copy=True))
    return t.view(getattr(torch, logical))


def _build(uri: str, opts: dict[str, Any] | None) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """A checkpoint with every dtype, several shards and chunks, 3 writers, pieces, codecs, 0-d, empty."""
    run = Run(open_store(uri, opts))
    ckpt = run.prepare(STEP)
    expected: dict[str, torch.Tensor] = {}
    writers = [CheckpointWriter(ckpt, rank=r, chunk_bytes=256, threads=2) for r in range(3)]
    for i, dt in enumerate(ALL_DTYPES):
        name = str(dt).removeprefix("torch.")
        full = random_bits((21, 10), dt, seed=i)
        boxes = [ShardBox((0, 0), (7, 10)), ShardBox((7, 0), (7, 10)), ShardBox((14, 0), (7, 10))]
        for r, b in enumerate(boxes):
            writers[r].add(f"dtypes/{name}", full[b.slices()], shape=full.shape, box=b, boxes=boxes)
        expected[f"dtypes/{name}"] = full
        expected[f"scalars/{name}"] = random_bits((), dt, seed=100 + i)
        writers[0].add(f"scalars/{name}", expected[f"scalars/{name}"])
    # irregular boxes that force pieces
    pieces = random_bits((3001, 2), torch.bfloat16, seed=7)
    pboxes = [ShardBox((0, 0), (1, 2)), ShardBox((1, 0), (1700, 2)), ShardBox((1701, 0), (1300, 2))]
    for r, b in enumerate(pboxes):
        writers[r].add("irregular/pieces", pieces[b.slices()], shape=pieces.shape, box=b, boxes=pboxes)
    expected["irregular/pieces"] = pieces
    expected["empty"] = torch.zeros(0, 4)
    writers[1].add("empty", expected["empty"])
    reports = [w.finish() for w in writers]
    # compressed codecs
    for spec in ("zstd:3", "blosc-zstd:1:byte", "blosc-lz4:5:bit"):
        w = CheckpointWriter(ckpt, rank=3, codec=CodecSpec.parse(spec), chunk_bytes=1024)
        t = torch.randn(40, 33).bfloat16()
        path = f"codecs/{spec.replace(':', '_')}"
        w.add(path, t)
        expected[path] = t
        reports.append(w.finish())
    state = {k: {"$ckptd": "tensor", "path": k} for k in expected}
    m = run.commit(STEP, reports, state={"t": state}, world_size=4)
    assert m.arrays["irregular/pieces"].kind == "pieces"
    assert m.format_version == 2 and m.arrays["dtypes/float32"].parts[0].ncells == 3
    return m, expected


def _check_group(group: zarr.Group, m: Manifest, expected: dict[str, torch.Tensor]) -> None:
    assert group.attrs["ckptd"]["step"] == STEP
    for path, rec in m.arrays.items():
        node = group[path]
        if rec.kind == "pieces":
            assert isinstance(node, zarr.Group), path
            assembled = torch.zeros(rec.shape, dtype=rec.dtype.torch_dtype)
            for i in range(len(rec.parts)):
                piece = node[f"piece-{i:05d}"]
                assert isinstance(piece, zarr.Array)
                meta = piece.attrs["ckptd"]
                assert meta["global_shape"] == list(rec.shape) and meta["piece"] == i
                box = ShardBox(tuple(meta["offset"]), tuple(piece.shape))
                assembled[box.slices()] = _from_stored(piece[...], meta["logical_dtype"])
            assert_bits_equal(assembled, expected[path], path)
            continue
        assert isinstance(node, zarr.Array), path
        assert node.shape == rec.shape, path
        meta = node.attrs["ckptd"]
        assert meta["logical_dtype"] == rec.dtype.name and meta["global_shape"] == list(rec.shape)
        assert np.dtype(node.dtype) == np.dtype(rec.dtype.storage), path
        assert_bits_equal(_from_stored(node[...], meta["logical_dtype"]), expected[path], path)


def test_plain_zarr_opens_every_array_locally(tmp_path: Path) -> None:
    m, expected = _build(str(tmp_path), None)
    group = zarr.open_group(str(data_path(tmp_path, STEP)), mode="r")
    _check_group(group, m, expected)
    # partial reads through zarr-python's own sharding codec
    node = group["dtypes/bfloat16"]
    assert_bits_equal(_from_stored(node[5:16, 3:9], "bfloat16"), expected["dtypes/bfloat16"][5:16, 3:9])


def test_bf16_bits_reinterpreted_by_hand(tmp_path: Path) -> None:
    # The acceptance check spelled out: uint16 bits viewed as bfloat16 are the saved values.
    w = torch.tensor([[1.0, -2.5, float("inf")], [3.140625, -0.0, float("nan")]], dtype=torch.bfloat16)
    import ckptd

    ckptd.save({"w": w}, str(tmp_path), step=STEP)
    arr = zarr.open_group(str(data_path(tmp_path, STEP)), mode="r")["w"]
    assert arr.dtype == np.uint16 and arr.shape == (2, 3)
    assert_bits_equal(torch.from_numpy(arr[...].view(np.int16)).view(torch.bfloat16), w)


def test_hierarchy_lists_every_array(tmp_path: Path) -> None:
    m, _ = _build(str(tmp_path), None)
    group = zarr.open_group(str(data_path(tmp_path, STEP)), mode="r")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arrays = {path for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
    # The data group (the committed attempt) holds nothing but Zarr nodes: zarr-python has no
    # complaint (format v1 kept manifest.json at the group root, which it warned about).
    assert not caught, [str(w.message) for w in caught]
    expected = {p for p, a in m.arrays.items() if a.kind != "pieces"}
    expected |= {
        f"{p}/piece-{i:05d}" for p, a in m.arrays.items() if a.kind == "pieces" for i in range(len(a.parts))
    }
    assert arrays == expected


@pytest.mark.s3
def test_plain_zarr_opens_every_array_on_s3(s3_url: str, s3_storage_options: dict[str, Any]) -> None:
    m, expected = _build(s3_url, s3_storage_options)
    store = zarr.storage.FsspecStore.from_url(
        f"{s3_url}/{step_dir(STEP)}/{m.attempt}", storage_options=s3_storage_options, read_only=True
    )
    _check_group(zarr.open_group(store=store, mode="r"), m, expected)
