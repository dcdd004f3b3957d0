"""Shared fixtures that start real components: an S3 endpoint (moto's server) and stores."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 endpoint: moto's threaded server on 127.0.0.1 with an OS-chosen port."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_storage_options(s3_server: str) -> dict[str, Any]:
    return {
        "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"},
        "key": "testing",
        "secret": "testing",
    }


@pytest.fixture()
def s3_url(s3_server: str, s3_storage_options: dict[str, Any]) -> str:
    """A fresh bucket prefix per test: ``s3://<bucket>/run``; AWS_ENDPOINT_URL points at the server."""
    import boto3

    bucket = f"ckptd-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run"


@pytest.fixture()
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point botocore (and so s3fs in subprocesses and the CLI) at the moto server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


# Variants of a test that run only in `make test-slow`, because the fast tier (`make test`, ten
# minutes on two cores) keeps a cheaper variant of the same behaviour. They are parameters of shared
# fixtures (the storage backend, the catalog database), so they cannot carry a mark themselves.
SLOW_VARIANTS = {
    # eight writer processes on S3: the local variant runs in the fast tier, S3 commits in many others
    "tests/format/test_multiwriter.py::test_eight_writer_processes[s3]",
    # the abuse and API fuzzing campaigns on PostgreSQL: their SQLite runs are in the fast tier
    "tests/api/test_abuse.py::test_unauthenticated_abuse_stays_bounded[postgres]",
    "tests/api/test_abuse.py::test_the_body_limit_is_configurable_and_applies_to_token_holders_too[postgres]",
    "tests/api/test_schemathesis.py::test_no_server_errors_and_mutations_need_the_token[postgres]",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in SLOW_VARIANTS:
            item.add_marker(pytest.mark.slow)
