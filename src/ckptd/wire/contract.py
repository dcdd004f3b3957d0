"""The catalog's wire rules, shared by the server's schemas (``ckptd.api.schemas``) and the engine
(``ckptd.engine.catalog``), so a name or number the engine sends is one the catalog accepts.

Standard library only: the engine imports this without FastAPI or pydantic installed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

METRIC_NAME_PATTERN = r"[A-Za-z0-9_.\-/]{1,200}"
"""A metric name (``loss``, ``eval/ppl``): also the ``<metric>`` of a ``best:<metric>`` selector."""
METRIC_NAME_RE = re.compile(METRIC_NAME_PATTERN)
TAG_PATTERN = r"[A-Za-z0-9_.\-:]{1,100}"

MAX_METRICS = 100
"""Metrics of one checkpoint."""
MAX_TAGS = 50
"""Tags of one checkpoint."""
MAX_LAYOUT_ARRAYS = 20_000
"""Arrays in one checkpoint's layout document; beyond it the engine sends no layout, not a partial one."""
MAX_DOC_BYTES = 64 * 1024
"""A free-form JSON document (run config, checkpoint metadata), serialised."""
MAX_STEP = 2**62
MAX_ID = 2**31 - 1
"""Ids are 32-bit integers on PostgreSQL."""
MAX_ERROR_CHARS = 4000
"""The error text of a failed checkpoint."""


def is_metric_name(name: object) -> bool:
    return isinstance(name, str) and METRIC_NAME_RE.fullmatch(name) is not None


def is_finite_number(value: object) -> bool:
    """A JSON number the catalog stores: ints and floats, not bools, not NaN or infinities."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics the catalog accepts (finite numbers under safe names, at most ``MAX_METRICS``);
    a NaN loss must not cost the whole registration, so bad entries are dropped, not refused."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if len(out) >= MAX_METRICS:
            break
        if is_metric_name(name) and is_finite_number(value):
            out[name] = float(value)
    return out
