"""Bit-exact round trips through ckptd.save / ckptd.load and the box reader."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from fmt_helpers import ALL_DTYPES, assert_bits_equal, assert_tree_equal, box_in, random_bits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptd
from ckptd.format import CheckpointWriter, LayoutError, MetadataError, Run, ShardBox
from ckptd.format.writer import report_from_json, report_to_json
from ckptd.storage import LocalStore

DTYPE_IDS = [str(d).removeprefix("torch.") for d in ALL_DTYPES]


def _save_load(state: dict[str, Any], root: Path, target: Any = None, **save_kw: Any) -> Any:
    ckptd.save(state, str(root), step=1, **save_kw)
    target = {} if target is None else target
    assert ckptd.load(target, str(root)) == 1
    return target


# ---------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
def test_every_logical_dtype_round_trips_bit_exactly(dtype: torch.dtype, tmp_path: Path) -> None:
    state = {
        "multi_chunk": random_bits((37, 29), dtype, seed=1),  # many inner chunks, clipped edges
        "scalar": random_bits((), dtype, seed=2),
        "empty": random_bits((0, 5), dtype, seed=3),
        "empty3": random_bits((3, 0, 2), dtype, seed=4),
        "vector": random_bits((1,), dtype, seed=5),
    }
    if dtype.is_floating_point:
        # NaNs with distinct payloads and signs, infinities and signed zeros, set explicitly
        state["specials"] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0]).to(dtype)
    fresh = _save_load(state, tmp_path, chunk_bytes=64)  # materialised as new tensors
    assert set(fresh) == set(state)
    for k, v in state.items():
        assert_bits_equal(fresh[k], v, k)

    # in place into preallocated tensors of the same dtype
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    ids = {k: id(v) for k, v in target.items()}
    assert ckptd.load(target, str(tmp_path)) == 1
    for k, v in state.items():
        assert id(target[k]) == ids[k]
        assert_bits_equal(target[k], v, k)


def test_nan_payloads_survive(tmp_path: Path) -> None:
    payloads = torch.tensor(
        [0x7FF8000000000001, 0x7FF0000000000001, -0x0008000000000001, 0x7FFFFFFFFFFFFFFF], dtype=torch.int64
    )
    f64 = payloads.view(torch.float64)
    f32 = torch.tensor([0x7FC00001, 0x7F800001, -0x003FFFFF], dtype=torch.int32).view(torch.float32)
    bf16 = torch.tensor([0x7FC1, 0x7F81, -0x003F], dtype=torch.int16).view(torch.bfloat16)
    f16 = torch.tensor([0x7E01, 0x7C01, -0x01FF], dtype=torch.int16).view(torch.float16)
    e4m3 = torch.tensor([0x7F, 0xFF], dtype=torch.uint8).view(torch.float8_e4m3fn)
    e5m2 = torch.tensor([0x7D, 0xFE, 0x7F], dtype=torch.uint8).view(torch.float8_e5m2)
    state = {"f64": f64, "f32": f32, "bf16": bf16, "f16": f16, "e4m3": e4m3, "e5m2": e5m2}
    out = _save_load(state, tmp_path)
    for k, v in state.items():
        assert torch.isnan(v.float()).all(), k
        assert_bits_equal(out[k], v, k)


# ---------------------------------------------------------------------- views and layouts


def test_non_contiguous_sources(tmp_path: Path) -> None:
    base = torch.arange(6 * 8 * 5, dtype=torch.float32).reshape(6, 8, 5)
    state = {
        "transposed": base.transpose(0, 2),
        "strided": base[::2, 1::3],
        "expanded": torch.arange(4.0).reshape(4, 1).expand(4, 7),
        "narrow": base.narrow(1, 2, 3),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "bf16_t": base.bfloat16().permute(2, 0, 1),
    }
    for v in state.values():
        assert not v.is_contiguous() or v.dim() == 4
    out = _save_load(state, tmp_path, chunk_bytes=48)
    for k, v in state.items():
        assert_bits_equal(out[k], v.contiguous(), k)


def test_load_into_non_contiguous_destination(tmp_path: Path) -> None:
    src = random_bits((5, 6), torch.float32, seed=9)
    ckptd.save({"w": src}, str(tmp_path), step=1)
    big = torch.full((6, 10), -1.0)
    view = big[:, ::2].T  # (5, 6), non-contiguous, shares storage with `big`
    assert not view.is_contiguous()
    state = {"w": view}
    ckptd.load(state, str(tmp_path))
    assert state["w"] is view
    assert_bits_equal(big[:, ::2].T.contiguous(), src)
    assert (big[:, 1::2] == -1.0).all()  # untouched columns


def test_shape_mismatch_is_a_layout_error(tmp_path: Path) -> None:
    ckptd.save({"w": torch.ones(4, 5), "nested": {"b": torch.ones(3)}}, str(tmp_path), step=1)
    for bad in (
        {"w": torch.zeros(5, 4)},
        {"w": torch.zeros(4, 5, 1)},
        {"w": torch.zeros(())},
        {"nested": {"b": torch.zeros(4)}},
    ):
        with pytest.raises(LayoutError):
            ckptd.load(bad, str(tmp_path))


# ---------------------------------------------------------------------- state trees


def test_nested_state_with_json_values(tmp_path: Path) -> None:
    state: dict[str, Any] = {
        "ints": {0: torch.ones(2), 1: {"x": 3}, -7: "neg", 10**15: None},
        "tuple": (1, "two", torch.arange(3), (4.5, None)),
        "list": [[], [1, [2, [3]]], {"k": torch.zeros(1, dtype=torch.bool)}],
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 1e-310, 1.7976931348623157e308],
        "misc": {"none": None, "true": True, "false": False, "big": 2**70, "str": "ünïcødé\n\x00"},
        "odd keys": {
            "a/b": 1,
            "..": 2,
            ".": 3,
            "": 4,
            "c": 5,
            "zarr.json": 6,
            "manifest.json": 7,
            "\u2603": torch.ones(1),
            "$ckptd": 8,
            ".hidden": torch.zeros(2),
            "\x00": 9,
            ":colon": torch.ones(3),
            "+plus": 10,
            "=eq": 11,
            "@at": torch.zeros(1),
            ",comma": 12,
            "%": 13,
            "%25": 14,
        },
        "dtype": torch.bfloat16,
        "empty": {},
    }
    out = _save_load(state, tmp_path)
    assert_tree_equal(out, state)
    assert math.copysign(1.0, out["floats"][3]) == -1.0


def test_colliding_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MetadataError):
        ckptd.save({"d": {0: torch.ones(1), "0": torch.zeros(1)}}, str(tmp_path), step=1)
    with pytest.raises(MetadataError):
        ckptd.save({"d": {(1, 2): 3}}, str(tmp_path), step=1)  # tuple keys cannot be path segments
    with pytest.raises(MetadataError):
        ckptd.save({"x": object()}, str(tmp_path), step=1)
    assert Run(LocalStore(tmp_path)).steps() == []


def test_tied_tensors_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    w = random_bits((11, 4), torch.float32, seed=3)
    state = {"embed": {"weight": w}, "head": {"weight": w}, "other": w.clone()}
    m = ckptd.save(state, str(tmp_path), step=1)
    assert sorted(m.arrays) == ["embed/weight", "other"]
    fresh: dict[str, Any] = {}
    ckptd.load(fresh, str(tmp_path))
    assert fresh["head"]["weight"] is fresh["embed"]["weight"]
    assert fresh["other"] is not fresh["embed"]["weight"]
    assert_bits_equal(fresh["head"]["weight"], w)

    shared = torch.zeros(11, 4)
    in_place = {"embed": {"weight": shared}, "head": {"weight": shared}, "other": torch.zeros(11, 4)}
    ckptd.load(in_place, str(tmp_path))
    assert in_place["embed"]["weight"] is shared and in_place["head"]["weight"] is shared
    assert_bits_equal(shared, w)

    untied = {"embed": {"weight": torch.zeros(11, 4)}, "head": {"weight": torch.zeros(11, 4)}}
    ckptd.load(untied, str(tmp_path))
    assert_bits_equal(untied["head"]["weight"], w)
    with pytest.raises(LayoutError):
        ckptd.load({"head": {"weight": torch.zeros(4, 11)}}, str(tmp_path))


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(17, 8)
        self.lin = torch.nn.Linear(8, 17)
        self.norm = torch.nn.LayerNorm(8)
        self.lin.weight = self.emb.weight  # tied
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.norm(self.emb(x)))


def _train(model: _Net, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 17, (4, 5), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 17), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.count += 1


def test_module_and_optimizer_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    _train(model, opt, 3, seed=1)
    sched.step()
    ckptd.save({"model": model, "optim": opt, "sched": sched, "step": 3}, str(tmp_path), step=3)

    torch.manual_seed(123)
    model2 = _Net()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=7, gamma=0.1)
    params_before = [id(p) for p in model2.parameters()]
    state2: dict[str, Any] = {"model": model2, "optim": opt2, "sched": sched2}
    assert ckptd.load(state2, str(tmp_path)) == 3
    assert state2["model"] is model2 and state2["optim"] is opt2 and state2["step"] == 3
    assert [id(p) for p in model2.parameters()] == params_before  # loaded in place
    assert model2.lin.weight is model2.emb.weight  # still tied
    assert_tree_equal(model2.state_dict(), model.state_dict())
    assert_tree_equal(opt2.state_dict(), opt.state_dict())
    assert sched2.state_dict() == sched.state_dict()

    # training continues identically from the restored state
    _train(model, opt, 2, seed=5)
    _train(model2, opt2, 2, seed=5)
    assert_tree_equal(model2.state_dict(), model.state_dict())


# ---------------------------------------------------------------------- property-based: shapes, chunks, boxes


@st.composite
def _array_and_chunking(draw: st.DrawFn) -> tuple[tuple[int, ...], torch.dtype, int]:
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(ALL_DTYPES))
    chunk_bytes = draw(st.sampled_from([1, 7, 64, 300, 4 * 2**20]))
    return shape, dtype, chunk_bytes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_array_and_chunking(), data=st.data())
def test_any_box_of_any_array_reads_back(
    spec: tuple[tuple[int, ...], torch.dtype, int], data: st.DataObject
) -> None:
    shape, dtype, chunk_bytes = spec
    full = random_bits(shape, dtype, seed=len(shape) * 31 + sum(shape))
    with tempfile.TemporaryDirectory() as d:
        ckptd.save({"a": full}, d, step=0, chunk_bytes=chunk_bytes)
        reader = Run(LocalStore(d, fsync=False)).reader(0)
        assert_bits_equal(reader.read("a"), full)
        for _ in range(3):
            box = data.draw(box_in(shape))
            assert_bits_equal(reader.read("a", box), full[box.slices()].contiguous(), str(box))


@st.composite
def _writer_boxes(draw: st.DrawFn) -> tuple[tuple[int, ...], list[ShardBox]]:
    """An array shape and boxes that tile it: a product of arbitrary cuts per dimension."""
    ndim = draw(st.integers(1, 3))
    cuts: list[list[int]] = []
    for _ in range(ndim):
        size = draw(st.integers(1, 40))
        inner = draw(st.lists(st.integers(1, size), max_size=3, unique=True)) if size > 1 else []
        cuts.append(sorted({0, size, *[c for c in inner if c < size]}))
    boxes = []
    import itertools

    for idx in itertools.product(*(range(len(c) - 1) for c in cuts)):
        offset = tuple(cuts[d][i] for d, i in enumerate(idx))
        extent = tuple(cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(idx))
        boxes.append(ShardBox(offset, extent))
    return tuple(c[-1] for c in cuts), boxes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=_writer_boxes(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int8]),
    chunk_bytes=st.sampled_from([1, 16, 200, 4 * 2**20]),
    data=st.data(),
)
def test_many_writers_any_boxes(
    layout: tuple[tuple[int, ...], list[ShardBox]], dtype: torch.dtype, chunk_bytes: int, data: st.DataObject
) -> None:
    shape, boxes = layout
    full = random_bits(shape, dtype, seed=len(boxes))
    with tempfile.TemporaryDirectory() as d:
        run = Run(LocalStore(d, fsync=False))
        ckpt = run.prepare(7)
        reports = []
        for rank, box in enumerate(boxes):
            w = CheckpointWriter(ckpt, rank=rank, chunk_bytes=chunk_bytes, threads=1)
            w.add("x/arr", full[box.slices()], shape=shape, box=box, boxes=boxes)
            reports.append(report_from_json(report_to_json(w.finish())))
        run.commit(7, reports, state={"arr": {"$ckptd": "tensor", "path": "x/arr"}})
        assert run.verify(7) == []
        reader = run.reader(7)
        assert_bits_equal(reader.read("x/arr"), full)
        for _ in range(4):
            box = data.draw(box_in(shape))
            assert_bits_equal(reader.read("x/arr", box), full[box.slices()].contiguous(), str(box))
        out = torch.empty(shape, dtype=dtype)
        assert reader.read("x/arr", out=out) is out
        assert_bits_equal(out, full)
