"""Chunk codecs: the exact Zarr v3 codec pipeline ckptd writes, and its byte-level encode/decode.

Every inner chunk is ``bytes(little endian) -> [compressor] -> crc32c``. The crc32c
codec appends the Castagnoli checksum of the encoded bytes as four little-endian
bytes, so a reader can check each chunk on its own (partial reads stay verified).
Compression is optional because on fast disks it costs more than it saves:
benchmarks/results/codecs-*.json has the measurement behind the default.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Literal

import crc32c as _crc32c
import numcodecs
import numpy as np

from ckptd.format.errors import IntegrityError, MetadataError

Compressor = Literal["none", "zstd", "blosc-zstd", "blosc-lz4"]
Shuffle = Literal["none", "byte", "bit"]
_BLOSC_SHUFFLE = {"none": "noshuffle", "byte": "shuffle", "bit": "bitshuffle"}
_NUMCODECS_SHUFFLE = {
    "none": numcodecs.Blosc.NOSHUFFLE,
    "byte": numcodecs.Blosc.SHUFFLE,
    "bit": numcodecs.Blosc.BITSHUFFLE,
}
CRC_BYTES = 4


def crc32c(data: Any) -> int:
    """Castagnoli CRC of a bytes-like object (releases the GIL for large buffers)."""
    return int(_crc32c.crc32c(data))


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """How chunks are compressed.

    ``compressor``: "none" (default: the fastest end to end on local NVMe and S3 in our
    measurements), "zstd", "blosc-zstd" or "blosc-lz4". ``shuffle`` applies to blosc only
    (byte shuffle groups exponent bytes of floats, which is what makes weights compress).
    """

    compressor: Compressor = "none"
    level: int = 1
    shuffle: Shuffle = "byte"

    def __post_init__(self) -> None:
        if self.compressor not in ("none", "zstd", "blosc-zstd", "blosc-lz4"):
            raise MetadataError(f"unknown compressor {self.compressor!r}")
        if self.shuffle not in _BLOSC_SHUFFLE:
            raise MetadataError(f"unknown shuffle {self.shuffle!r}")
        if not isinstance(self.level, int) or not 0 <= self.level <= 22:
            raise MetadataError(f"compression level {self.level!r} is outside 0..22")

    @staticmethod
    def parse(text: str) -> CodecSpec:
        """Parse ``"none"``, ``"zstd"``, ``"zstd:3"``, ``"blosc-zstd:1:bit"`` and the like."""
        parts = text.split(":")
        comp = parts[0]
        try:
            level = int(parts[1]) if len(parts) > 1 and parts[1] else 1
        except ValueError:
            raise MetadataError(f"codec {text!r}: the level must be an integer (e.g. zstd:3)") from None
        shuffle = parts[2] if len(parts) > 2 else "byte"
        return CodecSpec(comp, level, shuffle)  # type: ignore[arg-type]

    def label(self) -> str:
        if self.compressor == "none":
            return "none"
        if self.compressor == "zstd":
            return f"zstd:{self.level}"
        return f"{self.compressor}:{self.level}:{self.shuffle}"

    def to_json(self) -> dict[str, Any]:
        return {"compressor": self.compressor, "level": self.level, "shuffle": self.shuffle}

    @staticmethod
    def from_json(doc: Any) -> CodecSpec:
        if not isinstance(doc, dict):
            raise MetadataError(f"codec description must be an object, got {doc!r}")
        comp, level, shuffle = doc.get("compressor"), doc.get("level"), doc.get("shuffle")
        level_ok = isinstance(level, int) and not isinstance(level, bool)
        if not isinstance(comp, str) or not isinstance(shuffle, str) or not level_ok:
            raise MetadataError(f"malformed codec description {doc!r} (compressor, level, shuffle)")
        try:
            return CodecSpec(comp, level, shuffle)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as e:
            raise MetadataError(f"malformed codec description {doc!r}") from e

    def zarr_codecs(self, itemsize: int) -> list[dict[str, Any]]:
        """The inner-chunk codec chain as Zarr v3 metadata."""
        chain: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if self.compressor == "zstd":
            chain.append({"name": "zstd", "configuration": {"level": self.level, "checksum": False}})
        elif self.compressor.startswith("blosc-"):
            chain.append(
                {
                    "name": "blosc",
                    "configuration": {
                        "cname": self.compressor.removeprefix("blosc-"),
                        "clevel": self.level,
                        "shuffle": _BLOSC_SHUFFLE[self.shuffle],
                        "typesize": itemsize,
                        "blocksize": 0,
                    },
                }
            )
        chain.append({"name": "crc32c"})
        return chain

    def _numcodec(self, itemsize: int) -> Any:
        if self.compressor == "zstd":
            return numcodecs.Zstd(level=self.level)
        if self.compressor.startswith("blosc-"):
            return numcodecs.Blosc(
                cname=self.compressor.removeprefix("blosc-"),
                clevel=self.level,
                shuffle=_NUMCODECS_SHUFFLE[self.shuffle],
                typesize=itemsize,
            )
        return None

    def encode(self, raw: memoryview, itemsize: int) -> list[bytes | memoryview]:
        """Encode one chunk's raw little-endian bytes; returns buffers to write back to back.

        Uncompressed chunks are returned as the caller's own memory (no copy) followed by
        the 4-byte checksum, so a writer can hand them straight to ``writev``.
        """
        codec = self._numcodec(itemsize)
        body: bytes | memoryview = raw if codec is None else bytes(codec.encode(raw))
        return [body, struct.pack("<I", crc32c(body))]

    def decode(self, encoded: bytes | memoryview, expected_nbytes: int, where: str, *,
               bounded: bool = False) -> memoryview:
        """Check the trailing crc32c and decode; raises :class:`IntegrityError` naming ``where``.

        ``bounded``: inflate into a buffer of ``expected_nbytes`` (zero filled), so a frame that
        claims or produces more is refused before anything larger is allocated (a shorter frame
        reads as zero padded)."""
        mv = memoryview(encoded).cast("B")
        if len(mv) < CRC_BYTES:
            raise IntegrityError(f"{where}: chunk is truncated ({len(mv)} bytes)")
        body, stored = mv[:-CRC_BYTES], struct.unpack("<I", mv[-CRC_BYTES:])[0]
        if crc32c(body) != stored:
            raise IntegrityError(
                f"{where}: crc32c mismatch (stored {stored:#010x}, computed {crc32c(body):#010x})"
            )
        codec = self._numcodec(1)
        if codec is None:
            out = body
        else:
            try:
                dest = np.zeros(expected_nbytes, np.uint8) if bounded else None
                out = memoryview(codec.decode(body, out=dest)).cast("B")
            except Exception as e:  # a checksum collision or a codec bug; never let it escape raw
                raise IntegrityError(f"{where}: chunk does not decompress ({e})") from e
        if len(out) != expected_nbytes:
            raise IntegrityError(f"{where}: decoded {len(out)} bytes, expected {expected_nbytes}")
        return out
