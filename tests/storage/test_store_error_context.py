"""Backend failures reach the caller as ``StorageError`` naming the operation, with ``key``, ``url``
and the backend's exception as ``__cause__`` (``ckptd.storage.errors.map_exceptions``)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

import ckptd
from ckptd.storage import FsspecStore, LocalStore, open_store


def test_local_write_under_a_file_is_a_storage_error_with_key_and_url(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.write("step_1", [b"a file, not a directory"])
    with pytest.raises(ckptd.StorageError, match=r"writing step_1/zarr.json on .*root failed") as err:
        store.write("step_1/zarr.json", [b"{}"])
    assert err.value.key == "step_1/zarr.json"
    assert err.value.url == str(tmp_path / "root")
    assert isinstance(err.value.__cause__, FileExistsError)  # mkdir where a file is
    with pytest.raises(ckptd.StorageError, match="publishing step_1/manifest") as err:
        store.write_atomic("step_1/manifest", b"{}")
    assert err.value.key == "step_1/manifest"
    assert not list((tmp_path / "root").glob(".*.tmp"))  # no temporary file is left behind


def test_local_missing_objects_keep_their_contracts(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    with pytest.raises(FileNotFoundError):
        store.read("nothing")  # callers test for absence: not wrapped
    assert store.list_dir("nothing") == []
    store.delete("nothing")  # deleting what is gone is not an error


def test_escaping_key_error_names_the_key(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    with pytest.raises(ckptd.StorageError, match="would leave the store root") as err:
        store.read("../etc/passwd")
    assert (err.value.key, err.value.url) == ("../etc/passwd", store.url)


@pytest.mark.s3
def test_s3_errors_become_storage_errors_with_key_and_url(
    s3_server: str, s3_storage_options: dict[str, Any]
) -> None:
    url = f"s3://ckptd-missing-{uuid.uuid4().hex[:12]}/run"  # a bucket that does not exist
    store = open_store(url, s3_storage_options)
    assert isinstance(store, FsspecStore)
    with pytest.raises(ckptd.StorageError, match=r"writing step_1/zarr.json on s3://ckptd-missing-") as err:
        store.write("step_1/zarr.json", [b"{}"])
    assert err.value.key == "step_1/zarr.json"
    assert err.value.url == store.url
    assert err.value.__cause__ is not None
    assert store.list_dir("") == []  # listing a missing prefix is empty, as on disk
    store.delete("step_1/zarr.json")
