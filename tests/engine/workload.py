"""A tiny deterministic training workload shared by the engine tests and their worker scripts.

Everything that makes resuming hard is here on purpose: dropout (torch RNG), data drawn
from numpy and python RNGs, Adam (lazily created state with a tensor step counter), an LR
scheduler, a BatchNorm buffer updated in forward, and a data-position counter.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def make(seed: int = 0, width: int = 32) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(width, 1),
    )
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.9)
    return {"model": model, "optim": optim, "sched": sched, "data": {"position": 0}}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_step(state: dict[str, Any], width: int = 32) -> float:
    model, optim, sched = state["model"], state["optim"], state["sched"]
    x = torch.from_numpy(np.random.standard_normal((16, width)).astype(np.float32))
    x = x * (1.0 + random.random())
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(16, 1)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optim.zero_grad()
    loss.backward()
    optim.step()
    sched.step()
    state["data"]["position"] += 16
    return float(loss.item())


def params(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.clone() for k, v in state["model"].state_dict().items()}
    for i, st in state["optim"].state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim/{i}/{k}"] = v.clone()
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
