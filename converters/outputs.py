"""Exports that fail leave nothing behind: ``removed_on_failure`` deletes what an export created.

An export that stops half way (disk full, a damaged source) would otherwise leave a file that
looks like a checkpoint — a truncated ``torch.save`` zip, a DCP directory without all its data,
a safetensors temporary file beside the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ckptd.format.run import Run, step_dir
from ckptd.format.writer import CheckpointWriter


def _names(d: Path) -> set[str]:
    try:
        return set(os.listdir(d))
    except OSError:
        return set()


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass  # best effort: the original error is what the user needs to see


def _stat(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def removed_on_failure(out: Path) -> Iterator[None]:
    """On an exception inside the block, delete what it created: ``out`` itself when it is new (or a
    file the block rewrote), new entries inside ``out`` when it was an existing directory, and new
    temporary files (``.*``) beside it — where safetensors stages its output."""
    parent = out.parent
    was_dir, before_stat = out.is_dir(), _stat(out)
    before_inside = _names(out) if was_dir else set()
    before_beside = _names(parent)
    try:
        yield
    except BaseException:
        if was_dir:
            for name in _names(out) - before_inside:
                _remove(out / name)
        elif before_stat is None or _stat(out) != before_stat:
            _remove(out)
        for name in _names(parent) - before_beside:
            if name.startswith("."):
                _remove(parent / name)
        raise


@contextlib.contextmanager
def attempt_discarded_on_failure(run: Run, step: int) -> Iterator[None]:
    """Around writing and committing the attempt ``run.prepare(step)`` opened: on failure delete the
    attempt (and the step directory when nothing else is in it) instead of leaving it for gc."""
    attempt = run.open_attempt(step)
    try:
        yield
    except BaseException:
        run.abandon(step)
        if attempt is not None:
            step_store = run.checkpoint_store(step)
            try:
                step_store.delete_prefix(attempt)
                step_store.delete_prefix(f"{attempt}.meta")
                if not step_store.list_dir(""):
                    run.store.delete_prefix(step_dir(step))
            except OSError:
                pass  # best effort: what remains is an uncommitted attempt, which gc collects
        raise


@contextlib.contextmanager
def new_run_root_removed_on_failure(uri: str) -> Iterator[None]:
    """A local run root a failed command created is removed again when it is left empty."""
    created = None if "://" in uri or os.path.exists(uri) else uri
    try:
        yield
    except BaseException:
        if created is not None and os.path.isdir(created) and not os.listdir(created):
            os.rmdir(created)
        raise


def drain(writer: CheckpointWriter) -> None:
    """Wait until a failed import's writer threads have stopped, whatever they report: deleting its
    attempt while they still write would leave their late shards behind."""
    with contextlib.suppress(Exception):
        writer.finish()
