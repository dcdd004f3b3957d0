"""Which chunk codec should be the default? Measured on realistic weight data.

Data: weights and Adam moments of a small transformer-shaped MLP stack trained for a
few hundred steps on a synthetic task (no pretrained weights can be downloaded here),
plus the bf16 cast of the weights. For each codec: compression ratio and single-thread
encode/decode throughput, then end-to-end ``ckptd.save`` throughput to local disk
(fsync'd) against a raw fsync'd write of the same bytes in the same run.

    python benchmarks/codecs.py [--out benchmarks/results/codecs-<host>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe

import ckptd
from ckptd.format.codecs import CodecSpec

CODECS = [
    "none",
    "zstd:1",
    "zstd:3",
    "blosc-lz4:1:byte",
    "blosc-zstd:1:byte",
    "blosc-zstd:3:byte",
    "blosc-zstd:1:bit",
]


def trained_state(width: int, layers: int, steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[
            m
            for _ in range(layers)
            for m in (torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width))
        ]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.nn.Linear(width, width)
    for _ in range(steps):
        x = torch.randn(64, width)
        loss = torch.nn.functional.mse_loss(model(x), target(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue
        out[f"fp32_weight/{name}"] = p.detach().clone()
        out[f"bf16_weight/{name}"] = p.detach().bfloat16()
        st = opt.state[p]
        out[f"exp_avg/{name}"] = st["exp_avg"].clone()
        out[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].clone()
    return out


def raw_write(path: str, arrays: list[np.ndarray]) -> float:
    t = time.perf_counter()
    with open(path, "wb") as f:
        for a in arrays:
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    state = trained_state(args.width, args.layers, args.steps)
    kinds = ["fp32_weight", "bf16_weight", "exp_avg", "exp_avg_sq"]
    results: list[dict[str, object]] = []
    for codec_name in CODECS:
        spec = CodecSpec.parse(codec_name)
        for kind in kinds:
            tensors = [t for k, t in state.items() if k.startswith(kind + "/")]
            raw = sum(t.numel() * t.element_size() for t in tensors)
            enc_t, dec_t, stored = [], [], 0
            for _ in range(args.repeats):
                stored = 0
                t0 = time.perf_counter()
                blobs = []
                for t in tensors:
                    buf = t.contiguous().view(torch.uint8).numpy().reshape(-1)
                    parts = spec.encode(memoryview(buf), t.element_size())
                    blob = b"".join(bytes(p) for p in parts)
                    stored += len(blob)
                    blobs.append((blob, buf.nbytes))
                enc_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for blob, n in blobs:
                    spec.decode(blob, n, "bench")
                dec_t.append(time.perf_counter() - t0)
            row = {
                "bench": "codec",
                "codec": codec_name,
                "data": kind,
                "raw_bytes": raw,
                "ratio": round(stored / raw, 4),
                "encode_MBps": round(raw / statistics.median(enc_t) / 1e6, 1),
                "decode_MBps": round(raw / statistics.median(dec_t) / 1e6, 1),
            }
            print(json.dumps(row), flush=True)
            results.append(row)
    # End to end: ckptd.save of the whole state with each codec vs a raw fsync'd write, same run.
    total = sum(t.numel() * t.element_size() for t in state.values())
    with tempfile.TemporaryDirectory(dir=os.environ.get("CKPTD_BENCH_DIR")) as d:
        arrays = [t.contiguous().view(torch.uint8).numpy() for t in state.values()]
        for codec_name in CODECS:
            raw_s, save_s = [], []
            for r in range(args.repeats):
                raw_s.append(raw_write(os.path.join(d, "raw.bin"), arrays))
                os.remove(os.path.join(d, "raw.bin"))
                t0 = time.perf_counter()
                ckptd.save(state, os.path.join(d, "run"), step=r, codec=codec_name, overwrite=True)
                save_s.append(time.perf_counter() - t0)
            row = {
                "bench": "codec_save_local",
                "codec": codec_name,
                "bytes": total,
                "raw_fsync_MBps": round(total / statistics.median(raw_s) / 1e6, 1),
                "save_MBps": round(total / statistics.median(save_s) / 1e6, 1),
                "save_vs_raw": round(statistics.median(raw_s) / statistics.median(save_s), 3),
            }
            print(json.dumps(row), flush=True)
            results.append(row)
    out = args.out or f"benchmarks/results/codecs-{describe()['hostname']}.json"
    Path(out).write_text(json.dumps({"machine": describe(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
