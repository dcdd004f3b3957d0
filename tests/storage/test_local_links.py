"""``LocalStore`` never follows a symbolic link below its root: a step directory symlinked to another
run root must not let a save overwrite, or ``rm``/``gc`` delete, that run's files."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.format.errors import StorageError
from ckptd.storage import LocalStore


@pytest.fixture()
def linked(tmp_path: Path) -> tuple[LocalStore, Path]:
    other = tmp_path / "other" / "step_1"
    other.mkdir(parents=True)
    (other / "manifest.json").write_bytes(b"theirs")
    root = tmp_path / "run"
    root.mkdir()
    (root / "step_1").symlink_to(other, target_is_directory=True)
    return LocalStore(root), other


def test_writes_through_a_symlinked_directory_are_refused(linked: tuple[LocalStore, Path]) -> None:
    store, other = linked
    with pytest.raises(StorageError, match=r"step_1 is a symbolic link \(ckptd never follows links"):
        store.write("step_1/manifest.json", [b"ours"])
    with pytest.raises(StorageError, match="is a symbolic link"):
        store.child("step_1").write_atomic("manifest.json", b"ours")
    assert (other / "manifest.json").read_bytes() == b"theirs"


def test_deletes_through_a_symlinked_directory_are_refused(linked: tuple[LocalStore, Path]) -> None:
    store, other = linked
    with pytest.raises(StorageError, match="is a symbolic link"):
        store.delete_prefix("step_1/")
    with pytest.raises(StorageError, match="is a symbolic link"):
        store.delete("step_1/manifest.json")
    assert (other / "manifest.json").read_bytes() == b"theirs"


def test_the_root_itself_may_be_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "disk").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "disk", target_is_directory=True)
    store = LocalStore(tmp_path / "run")
    store.write("step_1/x", [b"1"])
    assert (tmp_path / "disk/step_1/x").read_bytes() == b"1"
