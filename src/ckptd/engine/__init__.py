"""The snapshot engine behind ``ckptd.Checkpointer``.

One concern per module: ``config`` (validated settings), ``policy`` (when to save, what to
keep), ``pool`` (reused host memory), ``snapshot`` (consistent lazy copies), ``tiers``
(memory / local / remote), ``flusher`` (background persistence), ``coordination``
(agreement between ranks), ``signals`` (preemption), ``rng``, ``catalog`` (the seam to the
REST catalog) and ``checkpointer`` (the public context manager).
"""

from ckptd.engine.checkpointer import Checkpointer
from ckptd.engine.config import CatalogConfig, CheckpointerConfig, Retention, ShardSpec, TierConfig

__all__ = ["CatalogConfig", "Checkpointer", "CheckpointerConfig", "Retention", "ShardSpec", "TierConfig"]
