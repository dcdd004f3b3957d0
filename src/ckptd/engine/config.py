"""Configuration of the snapshot engine: one validated dataclass per concern.

``TierConfig`` describes one level of copies (``memory``, ``local`` or ``remote``) with its
own save frequency and retention; ``ShardSpec`` says which box of a canonical tensor this
rank holds; ``CheckpointerConfig`` gathers everything ``ckptd.Checkpointer`` takes. All of
them are checked in ``__post_init__`` so a typo fails at construction, not at step 10,000.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptd.format.boxes import ShardBox
from ckptd.format.codecs import CodecSpec
from ckptd.format.errors import ConfigError, LayoutError
from ckptd.format.layout import TensorLayout
from ckptd.format.plan import DEFAULT_CHUNK_BYTES

TierKind = Literal["memory", "local", "remote"]
MetricMode = Literal["min", "max"]


def _positive(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a positive number, got {type(value).__name__} {value!r}")
    if not value > 0:  # also rejects NaN
        raise ConfigError(f"{name} must be positive, got {value!r}")


@dataclass(kw_only=True, slots=True)
class Retention:
    """Which committed checkpoints of a tier survive. The union of the rules is kept; the newest
    committed checkpoint is always kept. With no rule at all, nothing is ever deleted."""

    keep_last: int | None = None
    """The N newest checkpoints."""
    keep_every: int | None = None
    """Every checkpoint whose step is a multiple of K (long-term history)."""
    keep_best: int | None = None
    """The K best checkpoints by ``metric`` (as passed to ``Checkpointer.step(metrics=...)``)."""
    metric: str | None = None
    mode: MetricMode = "min"
    """``min`` for losses, ``max`` for accuracies."""

    def __post_init__(self) -> None:
        _positive("keep_last", self.keep_last)
        _positive("keep_every", self.keep_every)
        _positive("keep_best", self.keep_best)
        if self.keep_best is not None and not self.metric:
            raise ConfigError("keep_best needs the name of a metric (metric=...)")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {self.mode!r}")

    @property
    def keeps_everything(self) -> bool:
        return self.keep_last is None and self.keep_every is None and self.keep_best is None


@dataclass(kw_only=True, slots=True)
class TierConfig:
    """One level of copies with its own frequency and retention.

    ``memory`` keeps the newest snapshots in host memory (in-process rollback, no I/O);
    ``local`` writes Zarr to a local path; ``remote`` to any fsspec URL (S3 first).
    """

    kind: TierKind
    uri: str | None = None
    """Run root (path or URL); required for ``local`` and ``remote``."""
    every: int | None = None
    """Save every N steps (None: only on time, on signals and on forced saves)."""
    every_seconds: float | None = None
    """Save when this many seconds have passed since this tier's last save."""
    retention: Retention = field(default_factory=Retention)
    codec: CodecSpec | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    threads: int = 8
    """Encode/write threads of this tier's writer (compression and file I/O release the GIL)."""
    storage_options: dict[str, Any] | None = None
    direct_io: bool = False
    """``local`` tiers: write shard files with ``O_DIRECT``, around the page cache. A checkpoint
    then leaves the page cache (the training data's included) alone and, in our A/Bs, costs a
    training loop that fills every core less time; it takes longer to become durable (README,
    "FSDP2, tensor parallelism and DTensor states")."""

    def __post_init__(self) -> None:
        if self.kind not in ("memory", "local", "remote"):
            raise ConfigError(f"unknown tier kind {self.kind!r} (memory, local or remote)")
        if self.kind != "memory" and not self.uri:
            raise ConfigError(f"a {self.kind} tier needs a uri")
        if self.kind == "local" and self.uri and "://" in self.uri and not self.uri.startswith("file://"):
            raise ConfigError(f"local tier uri {self.uri!r} is a URL; use a remote tier")
        if self.kind == "memory" and self.retention.keep_last is None:
            self.retention = Retention(keep_last=1)  # host memory is bounded: never "keep all"
        if self.kind == "memory" and (self.retention.keep_every or self.retention.keep_best):
            raise ConfigError("the memory tier supports keep_last only")
        _positive("every", self.every)
        _positive("every_seconds", self.every_seconds)
        _positive("chunk_bytes", self.chunk_bytes)
        _positive("threads", self.threads)
        if self.direct_io and self.kind != "local":
            raise ConfigError(f"direct_io applies to local tiers only, not to a {self.kind} tier "
                              f"({self.uri})")

    @property
    def name(self) -> str:
        return self.kind if self.kind == "memory" else f"{self.kind}:{self.uri}"

    @staticmethod
    def memory(*, every: int | None = None, every_seconds: float | None = None,
               keep_last: int = 1) -> TierConfig:
        return TierConfig(kind="memory", every=every, every_seconds=every_seconds,
                          retention=Retention(keep_last=keep_last))

    @staticmethod
    def durable(uri: str, **kwargs: Any) -> TierConfig:
        """A ``local`` tier for paths and ``file://``, a ``remote`` tier for any other URL."""
        kind: TierKind = "local" if "://" not in uri or uri.startswith("file://") else "remote"
        return TierConfig(kind=kind, uri=uri, **kwargs)


@dataclass(kw_only=True, slots=True)
class ShardSpec:
    """The part of a canonical tensor this rank holds (and writes), for distributed states.

    A rank restoring with another mesh passes its *new* specs: it reads exactly its new box.
    """

    shape: tuple[int, ...]
    """Global (canonical) shape."""
    box: ShardBox
    """This rank's box in global coordinates; the local tensor has ``box.shape``."""
    layout: TensorLayout | None = None
    mesh: Mapping[str, int] | None = None
    write: bool = True
    """False on the replicas of a replicated box: each box is written by exactly one rank."""
    boxes: tuple[ShardBox, ...] | None = None
    """Every writer's box (the storage plan needs the set); default: from ``layout`` and ``mesh``.
    Needed where no ``TensorLayout`` describes the split (DTensor specs always carry it)."""

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if not self.box.fits_in(self.shape):
            raise LayoutError(f"box {self.box.to_json()} lies outside the global shape {list(self.shape)}")
        if self.layout is not None and self.mesh is None:
            raise LayoutError("a layout needs the mesh it refers to (mesh=...)")

    @staticmethod
    def of(value: ShardSpec | Sequence[Any]) -> ShardSpec:
        """Accept a spec or a tuple ``(global_shape, box[, layout, mesh[, write]])``."""
        if isinstance(value, ShardSpec):
            return value
        items = list(value)
        if len(items) < 2:
            raise LayoutError(f"a shard spec needs at least (global_shape, box), got {value!r}")
        return ShardSpec(shape=tuple(items[0]), box=items[1], layout=items[2] if len(items) > 2 else None,
                         mesh=items[3] if len(items) > 3 else None,
                         write=bool(items[4]) if len(items) > 4 else True)


@dataclass(kw_only=True, slots=True)
class CatalogConfig:
    """Where the REST catalog is and how the engine talks to it (rank 0 only; see ``catalog.py``).

    Nothing here can make training wait: notifications go through a bounded queue to one
    background thread, and a catalog that does not answer only costs dropped notifications
    (``ckptd catalog sync URI`` reconciles from storage later).
    """

    url: str
    """``http://host:port`` of ``ckptd serve``."""
    token: str | None = field(default_factory=lambda: os.environ.get("CKPTD_API_TOKEN") or None)
    """Bearer token for the mutating calls (default ``$CKPTD_API_TOKEN``)."""
    poll_s: float | None = 10.0
    """Seconds between reads of the run's rollback pointer while training (None: never poll;
    ``restore()`` still honours a pointer set before the job started)."""
    queue_size: int = 1024
    """Notifications waiting for the catalog; beyond this, new ones are dropped (and counted)."""
    timeout_s: float = 2.0
    """Per-attempt HTTP timeout of the engine's calls."""
    deadline_s: float = 5.0
    """One call, its retries included, never takes longer than this."""
    close_timeout_s: float = 10.0
    """How long ``close()`` lets queued notifications drain while the catalog answers."""

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"catalog must be an http(s):// URL, got {self.url!r}")
        _positive("poll_s", self.poll_s)
        _positive("queue_size", self.queue_size)
        _positive("timeout_s", self.timeout_s)
        _positive("deadline_s", self.deadline_s)
        if self.close_timeout_s < 0:
            raise ConfigError(f"close_timeout_s must be >= 0, got {self.close_timeout_s}")


@dataclass(kw_only=True, slots=True)
class CheckpointerConfig:
    """Everything ``ckptd.Checkpointer`` takes besides the live state."""

    uri: str
    """Run root of the primary durable tier (a local path or any fsspec URL)."""
    every: int | None = None
    every_seconds: float | None = None
    retention: Retention = field(default_factory=Retention)
    memory_keep: int = 1
    """Snapshots kept in host memory for in-process rollback (0: no memory tier)."""
    tiers: Sequence[TierConfig] = ()
    """Extra tiers (e.g. a fast local disk beside an S3 run root), each with its own policy."""
    codec: CodecSpec | str | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    threads: int = 8
    storage_options: dict[str, Any] | None = None
    direct_io: bool = False
    """The primary tier writes shard files with ``O_DIRECT`` (a local ``uri`` only; see
    ``TierConfig.direct_io``)."""
    host_budget_bytes: int | None = None
    """Upper bound of the (pinned) host pool; None: as many snapshot slots as the tiers need."""
    lazy: bool = True
    """Copy optimizer-owned tensors in the background and block only in the optimizer pre-step
    hook; False copies everything before ``step()`` returns."""
    copy_chunk_bytes: int = 64 * 2**20
    handle_signals: bool = True
    exit_on_preempt: bool = True
    """After the SIGTERM checkpoint is durable, raise ``SystemExit`` from ``step()``."""
    save_rng: bool = True
    catalog: CatalogConfig | str | None = None
    """The REST catalog (a URL or a ``CatalogConfig``); a URL becomes ``CatalogConfig(url=...)``."""
    run_name: str | None = None
    """The run's name in the catalog (default: the last segment of ``uri``)."""
    commit_timeout_s: float = 600.0
    """How long a rank waits for the others during a commit (a dead or stuck rank ends the attempt,
    with nothing committed, after this long)."""
    agree_every: int = 1
    """Step boundaries between two (asynchronous) agreements of the ranks on time-based policies,
    preemption signals, rollbacks and free tiers. A flag raised on any rank is acted on by every
    rank within ``2 * agree_every`` step boundaries; larger values make ``step()`` cheaper."""

    def __post_init__(self) -> None:
        _positive("agree_every", self.agree_every)
        if not isinstance(self.uri, str) or not self.uri:
            raise ConfigError("Checkpointer needs a run root uri")
        _positive("every", self.every)
        _positive("every_seconds", self.every_seconds)
        _positive("chunk_bytes", self.chunk_bytes)
        _positive("copy_chunk_bytes", self.copy_chunk_bytes)
        _positive("threads", self.threads)
        _positive("host_budget_bytes", self.host_budget_bytes)
        _positive("commit_timeout_s", self.commit_timeout_s)
        if self.memory_keep < 0:
            raise ConfigError(f"memory_keep must be >= 0, got {self.memory_keep}")
        if isinstance(self.codec, str):
            self.codec = CodecSpec.parse(self.codec)
        if isinstance(self.catalog, str):
            self.catalog = CatalogConfig(url=self.catalog)
        for t in self.tiers:
            if not isinstance(t, TierConfig):
                raise ConfigError(f"tiers must be TierConfig values (TierConfig.durable(uri), "
                                  f"TierConfig.memory()), got {t!r}")
        names = [t.name for t in self.tiers]
        if len(names) != len(set(names)):
            raise ConfigError(f"tiers are listed twice: {names}")

    def all_tiers(self) -> list[TierConfig]:
        """The tiers in order fastest first: memory, then local, then remote."""
        codec = self.codec if isinstance(self.codec, CodecSpec) else None
        tiers = list(self.tiers)
        primary = TierConfig.durable(self.uri, every=self.every, every_seconds=self.every_seconds,
                                     retention=self.retention, codec=codec, chunk_bytes=self.chunk_bytes,
                                     threads=self.threads, storage_options=self.storage_options,
                                     direct_io=self.direct_io)
        if all(t.name != primary.name for t in tiers):
            tiers.append(primary)
        if self.memory_keep and all(t.kind != "memory" for t in tiers):
            tiers.append(TierConfig.memory(every=self.every, every_seconds=self.every_seconds,
                                           keep_last=self.memory_keep))
        order = {"memory": 0, "local": 1, "remote": 2}
        return sorted(tiers, key=lambda t: order[t.kind])
