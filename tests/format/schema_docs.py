"""The shipped JSON Schemas of format v2 and the documents of a committed checkpoint to check with them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import zarr

from ckptd.format.run import step_dir
from tests.paths import meta_path

FORMAT = Path(__file__).resolve().parents[2] / "format"
SCHEMA_FILES = {
    "record": FORMAT / "manifest.schema.json",
    "page": FORMAT / "schemas" / "table-page.schema.json",
    "state": FORMAT / "schemas" / "state.schema.json",
    "rank": FORMAT / "schemas" / "rank-state.schema.json",
}
VALIDATORS = {kind: jsonschema.Draft202012Validator(json.loads(p.read_text()))
              for kind, p in SCHEMA_FILES.items()}


def errors(kind: str, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATORS[kind].iter_errors(doc)]


def committed_documents(root: Path, step: int) -> list[tuple[str, str, Any]]:
    """``(kind, file, document)`` of every metadata document of a committed format v2 checkpoint."""
    record_file = root / step_dir(step) / "manifest.json"
    docs: list[tuple[str, str, Any]] = [("record", str(record_file), json.loads(record_file.read_bytes()))]
    meta = meta_path(root, step)
    docs += [("page", str(p), json.loads(p.read_bytes())) for p in sorted((meta / "tables").glob("*.json"))]
    docs.append(("state", str(meta / "state.json"), json.loads((meta / "state.json").read_bytes())))
    ranks = meta / "ranks"
    docs += [("rank", str(p), json.loads(p.read_bytes())) for p in sorted(ranks.glob("r-*.json"))]  # older v2
    if (ranks / "zarr.json").exists():  # the rank-state array, read by zarr-python: row r = rank r's document
        rows = zarr.open_array(str(ranks), mode="r")
        docs += [("rank", f"{ranks}[{r}]", json.loads(np.asarray(rows[r]).tobytes().rstrip(b"\0")))
                 for r in range(rows.shape[0]) if (ranks / "c" / str(r) / "0").exists()]
    return docs


def assert_valid(root: Path, step: int) -> list[str]:
    """Every document of the checkpoint validates; returns the kinds seen."""
    docs = committed_documents(root, step)
    for kind, file, doc in docs:
        assert errors(kind, doc) == [], (file, errors(kind, doc))
    return [kind for kind, _, _ in docs]
