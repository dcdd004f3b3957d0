"""The token stream: a deterministic synthetic corpus with learnable structure, or a text file.

Sample ``i`` of the run is a pure function of ``(seed, i)``, and step ``s`` consumes the global
samples ``[s * global_batch, (s + 1) * global_batch)``, split into contiguous blocks per dp
rank and then per micro-batch. So the tokens a step trains on do not depend on the parallel
layout, and resuming at step ``s`` needs no data-loader state beyond ``s`` itself.

The synthetic corpus is a sparse Markov chain: every token has four possible successors
with fixed probabilities. A model that learns the bigram table drops from ``ln(vocab)`` to
about 1.2 nats, which a small GPT does within a few dozen steps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ckptd.training.config import DataConfig

_SUCCESSORS = 4
_PROBS = (0.55, 0.25, 0.15, 0.05)


class TokenSource:
    """Samples of ``seq_len + 1`` tokens (inputs and shifted targets), keyed by global index."""

    def __init__(self, cfg: DataConfig, vocab_size: int) -> None:
        self.cfg, self.vocab_size = cfg, vocab_size
        self._text: torch.Tensor | None = None
        if cfg.text_file is not None:
            raw = Path(cfg.text_file).read_bytes()
            if len(raw) < cfg.seq_len + 2:
                raise ValueError(f"{cfg.text_file} has {len(raw)} bytes; it needs more than seq_len + 1")
            if vocab_size < 256:
                raise ValueError(f"byte-level text needs vocab_size >= 256, got {vocab_size}")
            self._text = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        gen = torch.Generator().manual_seed(cfg.seed)
        self._next = torch.stack(
            [torch.randperm(vocab_size, generator=gen)[:_SUCCESSORS] for _ in range(vocab_size)]
        )
        self._cdf = torch.tensor(_PROBS).cumsum(0)

    def sample(self, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + index) % 2**63)
        n = self.cfg.seq_len + 1
        if self._text is not None:
            start = int(torch.randint(0, len(self._text) - n + 1, (1,), generator=gen))
            return self._text[start : start + n]
        first = int(torch.randint(0, self.vocab_size, (1,), generator=gen))
        u = torch.rand(n - 1, generator=gen) * float(self._cdf[-1])
        choice: list[int] = torch.searchsorted(self._cdf, u).clamp(max=_SUCCESSORS - 1).tolist()
        tokens = [first]
        for c in choice:
            tokens.append(int(self._next[tokens[-1], c]))
        return torch.tensor(tokens)

    def batch(self, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = torch.stack([self.sample(i) for i in indices])
        return seqs[:, :-1], seqs[:, 1:]

    def micro_batches(self, step: int, *, dp: int, dp_rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This dp rank's micro-batches (inputs, targets) for optimizer step ``step`` (0-based)."""
        cfg = self.cfg
        n_micro = cfg.micro_batches(dp)
        base = step * cfg.global_batch + dp_rank * (cfg.global_batch // dp)
        return [
            self.batch(range(base + m * cfg.micro_batch, base + (m + 1) * cfg.micro_batch))
            for m in range(n_micro)
        ]
