"""Tensor parallelism: Megatron-style column/row-parallel linears, vocab-parallel embedding and loss."""

from ckptd.training.tp.cross_entropy import vocab_parallel_cross_entropy
from ckptd.training.tp.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
]
