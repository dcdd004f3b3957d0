"""List endpoints cost a constant number of SQL statements, whatever the page size (no N+1), and a
page shows each checkpoint exactly as its own endpoint does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from tests.api.conftest import LiveServer, add_checkpoint, layout, make_run

V1 = "/api/v1"
MAX_PAGE_STATEMENTS = 4
"""The checkpoints (joined to their run), then their metrics, tags and locations."""


@contextmanager
def statements(live: LiveServer) -> Iterator[list[str]]:
    """SQL statements the server's engine executes inside the block (the server runs in this process)."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        seen.append(statement)

    engine = live.app.state.db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.fixture(scope="module")
def busy_run(live: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A run of 30 checkpoints, each with metrics, a tag and two tiers."""
    root = tmp_path_factory.mktemp("counts")
    with live.client() as api:
        run = make_run(api, roots={"local": str(root), "remote": "s3://bucket/counts"})
        for i in range(30):
            step = (i + 1) * 10
            add_checkpoint(
                api,
                run,
                step,
                root=root,
                layout=layout(),
                nbytes=1000 + i,
                metrics={"loss": 1.0 / (i + 1), "val_loss": 2.0 / (i + 1)},
                tags=["even" if i % 2 == 0 else "odd"],
                locations=[
                    {"tier": "local", "uri": str(root / f"step_{step:010d}")},
                    {"tier": "remote", "uri": f"s3://bucket/counts/step_{step:010d}"},
                ],
            )
    return run


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"sort": "metric:val_loss"},
        {"state": "committed", "tag": "even", "sort": "-created_at"},
        {"tier": "remote", "min_step": 50, "sort": "nbytes"},
    ],
)
def test_checkpoint_page_statements_do_not_grow_with_page_size(
    live: LiveServer, api: httpx.Client, busy_run: str, params: dict[str, Any]
) -> None:
    counts = {}
    for limit in (2, 25):
        with statements(live) as seen:
            r = api.get(f"{V1}/checkpoints", params={"run": busy_run, "limit": limit, **params})
        assert r.status_code == 200, r.text
        assert 2 <= len(r.json()["items"]) <= limit
        counts[limit] = len(seen)
    assert counts[2] == counts[25] <= MAX_PAGE_STATEMENTS, counts


def test_run_page_statements_do_not_grow_with_page_size(
    live: LiveServer, api: httpx.Client, busy_run: str
) -> None:
    for _ in range(3):
        make_run(api)
    counts = {}
    for limit in (1, 3):
        with statements(live) as seen:
            r = api.get(f"{V1}/runs", params={"limit": limit})
        assert r.status_code == 200 and len(r.json()["items"]) == limit
        counts[limit] = len(seen)
    assert counts[1] == counts[3] <= 2, counts  # the runs, then their checkpoint counts


def test_page_items_equal_the_checkpoint_endpoint(api: httpx.Client, busy_run: str, tmp_path: Path) -> None:
    seen = 0
    params: dict[str, Any] = {"run": busy_run, "limit": 7, "sort": "step"}
    while True:
        page = api.get(f"{V1}/checkpoints", params=params).json()
        for item in page["items"]:
            assert item == api.get(f"{V1}/checkpoints/{item['id']}").json()
            seen += 1
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == 30


def test_missing_run_is_404_and_an_empty_page_is_not(api: httpx.Client) -> None:
    assert api.get(f"{V1}/checkpoints", params={"run": "no-such-run-here"}).status_code == 404
    assert api.get(f"{V1}/checkpoints", params={"run": "no-such-run-here", "cursor": "x"}).status_code == 404
    run = make_run(api)
    r = api.get(f"{V1}/checkpoints", params={"run": run})
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}
