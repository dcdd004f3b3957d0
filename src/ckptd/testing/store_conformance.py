"""A reusable conformance suite for the ``ckptd.format.store.Store`` contract.

Like zarr-python's ``zarr.testing.store.StoreTests``: every backend subclasses
``StoreTests`` unchanged and provides one fixture, ``store``, that yields an empty
store rooted at a fresh location. The tests only use the ``Store`` protocol, so a
backend passes exactly when it behaves like every other backend from the point of
view of the checkpoint format (writer, committer, reader, run listing, GC).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ckptd.format.errors import CheckpointError, StorageError
from ckptd.format.store import Store

# Keys a hostile manifest or a careless caller could produce; every method must refuse them.
ESCAPING_KEYS = ["../outside", "a/../../outside", "/etc/passwd", "..", "a/./b", "./a"]


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class StoreTests:
    """Subclass and provide a ``store`` fixture returning an empty ``Store``."""

    # Slack for comparing backend timestamps (S3 LastModified has 1 s resolution) with the local clock.
    clock_slack_s = 5.0

    @pytest.fixture()
    def store(self) -> Store:  # pragma: no cover - always overridden
        raise TypeError(f"{type(self).__name__} must override the `store` fixture with a concrete backend")

    # ------------------------------------------------------------------ basics
    def test_implements_protocol(self, store: Store) -> None:
        assert isinstance(store, Store)
        assert isinstance(store.url, str) and store.url

    def test_write_then_read_returns_the_same_bytes(self, store: Store) -> None:
        data = _payload(3 * 2**20 + 17)
        assert store.write("a/b/blob", [data]) == len(data)
        assert store.read("a/b/blob") == data
        assert store.size("a/b/blob") == len(data)
        assert store.exists("a/b/blob")

    def test_write_concatenates_mixed_buffers(self, store: Store) -> None:
        arr = np.arange(1000, dtype=np.uint8)
        parts: list[Any] = [b"head", bytearray(b"-mid-"), arr.data, memoryview(b"tail")[1:]]
        expected = b"head-mid-" + arr.tobytes() + b"ail"
        assert store.write("k", parts) == len(expected)
        assert store.read("k") == expected

    def test_write_of_many_buffers(self, store: Store) -> None:
        # More buffers than one writev call takes (IOV_MAX): a shard of many small chunks.
        parts = [bytes([i % 256]) * (i % 7 + 1) for i in range(1500)]
        expected = b"".join(parts)
        assert store.write("many", parts) == len(expected)
        assert store.read("many") == expected

    def test_write_of_nothing_creates_an_empty_object(self, store: Store) -> None:
        assert store.write("empty", []) == 0
        assert store.exists("empty")
        assert store.read("empty") == b""
        assert store.size("empty") == 0

    def test_write_replaces_a_longer_object(self, store: Store) -> None:
        store.write("k", [b"x" * 1000])
        store.write("k", [b"short"])
        assert store.read("k") == b"short"
        assert store.size("k") == 5

    def test_write_atomic_publishes_whole_object(self, store: Store) -> None:
        store.write("d/shard", [b"data"])
        store.write_atomic("d/manifest.json", b'{"a": 1}')
        assert store.read("d/manifest.json") == b'{"a": 1}'
        store.write_atomic("d/manifest.json", b"{}")
        assert store.read("d/manifest.json") == b"{}"
        # no temporary objects are left visible next to the published one
        assert sorted(store.list_dir("d")) == ["manifest.json", "shard"]

    def test_flush_after_writes(self, store: Store) -> None:
        store.write("x/y/z", [b"1"])
        store.flush()
        store.flush()  # idempotent
        assert store.read("x/y/z") == b"1"

    def test_keys_with_percent_encoded_segments_are_plain_names(self, store: Store) -> None:
        store.write("a%2Fb/%2E%2E/c", [b"v"])
        assert store.read("a%2Fb/%2E%2E/c") == b"v"
        assert store.list_dir("") == ["a%2Fb"]
        assert not store.exists("a/b/c")

    # ------------------------------------------------------------------ ranges
    def test_read_ranges(self, store: Store) -> None:
        data = _payload(100_000, seed=1)
        store.write("r", [data])
        ranges = [(0, 10), (50_000, 50_100), (99_990, 100_000), (5, 6), (0, 100_000)]
        got = store.read_ranges("r", ranges)
        assert [bytes(g) for g in got] == [data[s:e] for s, e in ranges]

    def test_read_single_range(self, store: Store) -> None:
        data = _payload(4096, seed=2)
        store.write("r", [data])
        assert [bytes(b) for b in store.read_ranges("r", [(100, 4000)])] == [data[100:4000]]

    def test_read_range_past_the_end_is_short_not_padded(self, store: Store) -> None:
        # The reader detects truncated shards by the length of what comes back.
        store.write("r", [b"0123456789"])
        (got,) = store.read_ranges("r", [(4, 20)])
        assert bytes(got) == b"456789"

    # ------------------------------------------------------------------ missing keys
    def test_missing_keys_raise_file_not_found(self, store: Store) -> None:
        with pytest.raises(FileNotFoundError):
            store.read("nope")
        with pytest.raises(FileNotFoundError):
            store.read("deep/er/nope")
        with pytest.raises(FileNotFoundError):
            store.read_ranges("nope", [(0, 1)])
        with pytest.raises(FileNotFoundError):
            store.read_ranges("nope", [(0, 1), (2, 3)])
        with pytest.raises(FileNotFoundError):
            store.size("nope")
        assert not store.exists("nope")
        assert store.mtime("nope") is None
        assert store.list_dir("nope") == []

    def test_deleting_absent_things_is_fine(self, store: Store) -> None:
        store.delete("nope")
        store.delete_prefix("nope")
        store.delete_prefix("deep/er/nope")

    # ------------------------------------------------------------------ listing
    def test_list_dir_names_immediate_children(self, store: Store) -> None:
        for key in ["run/step_1/a/c/0", "run/step_1/manifest.json", "run/step_2/b", "run/top", "other/x"]:
            store.write(key, [b"."])
        assert sorted(store.list_dir("")) == ["other", "run"]
        assert sorted(store.list_dir("run")) == ["step_1", "step_2", "top"]
        assert sorted(store.list_dir("run/step_1")) == ["a", "manifest.json"]
        assert store.list_dir("run/step_1/a/c") == ["0"]
        listing = store.list_dir("run")
        assert len(listing) == len(set(listing))
        assert all("/" not in n for n in listing)

    def test_list_dir_sees_writes_of_other_instances(self, store: Store) -> None:
        # Several processes share a run root; a cached listing would hide their steps.
        assert store.list_dir("run") == []
        other = store.child("run")
        other.write("step_9/x", [b"."])
        assert store.list_dir("run") == ["step_9"]
        other.delete_prefix("step_9")
        assert store.list_dir("run") == []

    # ------------------------------------------------------------------ mtime
    def test_mtime_of_objects_and_prefixes(self, store: Store) -> None:
        before = time.time()
        store.write("d/e/f", [b"1"])
        store.write("d/g", [b"2"])
        after = time.time()
        for key in ("d/e/f", "d/g", "d"):
            t = store.mtime(key)
            assert t is not None, key
            assert before - self.clock_slack_s <= t <= after + self.clock_slack_s, (key, t, before)

    # ------------------------------------------------------------------ deletion
    def test_delete_one_object(self, store: Store) -> None:
        store.write("d/a", [b"1"])
        store.write("d/b", [b"2"])
        store.delete("d/a")
        assert not store.exists("d/a")
        assert store.read("d/b") == b"2"
        assert store.list_dir("d") == ["b"]

    def test_delete_prefix_removes_everything_below_and_nothing_else(self, store: Store) -> None:
        for key in [
            "step_1/a/c/0/0",
            "step_1/a/zarr.json",
            "step_1/manifest.json",
            "step_10/keep",
            "step_1x",
            "other/step_1/keep",
        ]:
            store.write(key, [b"."])
        store.delete_prefix("step_1")
        assert not store.exists("step_1/a/c/0/0")
        assert not store.exists("step_1/manifest.json")
        assert store.list_dir("step_1") == []
        # siblings sharing a name prefix survive (object stores delete by key prefix)
        assert store.read("step_10/keep") == b"."
        assert store.read("step_1x") == b"."
        assert store.read("other/step_1/keep") == b"."
        assert sorted(store.list_dir("")) == ["other", "step_10", "step_1x"]

    def test_delete_prefix_refuses_the_root(self, store: Store) -> None:
        store.write("keep", [b"."])
        with pytest.raises(StorageError):
            store.delete_prefix("")
        assert store.read("keep") == b"."

    # ------------------------------------------------------------------ children
    def test_child_is_rooted_below_parent(self, store: Store) -> None:
        child = store.child("run/step_0000000001")
        assert isinstance(child, Store)
        assert child.url != store.url and child.url.startswith(store.url.rstrip("/"))
        child.write("a/zarr.json", [b"{}"])
        assert store.read("run/step_0000000001/a/zarr.json") == b"{}"
        assert child.list_dir("") == ["a"]
        grandchild = child.child("a")
        assert grandchild.read("zarr.json") == b"{}"
        child.write_atomic("manifest.json", b"m")
        child.flush()
        assert store.read("run/step_0000000001/manifest.json") == b"m"
        assert sorted(store.list_dir("run/step_0000000001")) == ["a", "manifest.json"]

    # ------------------------------------------------------------------ escaping keys
    @pytest.mark.parametrize("key", ESCAPING_KEYS)
    def test_keys_that_leave_the_root_are_refused(self, store: Store, key: str) -> None:
        inner = store.child("inner")
        store.write("outside", [b"original"])
        calls: list[Callable[[], object]] = [
            lambda: inner.write(key, [b"evil"]),
            lambda: inner.write_atomic(key, b"evil"),
            lambda: inner.read(key),
            lambda: inner.read_ranges(key, [(0, 1)]),
            lambda: inner.size(key),
            lambda: inner.exists(key),
            lambda: inner.list_dir(key),
            lambda: inner.mtime(key),
            lambda: inner.delete(key),
            lambda: inner.delete_prefix(key),
            lambda: inner.child(key),
        ]
        for i, call in enumerate(calls):
            with pytest.raises(CheckpointError) as info:
                call()
            assert not isinstance(info.value, FileNotFoundError), (i, key)
        assert store.read("outside") == b"original"
        assert store.list_dir("") == ["outside"]

    # ------------------------------------------------------------------ concurrency
    def test_concurrent_writers_on_distinct_keys(self, store: Store) -> None:
        # A CheckpointWriter writes shards from a thread pool through one store instance.
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                for i in range(8):
                    store.write(f"a/c/{t}/{i}", [_payload(10_000 + i, seed=t * 100 + i)])
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        store.flush()
        for t in range(8):
            for i in range(8):
                assert store.read(f"a/c/{t}/{i}") == _payload(10_000 + i, seed=t * 100 + i)
        assert sorted(store.list_dir("a/c"), key=int) == [str(t) for t in range(8)]
