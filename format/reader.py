"""Reading any box of any array of a committed checkpoint, touching only overlapping chunks.

Every chunk read is verified (crc32c) before its bytes are used. Shards of which a
reader needs most bytes are fetched whole in one request; otherwise the index is
fetched first and then only the needed chunks, with adjacent ranges coalesced.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ckptd.format.boxes import ShardBox, cell_box, cells_overlapping
from ckptd.format.codecs import crc32c
from ckptd.format.dtypes import numpy_to_tensor, of_tensor, tensor_to_numpy
from ckptd.format.errors import (
    CheckpointError,
    IntegrityError,
    LayoutError,
    MetadataError,
    StorageError,
)
from ckptd.format.manifest import ArrayRecord, Manifest, PartRecord, ShardRecord
from ckptd.format.shard import ShardGeometry, chunk_range, decode_index
from ckptd.format.store import Store
from ckptd.format.tree import restore
from ckptd.format.writer import shard_key

WHOLE_SHARD_FRACTION = 0.5
INDEX_CACHE_ENTRIES = 1024
COALESCE_GAP = 1 << 20


class CheckpointReader:
    """Reads arrays of one committed checkpoint; ``store`` is rooted at the checkpoint directory."""

    def __init__(self, store: Store, manifest: Manifest, *, threads: int = 8) -> None:
        self.store = store
        self.manifest = manifest
        self.threads = threads
        # Decoded shard indexes, so that many small reads of one shard (converters stream
        # chunk by chunk) fetch its index once. Bounded; keyed by shard key.
        self._indexes: OrderedDict[str, np.ndarray] = OrderedDict()
        self._index_lock = threading.Lock()

    def array(self, path: str) -> ArrayRecord:
        try:
            return self.manifest.arrays[path]
        except KeyError:
            raise LayoutError(f"checkpoint step {self.manifest.step} has no array {path!r}") from None

    def read(self, path: str, box: ShardBox | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read ``box`` (default: everything) of array ``path`` into ``out`` or a new CPU tensor."""
        a = self.array(path)
        box = box or ShardBox.whole(a.shape)
        if not box.fits_in(a.shape):
            raise LayoutError(f"{path}: requested box {box.to_json()} lies outside shape {list(a.shape)}")
        if out is not None:
            if tuple(out.shape) != box.shape:
                raise LayoutError(
                    f"{path}: checkpoint holds shape {list(box.shape)} but the destination tensor has "
                    f"shape {list(out.shape)}"
                )
            if of_tensor(out) != a.dtype:
                tmp = self.read(path, box)
                with torch.no_grad():
                    out.copy_(tmp)
                return out
        direct = out is not None and out.device.type == "cpu" and out.is_contiguous()
        if direct:
            assert out is not None
            dest = tensor_to_numpy(out)
        else:
            try:
                dest = np.empty(box.shape, dtype=a.dtype.numpy_storage)
            except (MemoryError, ValueError) as e:  # a shape from a hostile or damaged manifest
                raise MetadataError(
                    f"{path}: cannot allocate {list(box.shape)} {a.dtype.name} elements to read into: {e}"
                ) from e
        self._fill(a, box, dest)
        result = numpy_to_tensor(dest, a.dtype)
        if out is None:
            return result
        if not direct:
            with torch.no_grad():
                out.copy_(result)
        return out

    def _fill(self, a: ArrayRecord, box: ShardBox, dest: np.ndarray) -> None:
        if a.kind == "scalar":
            key = f"{a.part_key(0)}/c"
            try:
                raw = self.store.read(key)
            except FileNotFoundError as e:
                raise IntegrityError(f"{a.path}: {key} is missing from storage ({self.store.url})") from e
            except CheckpointError:
                raise
            except OSError as e:
                raise StorageError(f"reading {key} from {self.store.url} failed: {e}") from e
            if len(raw) != a.dtype.itemsize + 4:
                raise IntegrityError(
                    f"{a.path}: scalar value has {len(raw)} bytes, not {a.dtype.itemsize + 4}"
                )
            body, stored = raw[:-4], struct.unpack("<I", raw[-4:])[0]
            if len(body) != a.dtype.itemsize or crc32c(body) != stored:
                raise IntegrityError(f"{a.path}: scalar value fails its crc32c check")
            dest[...] = np.frombuffer(body, dtype=a.dtype.numpy_storage).reshape(())
            return
        if box.is_empty():
            return
        tasks: list[Callable[[], None]] = []
        for i, part in enumerate(a.parts):
            pbox = ShardBox(part.offset, part.shape)
            want = box.intersect(pbox)
            if want is None:
                continue
            local_want = ShardBox(
                tuple(o - po for o, po in zip(want.offset, part.offset, strict=True)), want.shape
            )
            by_coords = {s.coords: s for s in part.shards}
            for coords in cells_overlapping(local_want, part.grid):
                rec = by_coords.get(coords)
                if rec is None and part.listed:
                    raise IntegrityError(f"{a.path}: shard {list(coords)} is missing from the manifest")
                tasks.append(self._shard_task(a, i, part, coords, rec, local_want, box, dest))
        if len(tasks) <= 1:
            for t in tasks:
                t()
            return
        with ThreadPoolExecutor(min(self.threads, len(tasks))) as pool:
            for f in [pool.submit(t) for t in tasks]:
                f.result()

    def _shard_task(
        self,
        a: ArrayRecord,
        part_index: int,
        part: PartRecord,
        coords: tuple[int, ...],
        rec: ShardRecord | None,
        local_want: ShardBox,
        box: ShardBox,
        dest: np.ndarray,
    ) -> Callable[[], None]:
        """Read the overlap of one shard. ``rec`` (format v1) pins the shard's size and index
        checksum; format v2 finds the index at the end of the object and trusts its own crc32c."""

        def run() -> None:
            key = shard_key(a.part_key(part_index), coords)
            cell = cell_box(coords, part.grid, part.shape)
            geom = ShardGeometry(cell.offset, part.grid, part.chunks, part.shape)
            where = f"{a.path} shard {key}"
            needed = [c for c in geom.chunks_overlapping(local_want) if not geom.chunk_box(c).is_empty()]
            index, whole, data_nbytes = self._index(key, a, rec, geom, len(needed), where)
            ranges = [(c, chunk_range(index, geom.flat_index(c), data_nbytes, where)) for c in needed]
            absent = [c for c, r in ranges if r is None]
            if absent:
                # ckptd writes every chunk inside the array; an index marking one absent is damage
                # (reading it as zeros would hand back a tensor that never existed)
                raise IntegrityError(f"{where}: chunk {list(absent[0])} is missing from the shard index")
            present = [(c, r) for c, r in ranges if r is not None]
            if whole is not None:
                wv = memoryview(whole)
                blobs: list[bytes | memoryview] = [wv[r[0] : r[1]] for _, r in present]
            else:
                blobs = self._get_ranges(key, [r for _, r in present])
            for (c, _), blob in zip(present, blobs, strict=True):
                self._copy_chunk(a, geom, c, blob, local_want, part, box, dest, where)

        return run

    def _index(
        self, key: str, a: ArrayRecord, rec: ShardRecord | None, geom: ShardGeometry, needed: int, where: str
    ) -> tuple[np.ndarray, bytes | memoryview | None, int | None]:
        """The shard's decoded index, the whole object when most of it is needed (else None), and the
        size of its data section (None when unknown: format v2, index fetched alone)."""
        data_nbytes: int | None = None
        if rec is not None:
            if rec.nbytes < geom.index_nbytes:
                raise IntegrityError(f"{where}: recorded size {rec.nbytes} is smaller than its index")
            data_nbytes = rec.nbytes - geom.index_nbytes
        with self._index_lock:
            index = self._indexes.get(key)
        if needed >= WHOLE_SHARD_FRACTION * geom.nchunks:
            whole = self._whole(key, rec, geom.max_nbytes(a.dtype.itemsize), where)
            if rec is None:
                data_nbytes = len(whole) - geom.index_nbytes
                if data_nbytes < 0:
                    raise IntegrityError(f"{where}: {len(whole)} bytes, smaller than its index")
            assert data_nbytes is not None
            if index is None:
                index = self._check_index(memoryview(whole)[data_nbytes:], rec, geom, where)
            return index, whole, data_nbytes
        if index is None:
            if rec is not None:
                assert data_nbytes is not None
                raw_index = self._get(key, data_nbytes, rec.nbytes)
            else:
                raw_index = self._tail(key, geom.index_nbytes)
            index = self._check_index(raw_index, rec, geom, where)
            with self._index_lock:
                self._indexes[key] = index
                if len(self._indexes) > INDEX_CACHE_ENTRIES:
                    self._indexes.popitem(last=False)
        return index, None, data_nbytes

    @staticmethod
    def _copy_chunk(
        a: ArrayRecord,
        geom: ShardGeometry,
        c: tuple[int, ...],
        blob: bytes | memoryview,
        local_want: ShardBox,
        part: PartRecord,
        box: ShardBox,
        dest: np.ndarray,
        where: str,
    ) -> None:
        """Decode (checking its crc32c) inner chunk ``c`` and copy its overlap with the request."""
        cb = geom.chunk_box(c)
        full = int(np.prod(geom.chunk)) * a.dtype.itemsize
        raw = a.codec.decode(blob, full, f"{where} chunk {list(c)}")
        chunk = np.frombuffer(raw, dtype=a.dtype.numpy_storage).reshape(geom.chunk)
        overlap = cb.intersect(local_want)
        if overlap is None:
            return
        src = tuple(slice(o - co, o - co + s)
                    for o, co, s in zip(overlap.offset, cb.offset, overlap.shape, strict=True))
        dest[_dest_slices(overlap, part, box)] = chunk[src]

    @staticmethod
    def _check_index(
        raw: bytes | memoryview, rec: ShardRecord | None, geom: ShardGeometry, where: str
    ) -> np.ndarray:
        if len(raw) != geom.index_nbytes:
            raise IntegrityError(f"{where}: the shard is truncated (its index is incomplete)")
        if rec is not None and crc32c(bytes(raw[:-4])) != rec.index_crc32c:
            raise IntegrityError(f"{where}: shard index does not match the manifest checksum")
        return decode_index(raw, geom, where)

    def _storage_call(self, key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except FileNotFoundError as e:
            raise IntegrityError(f"shard {key} is missing from storage ({self.store.url})") from e
        except CheckpointError:
            raise
        except OSError as e:
            raise StorageError(f"reading {key} from {self.store.url} failed: {e}") from e

    def _whole(self, key: str, rec: ShardRecord | None, limit: int, where: str) -> bytes | memoryview:
        if rec is not None:
            return self._get(key, 0, rec.nbytes)
        # one bounded request: a replaced, huge object is refused, never read whole
        blobs: list[bytes] = self._storage_call(key, lambda: self.store.read_ranges(key, [(0, limit + 1)]))
        (blob,) = blobs
        if len(blob) > limit:
            raise IntegrityError(f"{where}: more than {limit} bytes, larger than a shard of this array "
                                 "can be (replaced or damaged)")
        return blob

    def _tail(self, key: str, n: int) -> bytes:
        blob: bytes = self._storage_call(key, lambda: self.store.read_tail(key, n))
        return blob

    def _get(self, key: str, start: int, stop: int) -> bytes | memoryview:
        (blob,) = self._get_ranges(key, [(start, stop)])
        return blob

    def _get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes | memoryview]:
        if not ranges:
            return []
        merged = _coalesce(ranges)
        fetched = self._storage_call(key, lambda: self.store.read_ranges(key, [(s, e) for s, e, _ in merged]))
        out: list[bytes | memoryview] = [b""] * len(ranges)
        for (start, stop, members), blob in zip(merged, fetched, strict=True):
            if len(blob) != stop - start:
                raise IntegrityError(
                    f"shard {key} is truncated (wanted bytes {start}..{stop}, got {len(blob)})"
                )
            mv = memoryview(blob)
            for i in members:
                lo, hi = ranges[i]
                out[i] = mv[lo - start : hi - start]
        return out

    def restore(self, state: Any) -> Any:
        """Load the checkpoint's state tree into ``state`` in place (see ``tree.restore``).

        Arrays are read concurrently: the tree walk only allocates or validates the
        destinations and schedules the reads; data is awaited before any
        ``load_state_dict`` sees it.
        """
        pending: list[Future[torch.Tensor]] = []
        with ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="ckptd-read") as pool:

            def schedule(path: str, dest: torch.Tensor | None) -> torch.Tensor:
                a = self.array(path)
                if dest is None:
                    dest = torch.empty(a.shape, dtype=a.dtype.torch_dtype)
                elif tuple(dest.shape) != a.shape:
                    raise LayoutError(
                        f"{path}: checkpoint holds shape {list(a.shape)} but the destination tensor has "
                        f"shape {list(dest.shape)}"
                    )
                pending.append(pool.submit(self.read, path, None, dest))
                return dest

            def sync() -> None:
                try:
                    for f in pending:
                        f.result()
                finally:
                    pending.clear()

            try:
                return restore(state, self.manifest.state, schedule, sync=sync)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise


def _dest_slices(overlap: ShardBox, part: PartRecord, box: ShardBox) -> tuple[slice, ...]:
    """Where a part-local ``overlap`` lands in the destination array that holds global ``box``."""
    return tuple(
        slice(o + po - bo, o + po - bo + s)
        for o, po, bo, s in zip(overlap.offset, part.offset, box.offset, overlap.shape, strict=True)
    )


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    merged: list[tuple[int, int, list[int]]] = []
    for i in order:
        s, e = ranges[i]
        if merged and s - merged[-1][1] <= COALESCE_GAP:
            ms, me, members = merged[-1]
            merged[-1] = (ms, max(me, e), [*members, i])
        else:
            merged.append((s, e, [i]))
    return merged
