"""Keyset (cursor) pagination: stable under concurrent inserts, O(page) whatever the offset.

A cursor is the sort key and id of the last row of a page, JSON in URL-safe base64. Clients
treat it as opaque; a tampered cursor is a 422, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from ckptd.api.errors import InvalidRequestError

MAX_PAGE = 500
MAX_ID = 2**31 - 1
"""Ids are 32-bit integers on PostgreSQL."""
MAX_BIGINT = 2**63 - 1
DEFAULT_PAGE = 50


def encode_cursor(key: Any, row_id: int) -> str:
    raw = json.dumps([key, row_id], separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, key_type: type) -> tuple[Any, int]:
    """The (key, id) of a cursor, every value checked: a key of ``key_type`` (``int`` within a
    BIGINT, a finite ``float``, a ``str`` of valid Unicode, a time-zone aware ``datetime`` from its
    ISO text) and an id within the id column. Anything else is a 422."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key, row_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(row_id, int) or isinstance(row_id, bool) or not 0 <= row_id <= MAX_ID:
            raise ValueError("cursor id")
        if key_type is float and isinstance(key, int) and not isinstance(key, bool):
            key = float(key)
        if key_type is datetime:
            return _instant(key), row_id
        if not isinstance(key, key_type) or isinstance(key, bool):
            raise ValueError("cursor key")
        if isinstance(key, int) and not 0 <= key <= MAX_BIGINT:
            raise ValueError("cursor key out of range")
        if isinstance(key, float) and not math.isfinite(key):
            raise ValueError("cursor key not finite")
        if isinstance(key, str):
            key.encode("utf-8")  # a lone surrogate cannot be sent to the database
        return key, row_id
    except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error) as e:
        raise InvalidRequestError("malformed pagination cursor") from e


def _instant(key: Any) -> datetime:
    if not isinstance(key, str):
        raise ValueError("cursor key")
    value = datetime.fromisoformat(key)
    if value.tzinfo is None:
        raise ValueError("a cursor time without a time zone is ambiguous")
    return value.astimezone(UTC)  # OverflowError at the ends of the calendar


def after(
    key_col: ColumnElement[Any] | InstrumentedAttribute[Any],
    id_col: InstrumentedAttribute[int],
    key: Any,
    row_id: int,
    *,
    descending: bool,
) -> ColumnElement[bool]:
    """Rows strictly after (key, id) in the order ``key [DESC], id [DESC]``."""
    if descending:
        return or_(key_col < key, and_(key_col == key, id_col < row_id))
    return or_(key_col > key, and_(key_col == key, id_col > row_id))


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"limit must be between 1 and {MAX_PAGE}")
    return limit
