"""Where a committed checkpoint's objects live on local disk, whatever its format version.

Format v1 keeps a checkpoint's Zarr group at the step directory's root; format v2 keeps it in
the attempt directory the commit record names (``step_<10d>/a-<16 hex>/``) and its metadata
beside it (``a-<16 hex>.meta/``). Tests that damage or inspect stored objects find them here
instead of spelling the layout out.
"""

from __future__ import annotations

from pathlib import Path

from ckptd.format.run import Run, step_dir
from ckptd.storage import LocalStore


def step_path(root: Path | str, step: int) -> Path:
    """The step directory (commit record, attempts)."""
    return Path(root) / step_dir(step)


def data_path(root: Path | str, step: int) -> Path:
    """The committed checkpoint's Zarr group: ``zarr.json`` and ``<array path>/c.<i>.<j>``."""
    m = Run(LocalStore(Path(root))).manifest(step)
    return step_path(root, step) / m.attempt if m.attempt else step_path(root, step)


def meta_path(root: Path | str, step: int) -> Path:
    """Format v2: the committed attempt's metadata directory (tables, state, per-rank objects)."""
    m = Run(LocalStore(Path(root))).manifest(step)
    assert m.attempt, f"step {step} is a format v{m.format_version} checkpoint (no attempt metadata)"
    return step_path(root, step) / f"{m.attempt}.meta"


def shard_files(root: Path | str, step: int, array: str) -> list[Path]:
    """The shard objects of one array (``c.*`` of a regular array, ``c`` of a 0-d one)."""
    d = data_path(root, step) / array
    return sorted(p for p in d.iterdir() if p.is_file() and (p.name == "c" or p.name.startswith("c.")))
