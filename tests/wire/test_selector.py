"""The selector grammar (``ckptd.wire.selector``): a table of accepted and rejected texts, and
properties over generated ones."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptd.wire.selector import (
    MAX_STEP,
    Alias,
    Best,
    Latest,
    SelectorError,
    Step,
    is_reserved,
    parse_selector,
)

ACCEPTED = [
    ("latest", Latest()),
    ("best:loss", Best("loss", "min")),
    ("best:loss:min", Best("loss", "min")),
    ("best:val/acc:max", Best("val/acc", "max")),
    ("best:eval.ppl-2_x", Best("eval.ppl-2_x", "min")),
    ("step:0", Step(0)),
    ("step:00042", Step(42)),
    (f"step:{MAX_STEP}", Step(MAX_STEP)),
    (7, Step(7)),
    ("golden", Alias("golden")),
    ("Latest", Alias("Latest")),  # case matters: only "latest" is reserved
    ("stepx:3", Alias("stepx:3")),
]

REJECTED = [
    ("", "an empty selector"),
    ("best:", "must be best:<metric>"),
    ("best:loss:maxx", "must be best:<metric>"),
    ("best:loss:", "must be best:<metric>"),
    ("best:a b", "must be best:<metric>"),
    ("best:" + "m" * 201, "must be best:<metric>"),
    ("step:", "non-negative integer"),
    ("step:-1", "non-negative integer"),
    ("step:1.5", "non-negative integer"),
    ("step: 5", "non-negative integer"),
    ("step:\u0665", "non-negative integer"),  # an Arabic-Indic digit: isdigit() but not ASCII
    ("step:" + "9" * 20, "non-negative integer"),
    (f"step:{MAX_STEP + 1}", "steps go up to"),
    (-1, "a step cannot be negative"),
    (MAX_STEP + 1, "steps go up to"),
    (True, "a selector is"),
    (1.0, "a selector is"),
]


@pytest.mark.parametrize(("text", "expected"), ACCEPTED)
def test_accepted(text: str | int, expected: object) -> None:
    assert parse_selector(text) == expected


@pytest.mark.parametrize(("text", "message"), REJECTED)
def test_rejected_with_a_message(text: object, message: str) -> None:
    with pytest.raises(SelectorError, match=message) as err:
        parse_selector(text)  # type: ignore[arg-type]
    assert isinstance(err.value, ValueError)


metrics = st.from_regex(r"[A-Za-z0-9_.\-/]{1,200}", fullmatch=True)
selectors = st.one_of(
    st.just(Latest()),
    st.builds(Best, metrics, st.sampled_from(["min", "max"])),
    st.builds(Step, st.integers(min_value=0, max_value=MAX_STEP)),
    st.builds(Alias, st.text(min_size=1).filter(lambda t: not is_reserved(t))),
)


@given(selectors)
def test_text_round_trips(selector: Latest | Best | Step | Alias) -> None:
    assert parse_selector(str(selector)) == selector


@given(st.text())
def test_any_text_parses_or_raises_selector_error(text: str) -> None:
    try:
        parsed = parse_selector(text)
    except SelectorError:
        assert text == "" or is_reserved(text)  # only reserved syntax or nothing is ever refused
        return
    assert isinstance(parsed, Alias) != is_reserved(text)  # reserved text never becomes an alias


@given(st.integers(min_value=0, max_value=MAX_STEP))
def test_a_step_as_int_or_text_is_the_same_selector(step: int) -> None:
    assert parse_selector(step) == parse_selector(f"step:{step}") == Step(step)


def test_explicit_min_is_the_default() -> None:
    assert str(parse_selector("best:loss:min")) == "best:loss"
    assert parse_selector("best:acc:max").maximize  # type: ignore[union-attr]
