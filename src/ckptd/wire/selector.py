"""The checkpoint-selector grammar, shared by the engine, the REST schemas, services and routes.

::

    selector := "latest"
              | "best:" metric [ ":min" | ":max" ]     lowest (default) or highest value, newest on ties
              | "step:" digits                         0 <= n <= MAX_STEP, ASCII digits only
              | alias                                  any other non-empty text: a user alias of the run
    metric   := [A-Za-z0-9_.-/]{1,200}

``latest``, ``best:`` and ``step:`` are reserved: text starting with ``best:`` or ``step:`` that
does not parse is an error, never an alias. ``parse_selector`` also takes an ``int`` (a step),
as ``Checkpointer.restore(select=...)`` does. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ckptd.wire.contract import MAX_STEP
from ckptd.wire.contract import METRIC_NAME_RE as METRIC_RE

MetricMode = Literal["min", "max"]
_STEP_DIGITS = 19  # len(str(MAX_STEP)): bounds int() on hostile input


class SelectorError(ValueError):
    """Text that is not a selector; the message names the grammar."""


@dataclass(frozen=True, slots=True)
class Latest:
    """The committed checkpoint with the highest step (or the run's rollback pointer, in the engine)."""

    def __str__(self) -> str:
        return "latest"


@dataclass(frozen=True, slots=True)
class Best:
    """The committed checkpoint with the best value of ``metric``; newest step on ties."""

    metric: str
    mode: MetricMode = "min"

    @property
    def maximize(self) -> bool:
        return self.mode == "max"

    def __str__(self) -> str:
        return f"best:{self.metric}" + (":max" if self.mode == "max" else "")


@dataclass(frozen=True, slots=True)
class Step:
    """The committed checkpoint at exactly this step."""

    step: int

    def __str__(self) -> str:
        return f"step:{self.step}"


@dataclass(frozen=True, slots=True)
class Alias:
    """A user-defined alias of the run (resolved by the catalog)."""

    name: str

    def __str__(self) -> str:
        return self.name


Selector = Latest | Best | Step | Alias


def is_reserved(name: str) -> bool:
    """Whether ``name`` is selector syntax, so it can never be a user alias."""
    return name == "latest" or name.startswith(("best:", "step:"))


def parse_selector(text: str | int) -> Selector:
    """Parse a selector (see the module docstring); ``SelectorError`` says what is wrong."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise SelectorError(f"a selector is 'latest', 'best:<metric>[:min|:max]', 'step:<n>' or an alias, "
                            f"got {text!r}")
    if isinstance(text, int):
        return Step(_check_step(text, repr(text)))
    if text == "latest":
        return Latest()
    if text.startswith("step:"):
        return Step(_parse_step(text))
    if text.startswith("best:"):
        return _parse_best(text)
    if not text:
        raise SelectorError("an empty selector: use 'latest', 'best:<metric>[:min|:max]', 'step:<n>' "
                            "or an alias")
    return Alias(text)


def _parse_step(text: str) -> int:
    digits = text[len("step:") :]
    if not digits.isascii() or not digits.isdigit() or len(digits) > _STEP_DIGITS:
        raise SelectorError(f"selector {text[:40]!r}: step:<n> needs a non-negative integer up to {MAX_STEP}")
    return _check_step(int(digits), repr(text[:40]))


def _check_step(step: int, shown: str) -> int:
    if step < 0:
        raise SelectorError(f"selector {shown}: a step cannot be negative")
    if step > MAX_STEP:
        raise SelectorError(f"selector {shown}: steps go up to {MAX_STEP}")
    return step


def _parse_best(text: str) -> Best:
    metric, colon, mode = text[len("best:") :].partition(":")
    if not METRIC_RE.fullmatch(metric) or (colon and mode not in ("min", "max")):
        raise SelectorError(f"selector {text[:240]!r} must be best:<metric>[:min|:max], the metric being "
                            "1-200 of A-Z a-z 0-9 _ . - /")
    return Best(metric, "max" if mode == "max" else "min")
