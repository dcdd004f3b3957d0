"""Machine description recorded next to every benchmark result."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any


def describe() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


def write_results(name: str, out: str | None, args: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """Write ``results`` with the machine description to ``out`` (default:
    benchmarks/results/<name>-<UTC timestamp>.json); returns the path."""
    import json
    import time
    from pathlib import Path

    path = out or str(
        Path(__file__).parent / "results" / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    )
    Path(path).write_text(json.dumps({"machine": describe(), "args": args, "results": results}, indent=1))
    return path
