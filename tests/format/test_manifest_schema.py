"""The JSON Schemas shipped beside SPEC.md (format/manifest.schema.json, format/schemas/*.json) agree with
the parser: every document ckptd writes (ckptd.save, the engine, the converters) validates; hostile
documents the parser refuses are refused by the schema wherever JSON Schema can say why (the rest are
listed, with the reason); and valid edge cases pass both."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from damaged import STEP
from schema_docs import SCHEMA_FILES, assert_valid, committed_documents, errors
from test_hostile_commit_records import CASES, Case, _nothing, apply

import ckptd
from ckptd.converters.dcp_import import import_dcp
from ckptd.converters.hf import import_safetensors
from ckptd.converters.reshard import reshard
from ckptd.format import CheckpointError, Run
from ckptd.format.layout import FusedSplit, TensorLayout
from ckptd.format.run import step_dir
from ckptd.storage import LocalStore

# ------------------------------------------------------------------ real documents validate


def test_schemas_are_valid_draft_2020_12_and_linked_from_spec() -> None:
    import jsonschema

    spec = (SCHEMA_FILES["record"].parent / "SPEC.md").read_text()
    for kind, path in SCHEMA_FILES.items():
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))
        rel = path.relative_to(SCHEMA_FILES["record"].parent).as_posix()
        assert f"]({rel})" in spec, f"SPEC.md does not link {rel} ({kind})"


def test_ckptd_save_documents_validate(root: Path) -> None:
    """The shared fixture: two writers, zstd, pieces and a 0-d array."""
    assert assert_valid(root, STEP) == ["record", "page", "state"]


def test_every_state_tag_and_edge_case_validates(tmp_path: Path) -> None:
    w = torch.arange(6.0).reshape(2, 3)
    state = {"model": {"w": w, "tied": w, "empty": torch.zeros(0, 4), "zero_d": torch.tensor(2.5)},
             "opt": {0: {"lr": 1e-3}, 1: (1, "two", None)}, "$ckptd": "a user key",
             "floats": [float("nan"), float("inf"), -0.0], "dtype": torch.bfloat16}
    ckptd.save(state, str(tmp_path / "run"), step=3, codec="blosc-lz4:5:bit", metadata={"tags": ["a"]})
    assert_valid(tmp_path / "run", 3)
    ckptd.save({"x": 1}, str(tmp_path / "none"), step=0)  # no arrays: no table pages
    assert assert_valid(tmp_path / "none", 0) == ["record", "state"]


def test_engine_documents_validate(tmp_path: Path) -> None:
    """The engine's commit (rank objects with RNG state, engine metadata, layouts with a mesh)."""
    state = {"model": torch.nn.Linear(4, 3).state_dict(), "step": 0}
    with ckptd.Checkpointer(str(tmp_path / "run"), state=state, every=1, memory_keep=0) as ck:
        ck.step(1, metrics={"loss": 0.5})
    kinds = assert_valid(tmp_path / "run", 1)
    assert kinds[:1] == ["record"] and "page" in kinds and "state" in kinds
    assert kinds.count("rank") == 1  # rank 0's row of the rank-state array (its RNG states)


def test_converter_documents_validate(root: Path, tmp_path: Path) -> None:
    """reshard (layouts over a new mesh, converted_from metadata), safetensors and DCP imports."""
    src = Run(LocalStore(root))
    reshard(src, Run(LocalStore(tmp_path / "resharded")), mesh={"tp": 2, "dp": 3}, codec=None)
    assert_valid(tmp_path / "resharded", STEP)
    from safetensors.torch import save_file

    tensors = {"a/b": torch.ones(3, 2), "c": torch.zeros(5, dtype=torch.int8)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    import_safetensors(tmp_path / "x.safetensors", str(tmp_path / "st"), step=1)
    assert_valid(tmp_path / "st", 1)
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # dcp.save without a process group says it assumes one process
        warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
        dcp.save({"m": {"w": torch.randn(4, 4), "n": 3}}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    import_dcp(tmp_path / "dcp", str(tmp_path / "fromdcp"), step=2)
    assert_valid(tmp_path / "fromdcp", 2)


# ------------------------------------------------------------------ hostile documents

# Refused by the parser for reasons JSON Schema cannot state: relations between values or documents,
# byte sizes, what storage holds, or JSON-level details a validator never sees.
PARSER_ONLY = {
    "record oversize": "a byte size limit",
    "attempt of nothing": "what storage holds",
    "step is a float": "JSON Schema counts 5.0 as the integer 5",
    "step disagrees with directory": "the directory name",
    "totals disagree with the pages": "a sum across members",
    "no table pages": "a sum across members (totals.arrays is 4)",
    "table entry first after last": "an order between members",
    "table pages out of order": "an order between entries",
    "table page pinned wrong": "a checksum of another document",
    "table page size pinned wrong": "the size of another document",
    "state pinned wrong": "a checksum of another document",
    "page of another attempt": "a value of another document",
    "page numbered as another page": "the file name",
    "page lacks an array of its entry": "the record's table entry",
    "page holds an array outside its entry": "the record's table entry",
    "huge shape": "a product of dimensions",
    "part shape disagrees": "a relation between shapes",
    "chunks do not divide shards": "divisibility between arrays",
    "pieces leave a gap": "a tiling",
    "grid disagrees with stored shards": "what storage holds",
    "state of another attempt": "a value of another document",
    "NaN in state": "NaN is not JSON; the parser refuses it before any schema applies",
    "deep state": "a nesting depth (the validator itself recurses)",
    "state refers to a missing array": "the array tables",
}
PARSED_CASES = [c for c in CASES if c.verbatim is None]  # the verbatim ones damage seals and JSON syntax


def _documents(root: Path) -> list[tuple[str, Any]]:
    record_file = root / step_dir(STEP) / "manifest.json"
    record = json.loads(record_file.read_bytes())
    if not isinstance(record, dict) or not isinstance(record.get("attempt"), str) or "/" in record["attempt"]:
        return [("record", record)]
    meta = record_file.parent / f"{record['attempt']}.meta"
    if not meta.is_dir():  # the record names another attempt: its own documents are what a reader checks
        meta = next(record_file.parent.glob("a-*.meta"))
    docs = [("record", record)]
    docs += [("page", json.loads(p.read_bytes())) for p in sorted((meta / "tables").glob("*.json"))]
    return [*docs, ("state", json.loads((meta / "state.json").read_bytes()))]


@pytest.mark.parametrize("case", PARSED_CASES, ids=[c.name for c in PARSED_CASES])
def test_schema_refuses_what_the_parser_refuses(root: Path, case: Case) -> None:
    apply(root, case)
    with pytest.raises(CheckpointError):  # the parser (or a reader behind it) refuses the checkpoint
        run = Run(LocalStore(root))
        run.manifest(STEP)
        ckptd.load({}, str(root))
        for path in run.manifest(STEP).arrays:
            run.reader(STEP).read(path)
    if case.name == "deep state":
        pytest.skip(PARSER_ONLY[case.name])
    found = [e for kind, doc in _documents(root) for e in errors(kind, doc)]
    if case.name in PARSER_ONLY:
        assert found == [], f"{case.name}: listed as parser-only, but the schema refuses it: {found}"
    else:
        assert found, f"{case.name}: the parser refuses it, the schema accepts it"


def test_parser_only_list_names_real_cases() -> None:
    assert set(PARSER_ONLY) <= {c.name for c in CASES}


# ------------------------------------------------------------------ valid edge cases pass both


def _edit_page(mutate: Any) -> Case:
    def m(docs: dict[str, Any]) -> None:
        mutate(docs["pages"][0]["arrays"])

    return Case("edge", m, CheckpointError)


def _layout(arrays: dict[str, Any]) -> None:
    layout = TensorLayout(partition=(("tp",), ()), replicated=("dp",), padded=((0, 16),),
                          fused=FusedSplit(fused="wqkv", dim=0, index=0, sizes=(12, 4)),
                          alias_of="zstd/x", extra={"vpp": 2, "ckptd.model": {"n_heads": 4}})
    arrays["w"]["layout"] = layout.to_json()


VALID_EDGES: list[tuple[str, Case]] = [
    ("as written", Case("unchanged", _nothing, CheckpointError)),
    ("no mesh or metadata members",
     Case("opt", lambda d: [d["record"].pop("mesh"), d["record"].pop("metadata")], CheckpointError)),
    ("storage dtype and nbytes omitted",
     _edit_page(lambda a: [a["w"].pop("storage_dtype"), a["w"].pop("nbytes")])),
    ("layout with every member", _edit_page(_layout)),
    ("layout null", _edit_page(lambda a: a["w"].__setitem__("layout", None))),
    ("mesh with odd but legal axis names", Case("mesh", lambda d: d["record"].__setitem__(
        "mesh", {"tp": 1, "%2F": 2, "a.b-c_d": 3}), CheckpointError)),
    ("large totals", Case("totals", lambda d: d["record"]["totals"].__setitem__("stored_bytes", 2**62),
                          CheckpointError)),
]


@pytest.mark.parametrize(("name", "case"), VALID_EDGES, ids=[v[0] for v in VALID_EDGES])
def test_valid_edge_cases_pass_parser_and_schema(root: Path, name: str, case: Case) -> None:
    apply(root, case)
    run = Run(LocalStore(root))
    m = run.manifest(STEP)
    assert m.arrays["w"].shape == (12, 10)
    assert ckptd.load({}, str(root)) == STEP
    for kind, doc in _documents(root):
        assert errors(kind, doc) == [], (name, kind, errors(kind, doc))
    assert [k for k, _, _ in committed_documents(root, STEP)] == ["record", "page", "state"]
