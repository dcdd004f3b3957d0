"""Import budgets of the CLI and the leaf modules (issue 11): each command runs in a fresh interpreter
and reports which heavy packages it loaded. Commands that touch no tensor data never load torch; the
catalog client loads neither torch nor FastAPI; ``ckptd --help`` starts at once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptd
from tests.api.server_process import ckptd_serve

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "fastapi", "sqlalchemy", "pydantic", "uvicorn")
_MARK = "@@loaded="

# runs `ckptd ARGV` in-process of a fresh interpreter, then names the heavy packages it loaded
_PROBE = f"""
import json, sys
from ckptd.cli.main import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print({_MARK!r} + json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
sys.exit(rc)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def ckptd_cli(*argv: str, code: str = _PROBE) -> tuple[int, str, set[str]]:
    """Exit code, output (without the probe line) and the heavy packages loaded by ``ckptd ARGV``."""
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, env=_env(), timeout=120
    )
    lines = done.stdout.splitlines()
    marks = [line for line in lines if line.startswith(_MARK)]
    assert marks, f"no probe line; stderr:\n{done.stderr[-2000:]}"
    out = "\n".join(line for line in lines if not line.startswith(_MARK))
    return done.returncode, out + done.stderr, set(json.loads(marks[-1][len(_MARK) :]))


@pytest.fixture()
def run_root(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    for step in (10, 20):
        ckptd.save(
            {"w": torch.arange(6.0) * step, "emb": torch.ones(2, dtype=torch.bfloat16)}, str(root), step=step
        )
    return root


def test_import_ckptd_and_the_catalog_client_load_neither_torch_nor_fastapi() -> None:
    code = (
        "import sys, ckptd, ckptd.api.client, ckptd.wire.contract\n"
        "assert ckptd.api.client.CatalogClient.__module__ == 'ckptd.wire.client'\n"
        # lazy, yet complete: dir() lists every public name before any is loaded
        "assert set(ckptd.__all__) <= set(dir(ckptd)), set(ckptd.__all__) - set(dir(ckptd))\n"
        "assert issubclass(ckptd.CheckpointNotFoundError, FileNotFoundError)\n"
        f"print({_MARK!r} + __import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    rc, out, loaded = ckptd_cli(code=code)
    assert rc == 0, out
    assert loaded == set(), f"import ckptd.api.client loaded {sorted(loaded)}"


def test_help_lists_the_commands_without_heavy_imports() -> None:
    rc, out, loaded = ckptd_cli("--help")
    assert rc == 0
    for command in ("ls", "inspect", "verify", "rm", "gc", "serve", "catalog", "convert", "train"):
        assert command in out
    assert loaded == set()


def test_help_starts_within_the_issue_budget() -> None:
    # The issue's contract: `ckptd --help` in <= 0.3 s. This machine is shared by several test runs,
    # so the best of 5 runs is compared (a loaded machine slows some runs, never all of them down).
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "ckptd", "--help"], cwd=REPO, capture_output=True, env=_env()
        )
        times.append(time.perf_counter() - t0)
        assert done.returncode == 0
    assert min(times) <= 0.3, f"ckptd --help took {sorted(times)} s"


def test_ls_inspect_verify_rm_gc_never_import_torch(run_root: Path) -> None:
    uri = str(run_root)
    rc, out, loaded = ckptd_cli("ls", "--json", uri)
    assert rc == 0 and [json.loads(line)["step"] for line in out.splitlines() if line] == [10, 20]
    assert "torch" not in loaded
    rc, out, loaded = ckptd_cli("inspect", "--json", "--step", "10", uri)
    assert rc == 0 and json.loads(out)["arrays"]["emb"]["dtype"] == "bfloat16"
    assert "torch" not in loaded
    rc, out, loaded = ckptd_cli("verify", "--all", "--quiet", uri)
    assert rc == 0, out
    assert "torch" not in loaded
    rc, out, loaded = ckptd_cli("rm", "--step", "10", uri)
    assert rc == 0 and ckptd.open_run(uri).steps() == [20]
    assert "torch" not in loaded
    rc, out, loaded = ckptd_cli("gc", "--min-age", "0", uri)
    assert rc == 0
    assert "torch" not in loaded


def test_a_bad_uri_is_a_clear_error_without_torch(tmp_path: Path) -> None:
    rc, out, loaded = ckptd_cli("inspect", str(tmp_path / "nothing-here"))
    assert rc == 2 and "ckptd: error:" in out and "Traceback" not in out
    assert "torch" not in loaded


def test_db_upgrade_and_catalog_sync_never_import_torch(run_root: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'catalog.db'}"
    rc, out, loaded = ckptd_cli("db", "upgrade", "--db", db)
    assert rc == 0, out
    assert "torch" not in loaded
    rc, out, loaded = ckptd_cli("catalog", "sync", "--db", db, str(run_root))
    assert rc == 0, out
    assert "torch" not in loaded


def test_serve_never_loads_torch(tmp_path: Path) -> None:
    """The catalog server (issue 10: RSS < 300 MB) must not carry torch: its process maps no libtorch."""
    import httpx

    from tests.api.conftest import TOKEN

    server = ckptd_serve(f"sqlite:///{tmp_path / 'catalog.db'}")
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.url, headers=auth) as http:
            assert http.get("/healthz").status_code == 200
            assert http.post("/api/v1/runs", json={"name": "r1"}).status_code == 201
            assert http.get("/api/v1/runs").status_code == 200
            assert http.get("/api/v1/runs/r1").json()["name"] == "r1"
            assert http.get("/api/v1/checkpoints").status_code == 200
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        torch_mapped = [line for line in maps.splitlines() if re.search(r"/torch/|/libtorch\w*\.so", line)]
        assert torch_mapped == [], torch_mapped[:3]
        rss_mb = server.memory_kib()["VmRSS"] / 1024
        print(f"ckptd serve RSS after 5 requests: {rss_mb:.0f} MB")
        assert rss_mb < 300
    finally:
        server.stop()
