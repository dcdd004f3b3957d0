"""Completeness without shard lists: a count and a fingerprint of the shard objects written.

Format v2 does not gather every writer's shard records (at thousands of ranks they were the
bulk of the metadata). Each writer instead reports four integers — shards written, their
fingerprint, logical and stored bytes — which sum over the ranks (a store counter suffices),
and the committer compares the sums with what the storage plan says must exist. The
fingerprint of a shard is ``h(path, part) * (1 + sum_d c_d * K_d) mod P``: a missing shard,
a duplicate, or a shard of the wrong coordinates changes the sum, and the expected sum over a
whole grid has a closed form, so checking costs O(arrays), not O(shards).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ckptd.format.codecs import crc32c
from ckptd.format.manifest import ArrayRecord

P = (1 << 61) - 1
HALF = 31
_K = [0x9E3779B97F4A7C15 % P, 0xC2B2AE3D27D4EB4F % P, 0x165667B19E3779F9 % P, 0x27D4EB2F165667C5 % P]


def _k(d: int) -> int:
    return _K[d % 4] * (d // 4 + 1) % P


def _h(path: str, part: int) -> int:
    return crc32c(f"{path}#{part}".encode()) + 1


def shard_fingerprint(path: str, part: int, coords: Sequence[int]) -> int:
    return _h(path, part) * (1 + sum(c * _k(d) for d, c in enumerate(coords))) % P


@dataclass(frozen=True, slots=True)
class Tally:
    shards: int = 0
    fingerprint: int = 0
    nbytes: int = 0
    stored_bytes: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.shards + other.shards, (self.fingerprint + other.fingerprint) % P,
                     self.nbytes + other.nbytes, self.stored_bytes + other.stored_bytes)

    def counters(self) -> dict[str, int]:
        """As non-negative integers below 2**31 each where they must sum over up to 2**32 ranks in an
        int64 store counter (the fingerprint is split in two halves)."""
        return {"shards": self.shards, "fp_lo": self.fingerprint & ((1 << HALF) - 1),
                "fp_hi": self.fingerprint >> HALF, "nbytes": self.nbytes, "stored_bytes": self.stored_bytes}

    @staticmethod
    def from_counters(c: dict[str, int]) -> Tally:
        return Tally(c["shards"], ((c["fp_hi"] << HALF) + c["fp_lo"]) % P, c["nbytes"], c["stored_bytes"])


def expected_tally(arrays: Iterable[ArrayRecord]) -> Tally:
    """What the writers of ``arrays`` (as planned) must have written together (bytes not counted)."""
    shards = fp = 0
    for a in arrays:
        for i, part in enumerate(a.parts):
            h = _h(a.path, i)
            if not part.shape:  # a scalar: one chunk
                shards += 1
                fp += h
                continue
            counts = [-(-s // g) for s, g in zip(part.shape, part.grid, strict=True)]
            n = math.prod(counts)
            if n == 0:
                continue
            # sum over the grid of 1 + sum_d c_d K_d = n + sum_d K_d * n * (counts_d - 1) / 2
            total = n + sum(_k(d) * (n * (m - 1) // 2) for d, m in enumerate(counts))
            shards += n
            fp += h * total
    return Tally(shards, fp % P)
