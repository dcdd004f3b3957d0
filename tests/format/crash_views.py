"""Crash states of a traced save, and the ordering rules a commit protocol must follow.

A crash state is what a power cut after the first k ops could leave on disk. After any
prefix, each directory entry and each written byte range is either durable (synced) or
not; ``crash_states`` keeps, for every prefix, the page cache as is, only what is durable,
and mixes of the two: unsynced data dropped or torn (half written, the rest zeros) under
the volatile names, and the durable tree plus just the newest directory op (a rename that
reached disk before everything it depends on).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fs_trace import FsModel, Op

COMMIT_RECORD = re.compile(r"^step_\d{10}/manifest\.json$")
_DIR_OPS = ("mkdir", "create", "rename", "link", "unlink", "rmdir")

# One file of a crash state: its inode and the byte ranges that hold written data.
FileView = tuple[int, tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class CrashState:
    prefix: int  # ops applied
    variant: str
    files: dict[str, FileView]  # relative path -> inode and extents present

    def signature(self) -> frozenset[tuple[str, FileView]]:
        return frozenset(self.files.items())


def commit_op(ops: list[Op]) -> int:
    """Index of the op that publishes the checkpoint: the last rename or link in the tree."""
    idx = [i for i, op in enumerate(ops) if op.kind in ("rename", "link")]
    assert idx, "the save published nothing by rename or link"
    return idx[-1]


def ordering_violations(ops: list[Op], before: FsModel) -> list[str]:
    """What the op log does wrong, as sentences (empty when the protocol is crash safe by construction)."""
    problems: list[str] = []
    c = commit_op(ops)
    record = ops[c]
    if not COMMIT_RECORD.match(record.path):
        problems.append(f"the last rename/link publishes {record.path!r}, not step_<n>/manifest.json")
    step_prefix = record.path.split("/", 1)[0] + "/"
    for op in ops:
        if op.kind != "fsync" and not (op.path + "/").startswith(step_prefix):
            problems.append(f"{op.kind} of {op.path!r} lies outside {step_prefix}")
    model = _replay(before, ops[:c])
    durable = model.paths(durable=True)
    for path, ino in model.paths().items():
        if not path.startswith(step_prefix):
            continue
        if not model.extents[ino] <= model.durable_extents[ino]:
            problems.append(f"{path}: data not durable when the commit record is published")
        if ino != record.inode and durable.get(path) != ino:
            problems.append(f"{path}: its directory entry is not durable when the commit record is published")
    model = _replay(before, ops)
    if model.paths(durable=True).get(record.path) != record.inode:
        problems.append(f"{record.path}: its directory is never fsync'd after the {record.kind}")
    return problems


def _replay(before: FsModel, ops: list[Op]) -> FsModel:
    m = _copy(before)
    for op in ops:
        m.apply(op)
    return m


def _copy(m: FsModel) -> FsModel:
    return FsModel(
        kinds=dict(m.kinds),
        entries={k: dict(v) for k, v in m.entries.items()},
        durable_entries={k: dict(v) for k, v in m.durable_entries.items()},
        extents={k: set(v) for k, v in m.extents.items()},
        durable_extents={k: set(v) for k, v in m.durable_extents.items()},
        preexisting=dict(m.preexisting),
    )


def crash_states(ops: list[Op], before: FsModel) -> Iterator[CrashState]:
    """Every distinct crash state of every prefix of ``ops`` (duplicates are skipped)."""
    seen: set[frozenset[tuple[str, FileView]]] = set()
    model = _copy(before)
    last_dir_op: Op | None = None
    for k in range(len(ops) + 1):
        if k:
            op = ops[k - 1]
            model.apply(op)
            if op.kind in _DIR_OPS:
                last_dir_op = op
        volatile_names, durable_names = model.paths(), model.paths(durable=True)
        candidates = {
            "page-cache": _view(model, volatile_names, "volatile"),
            "durable": _view(model, durable_names, "durable"),
            "names-kept-data-dropped": _view(model, volatile_names, "durable"),
            "names-kept-data-torn": _view(model, volatile_names, "torn"),
        }
        if last_dir_op is not None:
            reordered = _copy(model)
            reordered.entries = {d: dict(e) for d, e in model.durable_entries.items()}
            reordered.apply(last_dir_op)  # only this entry reached the disk, ahead of the ones before it
            candidates["newest-entry-first"] = _view(model, reordered.paths(), "durable")
        for variant, files in candidates.items():
            state = CrashState(k, variant, files)
            sig = state.signature()
            if sig not in seen:
                seen.add(sig)
                yield state


def durable_state(ops: list[Op], before: FsModel) -> CrashState:
    """What a power cut right after the last op leaves: only what was synced."""
    model = _replay(before, ops)
    return CrashState(len(ops), "durable", _view(model, model.paths(durable=True), "durable"))


def _view(model: FsModel, names: dict[str, int], data: str) -> dict[str, FileView]:
    out: dict[str, FileView] = {}
    for path, ino in names.items():
        durable = model.durable_extents[ino]
        if data == "durable":
            ext = durable
        elif data == "volatile":
            ext = model.extents[ino]
        else:  # torn: each unsynced range half written; the file keeps its full size (zeros)
            ext = set(durable)
            for off, n in model.extents[ino] - durable:
                ext.add((off, n // 2))
                ext.add((off + n, 0))  # marks the size the metadata already claims
        out[path] = (ino, tuple(sorted(ext)))
    return out


def materialise(
    state: CrashState, dest: Path, contents: dict[int, bytes], previous: CrashState | None
) -> None:
    """Make ``dest`` hold ``state`` (each file its written ranges, zeros elsewhere).

    ``dest`` holds ``previous`` (or nothing): only the files that differ are rewritten, which
    keeps hundreds of states cheap; directories left empty are removed.
    """
    old = previous.files if previous is not None else {}
    for path in old.keys() - state.files.keys():
        (dest / path).unlink()
    for path, view in state.files.items():
        if old.get(path) == view:
            continue
        ino, extents = view
        size = max((off + n for off, n in extents), default=0)
        data = bytearray(size)
        full = contents[ino]
        for off, n in extents:
            data[off : off + n] = full[off : off + n]
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes(data))
    dest.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(dest, topdown=False):
        if (
            dirpath != str(dest)
            and not filenames
            and not any(os.path.isdir(f"{dirpath}/{d}") for d in dirnames)
        ):
            os.rmdir(dirpath)


def final_contents(ops: list[Op], before: FsModel, pre_copy: Path, post: Path) -> dict[int, bytes]:
    """Each inode's bytes: pre-existing files from the copy taken before, new ones from the tree after."""
    contents = {ino: (pre_copy / rel).read_bytes() for ino, rel in before.preexisting.items()}
    after = _replay(before, ops)
    for rel, ino in after.paths().items():
        contents.setdefault(ino, (post / rel).read_bytes())
    for ino, kind in after.kinds.items():
        if kind == "file" and ino not in contents:  # unlinked before the end: its bytes are unknown
            contents[ino] = bytes(max((o + n for o, n in after.extents[ino]), default=0))
    return contents
