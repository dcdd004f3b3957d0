"""Property-based tests of the whole HTTP surface from its OpenAPI schema (schemathesis).

Bounded: a fixed number of examples per operation. Every operation, with and without the bearer
token: no 5xx ever; a mutating call without the token is refused (401) whatever its input.
The server under test gets a converter and a storage deleter that only record: generated roots
are real paths of this machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from ckptd.api.services.jobs import ConversionTask
from tests.api.conftest import AUTH, FreshDatabases, start_server

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
deleted: list[str] = []


def _record_conversion(task: ConversionTask) -> dict[str, Any]:
    return {"output": task.output_uri}


@pytest.fixture(scope="module")
def fuzzed_server(databases: FreshDatabases) -> Iterator[str]:
    live, stop = start_server(databases.new(), converter=_record_conversion, deleter=deleted.append)
    yield live.url
    stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server: str) -> Any:
    return schemathesis.openapi.from_url(f"{fuzzed_server}/openapi.json")


def _operations(api_schema: Any) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]


def test_no_server_errors_and_mutations_need_the_token(api_schema: Any, fuzzed_server: str) -> None:
    # schemathesis' pytest plugin does not support pytest 9 yet: drive hypothesis per operation instead.
    operations = _operations(api_schema)
    assert len(operations) >= 20
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: Any) -> None:
            response = case.call(base_url=fuzzed_server, headers=dict(AUTH), timeout=30)
            where = f"{case.method} {case.formatted_path}"
            assert response.status_code < 500, f"{where}: {response.status_code} {response.text}"
            if case.method.upper() in MUTATING:
                case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
                anonymous = case.call(base_url=fuzzed_server, timeout=30)
                assert anonymous.status_code == 401, f"{where} without a token: {anonymous.status_code}"

        check()
