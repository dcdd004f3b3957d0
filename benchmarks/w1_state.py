"""The W1 state (BENCHMARKS.md): a ~125M-parameter GPT-2-small-shaped model, fp32, with Adam moments."""

from __future__ import annotations

import torch


def w1_state(scale: float = 1.0, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Parameters + exp_avg + exp_avg_sq of a GPT-2 small shaped model (~1.5 GB at scale 1).

    ``scale`` shrinks the number of layers and the vocabulary for quick runs.
    """
    g = torch.Generator().manual_seed(seed)
    d, vocab, layers = 768, max(1024, int(50257 * scale)), max(1, round(12 * scale))
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (vocab, d), "wpe.weight": (1024, d)}
    for i in range(layers):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (d,),
            p + "ln_1.bias": (d,),
            p + "attn.q.weight": (d, d),
            p + "attn.k.weight": (d, d),
            p + "attn.v.weight": (d, d),
            p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d),
            p + "attn.proj.bias": (d,),
            p + "ln_2.weight": (d,),
            p + "ln_2.bias": (d,),
            p + "mlp.fc.weight": (4 * d, d),
            p + "mlp.fc.bias": (4 * d,),
            p + "mlp.proj.weight": (d, 4 * d),
            p + "mlp.proj.bias": (d,),
        }
    shapes |= {"ln_f.weight": (d,), "ln_f.bias": (d,)}

    def rand(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    return {
        "model": {k: rand(s, 0.02) for k, s in shapes.items()},
        "exp_avg": {k: rand(s, 1e-3) for k, s in shapes.items()},
        "exp_avg_sq": {k: rand(s, 1e-3).square() for k, s in shapes.items()},
    }


def nbytes(state: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for group in state.values() for t in group.values())
