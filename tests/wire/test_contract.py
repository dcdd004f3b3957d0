"""The wire contract is one rule on both sides of the seam: whatever the engine's metric filter
keeps, the catalog's schema accepts, and whatever it drops, the schema would have refused."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ckptd.api.schemas import CheckpointCreate, CheckpointUpdate
from ckptd.wire.contract import MAX_ERROR_CHARS, MAX_METRICS, clean_metrics

names = st.one_of(st.text(max_size=210), st.from_regex(r"[A-Za-z0-9_.\-/]{1,200}", fullmatch=True))
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**53), 2**53), st.booleans(), st.none()
)


def schema_accepts(metrics: dict[str, object]) -> bool:
    try:
        CheckpointCreate.model_validate({"step": 1, "metrics": metrics})
    except ValidationError:
        return False
    return True


@given(name=names, value=values)
def test_engine_keeps_exactly_what_the_catalog_accepts(name: str, value: object) -> None:
    kept = clean_metrics({name: value})
    if kept:
        assert kept == {name: float(value)}  # type: ignore[arg-type]
        assert schema_accepts(kept)
    elif not isinstance(value, bool):  # a bool is a number to JSON but not a metric to the engine
        assert not schema_accepts({name: value})


def test_nan_and_bad_names_are_dropped_not_the_whole_registration() -> None:
    got = clean_metrics({"loss": math.nan, "eval/ppl": 3, "bad name": 1.0, "acc": math.inf, "lr": 1e-4})
    assert got == {"eval/ppl": 3.0, "lr": 1e-4}


def test_too_many_metrics_are_cut_to_what_the_catalog_takes() -> None:
    metrics = {f"m{i}": float(i) for i in range(MAX_METRICS + 20)}
    kept = clean_metrics(metrics)
    assert len(kept) == MAX_METRICS and schema_accepts(kept)
    assert not schema_accepts(metrics)


def test_error_text_limit_is_the_schema_limit() -> None:
    CheckpointUpdate.model_validate({"state": "failed", "error": "x" * MAX_ERROR_CHARS})
    with pytest.raises(ValidationError):
        CheckpointUpdate.model_validate({"state": "failed", "error": "x" * (MAX_ERROR_CHARS + 1)})
