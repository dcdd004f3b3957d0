"""After the engine applies a rollback requested through the catalog, the catalog no longer lists the
abandoned checkpoints as committed: they are ``deleted`` and ``latest_step`` names the target."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from catalog_server import AUTH, TOKEN, checkpoints, thread_server, wait_for
from workload import make, seed_all, train_step

import ckptd
from ckptd.engine import CatalogConfig

pytest.importorskip("fastapi")
V1 = "/api/v1"


def test_rollback_marks_the_discarded_checkpoints_deleted(tmp_path: Path) -> None:
    root = tmp_path / f"run-{uuid.uuid4().hex[:8]}"
    with thread_server(f"sqlite:///{tmp_path / 'catalog.db'}") as url, httpx.Client(
        base_url=url, headers=AUTH, timeout=10
    ) as api:
        state = make()
        seed_all(1)
        link = CatalogConfig(url=url, token=TOKEN, poll_s=0.1)
        with ckptd.Checkpointer(str(root), state=state, every=2, catalog=link) as ck:
            step = ck.restore()
            while step < 8:
                train_step(state)
                step += 1
                ck.step(step, metrics={"loss": float(step)})
                ck.wait()

            def committed() -> list[int]:
                return [c["step"] for c in checkpoints(url, root.name) if c["state"] == "committed"]

            wait_for(lambda: committed() == [2, 4, 6, 8], what="steps 2..8 committed in the catalog")
            assert api.get(f"{V1}/runs/{root.name}").json()["latest_step"] == 8
            r = api.post(f"{V1}/runs/{root.name}/rollback", json={"select": "step:4"})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 20
            while ck.rolled_back is None:
                assert time.monotonic() < deadline, "the rollback was never applied"
                train_step(state)
                step += 1
                ck.step(step)  # steps saved here, before the rollback lands, are abandoned as well
                time.sleep(0.02)
            assert ck.rolled_back == 4

            def states() -> dict[int, str]:
                return {c["step"]: c["state"] for c in checkpoints(url, root.name)}

            def rolled_back() -> bool:
                now = states()
                return {6, 8} <= now.keys() and all(
                    s == ("committed" if k <= 4 else "deleted") for k, s in now.items()
                )

            wait_for(rolled_back, what="every step after 4 deleted in the catalog")
        assert ckptd.open_run(str(root)).steps() == [2, 4]
        assert api.get(f"{V1}/runs/{root.name}").json()["latest_step"] == 4
        latest = api.get(f"{V1}/runs/{root.name}/resolve", params={"select": "latest"}).json()
        assert latest["checkpoint"]["step"] == 4
