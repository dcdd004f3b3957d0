"""Configuration of the bundled trainer: one validated dataclass per concern.

Every check that depends only on the configuration runs in ``__post_init__``; checks that
need the world size run in :func:`check_world`. Error messages say what to change, because
the person reading them is usually looking at a ``ckptd train`` command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ckptd.converters.model_facts import MODEL_FACTS_KEY as MODEL_FACTS_KEY  # where facts are recorded

Schedule = Literal["gpipe", "1f1b"]
_FACTS = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff")


class TrainingConfigError(ValueError):
    """A trainer configuration that cannot run; the message names the option to change."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Shape of the GPT."""

    vocab_size: int = 128
    """Tokens in the vocabulary (canonical, unpadded)."""
    n_layers: int = 4
    d_model: int = 64
    """Residual stream width."""
    n_heads: int = 4
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means one per query head."""
    d_ff: int | None = None
    """Hidden width of the MLP; None means 4 * d_model."""
    max_seq_len: int = 64
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    vocab_pad_multiple: int = 8
    """The padded vocabulary is a multiple of this times tp * dp, so every shard has equal rows."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len", "vocab_pad_multiple"):
            if getattr(self, name) <= 0:
                raise TrainingConfigError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise TrainingConfigError(
                f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}: pick a head count "
                f"that divides the width"
            )
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise TrainingConfigError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}: grouped-query "
                "attention needs every key/value head to serve the same number of query heads"
            )
        if self.ffn <= 0:
            raise TrainingConfigError(f"d_ff must be positive, got {self.d_ff}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    def facts(self) -> dict[str, int]:
        """The shape facts that decide which layouts can run this model (see :func:`refuse_layout`)."""
        return {"vocab_size": self.vocab_size, "n_layers": self.n_layers, "d_model": self.d_model,
                "n_heads": self.n_heads, "n_kv_heads": self.kv_heads, "d_ff": self.ffn}

    @staticmethod
    def from_facts(facts: Mapping[str, Any]) -> ModelConfig:
        """The model :meth:`facts` describe (``TrainingConfigError`` when they are malformed)."""
        values: dict[str, int] = {}
        for k in _FACTS:
            v = facts.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TrainingConfigError(f"model fact {k} = {v!r} is not a positive integer")
            values[k] = v
        return ModelConfig(vocab_size=values["vocab_size"], n_layers=values["n_layers"],
                           d_model=values["d_model"], n_heads=values["n_heads"],
                           n_kv_heads=values["n_kv_heads"], d_ff=values["d_ff"])

    def padded_vocab(self, tp: int, dp: int) -> int:
        """Vocabulary rows in the training layout: every tp block splits evenly into dp ZeRO shards."""
        unit = self.vocab_pad_multiple * tp * dp
        return -(-self.vocab_size // unit) * unit


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the world is split. dp is whatever remains: world / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    zero_stage: int = 1
    """0: replicated optimizer; 1: optimizer state sharded over dp; 2: also gradients; 3: also parameters."""
    schedule: Schedule = "1f1b"
    stage_layers: tuple[int, ...] | None = None
    """Layers per pipeline stage (uneven splits); None splits as evenly as possible."""
    vpp: int = 1
    """Virtual pipeline stages per rank (Megatron's interleaved 1F1B): each rank holds ``vpp``
    non-contiguous layer chunks; chunk ``c`` of the ``pp * vpp`` model chunks is on rank ``c % pp``."""
    recompute: bool = False
    """Recompute each transformer block's activations in backward instead of keeping them."""
    bucket_mb: float = 25.0
    """Gradient-reduction bucket size in MiB (0: one parameter per bucket)."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise TrainingConfigError(f"--tp and --pp must be at least 1, got tp={self.tp} pp={self.pp}")
        if self.vpp < 1:
            raise TrainingConfigError(f"--vpp must be at least 1, got {self.vpp}")
        if self.vpp > 1 and (self.pp < 2 or self.schedule != "1f1b"):
            raise TrainingConfigError(
                f"--vpp {self.vpp} interleaves pipeline stages: it needs --pp 2 or more and --schedule 1f1b"
            )
        if self.bucket_mb < 0:
            raise TrainingConfigError(f"--bucket-mb must be >= 0, got {self.bucket_mb}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise TrainingConfigError(f"--zero must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.schedule not in ("gpipe", "1f1b"):
            raise TrainingConfigError(f"pipeline schedule must be 'gpipe' or '1f1b', got {self.schedule!r}")
        if self.stage_layers is not None:
            if len(self.stage_layers) != self.pp * self.vpp:
                raise TrainingConfigError(
                    f"stage_layers {self.stage_layers} lists {len(self.stage_layers)} stages "
                    f"but --pp * --vpp is {self.pp * self.vpp}"
                )
            if any(n < 1 for n in self.stage_layers):
                raise TrainingConfigError(
                    f"every pipeline stage needs at least one layer: {self.stage_layers}"
                )

    def check_model(self, model: ModelConfig) -> None:
        """Fail early, with the option to change, when the model cannot be split this way."""
        if self.pp > model.n_layers:
            raise TrainingConfigError(
                f"--pp {self.pp} asks for more pipeline stages than the model has layers ({model.n_layers}): "
                f"use --pp {model.n_layers} or fewer, or a deeper model"
            )
        if self.pp * self.vpp > model.n_layers:
            raise TrainingConfigError(
                f"--pp {self.pp} x --vpp {self.vpp} asks for {self.pp * self.vpp} model chunks but the model "
                f"has {model.n_layers} layers: use --vpp {max(1, model.n_layers // self.pp)} or fewer"
            )
        if self.stage_layers is not None and sum(self.stage_layers) != model.n_layers:
            raise TrainingConfigError(
                f"stage_layers {self.stage_layers} add up to {sum(self.stage_layers)} layers but the model "
                f"has {model.n_layers}"
            )
        for what, n in (("n_heads", model.n_heads), ("n_kv_heads", model.kv_heads), ("d_ff", model.ffn)):
            if n % self.tp:
                raise TrainingConfigError(
                    f"--tp {self.tp} does not divide {what} = {n}: choose a tensor-parallel size that "
                    f"divides {what} (for example --tp {_largest_divisor(n, self.tp)})"
                )

    def check_world(self, world_size: int) -> int:
        """Return dp = world / (tp * pp), or explain which sizes fit."""
        mp = self.tp * self.pp
        if world_size % mp:
            raise TrainingConfigError(
                f"world size {world_size} is not divisible by tp * pp = {self.tp} * {self.pp} = {mp}: "
                f"launch a multiple of {mp} processes (--nproc) or choose --tp/--pp whose product divides "
                f"{world_size}"
            )
        return world_size // mp

    def check_micro_batches(self, n_micro: int) -> None:
        """Interleaving runs micro-batches in groups of pp (Megatron's schedule)."""
        if self.vpp > 1 and n_micro % self.pp:
            raise TrainingConfigError(
                f"--vpp {self.vpp} needs the micro-batches per rank ({n_micro}) to be a multiple of --pp "
                f"{self.pp}: change --global-batch or --micro-batch"
            )

    def layers_per_stage(self, n_layers: int) -> tuple[int, ...]:
        """Layers of each of the ``pp * vpp`` model chunks, in model order."""
        if self.stage_layers is not None:
            return self.stage_layers
        chunks = self.pp * self.vpp
        base, extra = divmod(n_layers, chunks)
        # Extra layers go to the middle chunks: the first and last also hold embedding and head.
        order = sorted(range(chunks), key=lambda s: (s in (0, chunks - 1), s))
        counts = [base] * chunks
        for s in order[:extra]:
            counts[s] += 1
        return tuple(counts)

    def rank_chunks(self, n_layers: int, pp_rank: int) -> tuple[range, ...]:
        """The layer ranges of this pipeline rank's chunks: model chunks ``pp_rank + j * pp``."""
        counts = self.layers_per_stage(n_layers)
        starts = [sum(counts[:c]) for c in range(len(counts))]
        return tuple(range(starts[c], starts[c] + counts[c]) for c in range(pp_rank, len(counts), self.pp))


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW with linear warmup, fp32 master weights."""

    lr: float = 3e-3
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Applied to matrices only (not norms)."""
    grad_clip: float | None = 1.0
    """Global gradient-norm clip over every group; None disables it."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise TrainingConfigError(f"learning rate must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise TrainingConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainingConfigError(f"Adam betas must lie in [0, 1), got {self.betas}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise TrainingConfigError(f"grad_clip must be positive or None, got {self.grad_clip}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        return self.lr


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """The token stream: a synthetic corpus with learnable structure, or a user's text file (bytes)."""

    seq_len: int = 32
    global_batch: int = 8
    """Samples per optimizer step, over all data-parallel ranks."""
    micro_batch: int = 2
    """Samples per pipeline micro-batch on one rank."""
    seed: int = 1234
    text_file: str | None = None
    """Train on the bytes of this file (vocab_size must be at least 256)."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "global_batch", "micro_batch"):
            if getattr(self, name) <= 0:
                raise TrainingConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def micro_batches(self, dp: int) -> int:
        per_rank, rem = divmod(self.global_batch, dp)
        if rem or per_rank % self.micro_batch:
            raise TrainingConfigError(
                f"global batch {self.global_batch} does not split into dp={dp} ranks of micro-batches of "
                f"{self.micro_batch}: use a global batch that is a multiple of dp * micro_batch = "
                f"{dp * self.micro_batch}"
            )
        return per_rank // self.micro_batch


def refuse_layout(facts: Mapping[str, Any], mesh: Mapping[str, int]) -> str | None:
    """Why the trainer would refuse to run the model ``facts`` describe on ``mesh`` (None: it would
    run it). Raises ``TrainingConfigError`` when the facts themselves are malformed."""
    model = ModelConfig.from_facts(facts)
    try:
        ParallelConfig(tp=mesh.get("tp", 1), pp=mesh.get("pp", 1)).check_model(model)
    except TrainingConfigError as e:
        return str(e)
    return None


def _largest_divisor(n: int, below: int) -> int:
    return max(d for d in range(1, below + 1) if n % d == 0)
