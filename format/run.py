"""A run root: the committed checkpoints under one URL, by step.

Layout: ``<run root>/step_<10-digit step>/`` holds one checkpoint (a Zarr v3 group);
it is committed exactly when its ``manifest.json`` exists. Directories without a
manifest are in progress or left over by a crash: invisible to readers, and
collected by ``gc_uncommitted`` once they are old enough.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from ckptd.format.commit import commit
from ckptd.format.errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError, StorageError
from ckptd.format.manifest import MANIFEST_KEY, Manifest, loads
from ckptd.format.reader import CheckpointReader
from ckptd.format.store import Store
from ckptd.format.verify import Problem, verify
from ckptd.format.writer import WriterReport

_STEP_DIR = re.compile(r"^step_(\d{10})$")


def step_dir(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**10:
        raise CheckpointError(f"step must be an integer in [0, 10**10), got {step!r}")
    return f"step_{step:010d}"


class Run:
    """The checkpoints of one run root."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def url(self) -> str:
        return self.store.url

    def _step_dirs(self) -> list[tuple[int, str]]:
        try:
            names = self.store.list_dir("")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StorageError(f"listing {self.url} failed: {e}") from e
        out = []
        for n in names:
            m = _STEP_DIR.match(n)
            if m:
                out.append((int(m.group(1)), n))
        return sorted(out)

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return [s for s, d in self._step_dirs() if self.store.exists(f"{d}/{MANIFEST_KEY}")]

    def uncommitted(self) -> list[int]:
        return [s for s, d in self._step_dirs() if not self.store.exists(f"{d}/{MANIFEST_KEY}")]

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def checkpoint_store(self, step: int) -> Store:
        return self.store.child(step_dir(step))

    def is_committed(self, step: int) -> bool:
        return self.store.exists(f"{step_dir(step)}/{MANIFEST_KEY}")

    def manifest(self, step: int) -> Manifest:
        key = f"{step_dir(step)}/{MANIFEST_KEY}"
        try:
            raw = self.store.read(key)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no committed checkpoint at step {step} in {self.url}") from None
        except OSError as e:
            raise StorageError(f"reading {key} from {self.url} failed: {e}") from e
        m = loads(raw, f"{self.url}/{key}")
        if m.step != step:
            raise CheckpointError(f"{self.url}/{key} describes step {m.step}, not {step}")
        return m

    def reader(self, step: int | None = None, *, threads: int = 8) -> CheckpointReader:
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointNotFoundError(f"no committed checkpoint in {self.url}")
        return CheckpointReader(self.checkpoint_store(step), self.manifest(step), threads=threads)

    def verify(self, step: int, *, threads: int = 8) -> list[Problem]:
        return verify(self.checkpoint_store(step), self.manifest(step), threads=threads)

    def prepare(self, step: int, *, overwrite: bool = False) -> Store:
        """Make ``step_<step>/`` ready for writers: stale uncommitted data of a crashed attempt is removed."""
        d = step_dir(step)
        if self.store.exists(f"{d}/{MANIFEST_KEY}"):
            if not overwrite:
                raise CheckpointExistsError(f"step {step} is already committed in {self.url}")
            self.delete(step)
        elif self.store.list_dir(d):
            self.store.delete_prefix(d)
        return self.store.child(d)

    def commit(
        self,
        step: int,
        reports: list[WriterReport],
        *,
        state: dict[str, Any],
        world_size: int = 1,
        mesh: Mapping[str, int] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Manifest:
        return commit(
            self.checkpoint_store(step),
            step=step,
            reports=reports,
            state=state,
            world_size=world_size,
            mesh=mesh,
            metadata=metadata,
        )

    def delete(self, step: int) -> None:
        """Uncommit, then delete.

        The manifest goes first, so a crash never leaves a committed but partial checkpoint.
        """
        d = step_dir(step)
        self.store.delete(f"{d}/{MANIFEST_KEY}")
        self.store.delete_prefix(d)

    def gc_uncommitted(self, *, min_age_s: float = 3600.0, dry_run: bool = False) -> list[int]:
        """Delete step directories that have no manifest and have not changed for ``min_age_s``."""
        now = time.time()
        collected = []
        for s in self.uncommitted():
            mtime = self.store.mtime(step_dir(s))
            if mtime is not None and now - mtime < min_age_s:
                continue  # may still be in progress
            if not dry_run:
                self.store.delete_prefix(step_dir(s))
            collected.append(s)
        return collected
