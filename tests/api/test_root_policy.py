"""What a token holder may make the catalog delete: only ``<root>/step_<10 digits>`` of a run whose
root lies under a prefix the server operator allowed (``ckptd serve --allow-root``), and roots
cannot move once the run has a checkpoint.

Each test starts a server whose only allowed prefix is ``<tmp>/allowed``; the "victim" directory
beside it stands for anything else on the host.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ckptd.api.settings import CatalogSettings, parse_allow_roots
from tests.api.conftest import AUTH, FreshDatabases, start_server, unique

V1 = "/api/v1"


@pytest.fixture
def fenced(databases: FreshDatabases, tmp_path: Path) -> Iterator[tuple[httpx.Client, Path, Path]]:
    allowed, victim = tmp_path / "allowed", tmp_path / "victim"
    allowed.mkdir()
    (victim / "data").mkdir(parents=True)
    (victim / "data" / "precious.txt").write_text("keep me")
    live, stop = start_server(databases.new(), settings={"allow_roots": (str(allowed), "s3://bucket/team")})
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as api:
        yield api, allowed, victim
    stop()


def test_the_reported_attack_deletes_nothing_outside_the_allowed_roots(
    fenced: tuple[httpx.Client, Path, Path],
) -> None:
    api, allowed, victim = fenced
    # 1. a run rooted at the victim directory: refused
    name = unique()
    r = api.post(f"{V1}/runs", json={"name": name, "roots": {"local": str(victim)}})
    assert r.status_code == 422 and "allowed" in r.json()["detail"]
    # 2. a legitimate run, then PATCH its root onto the victim: refused as well
    root = allowed / name
    assert api.post(f"{V1}/runs", json={"name": name, "roots": {"local": str(root)}}).status_code == 201
    r = api.patch(f"{V1}/runs/{name}", json={"roots": {"local": str(victim)}})
    assert r.status_code == 422
    # 3. a checkpoint whose location is any path under the root but not its step directory
    for uri in (str(root / "data"), str(root / "step_0000000001" / "model"), str(root / "step_1")):
        body = {"step": 1, "locations": [{"tier": "local", "uri": uri}]}
        r = api.post(f"{V1}/runs/{name}/checkpoints", json=body)
        assert r.status_code == 422, (uri, r.text)
    # the step directory of another step is not this checkpoint's location either
    body = {"step": 1, "locations": [{"tier": "local", "uri": str(root / "step_0000000002")}]}
    assert api.post(f"{V1}/runs/{name}/checkpoints", json=body).status_code == 422
    # 4. failed + GC: only the checkpoint's own step directory goes
    step_dir = root / "step_0000000001"
    (step_dir / "shard").mkdir(parents=True)
    (root / "data").mkdir()
    body = {"step": 1, "locations": [{"tier": "local", "uri": str(step_dir)}]}
    ckpt = api.post(f"{V1}/runs/{name}/checkpoints", json=body)
    assert ckpt.status_code == 201, ckpt.text
    assert api.patch(f"{V1}/checkpoints/{ckpt.json()['id']}", json={"state": "failed"}).status_code == 200
    result = api.post(f"{V1}/runs/{name}/gc").json()
    assert [e["step"] for e in result["deleted"]] == [1]
    assert not step_dir.exists() and (root / "data").is_dir()
    assert (victim / "data" / "precious.txt").read_text() == "keep me"


def test_roots_are_immutable_once_a_checkpoint_exists(fenced: tuple[httpx.Client, Path, Path]) -> None:
    api, allowed, _ = fenced
    name = unique()
    root = allowed / name
    assert api.post(f"{V1}/runs", json={"name": name, "roots": {"local": str(root)}}).status_code == 201
    # no checkpoint yet: the operator may still fix a typo
    fixed = allowed / (name + "-fixed")
    assert api.patch(f"{V1}/runs/{name}", json={"roots": {"local": str(fixed)}}).status_code == 200
    body = {"step": 3, "locations": [{"tier": "local", "uri": str(fixed / "step_0000000003")}]}
    assert api.post(f"{V1}/runs/{name}/checkpoints", json=body).status_code == 201
    r = api.patch(f"{V1}/runs/{name}", json={"roots": {"local": str(allowed / "elsewhere")}})
    assert r.status_code == 409 and "checkpoint" in r.json()["detail"]
    assert api.patch(f"{V1}/runs/{name}", json={"roots": {}}).status_code == 409  # nor dropped
    # a tier without a root may still get one (an engine restarted with a remote tier added)
    r = api.patch(
        f"{V1}/runs/{name}", json={"roots": {"local": str(fixed), "remote": f"s3://bucket/team/{name}"}}
    )
    assert r.status_code == 200, r.text
    assert api.get(f"{V1}/runs/{name}").json()["roots"]["local"] == str(fixed)


@pytest.mark.parametrize(
    "root",
    [
        "s3://bucket/other/x",
        "s3://bucket/teamx/run",
        "s3://bucketx/team/run",
        "gs://bucket/team/run",
        "/etc/x",
    ],
)
def test_roots_outside_every_allowed_prefix_are_refused(
    fenced: tuple[httpx.Client, Path, Path], root: str
) -> None:
    api, _, _ = fenced
    r = api.post(f"{V1}/runs", json={"name": unique(), "roots": {"remote": root}})
    assert r.status_code == 422, r.text


def test_a_symlink_inside_an_allowed_prefix_does_not_lead_out_of_it(
    fenced: tuple[httpx.Client, Path, Path],
) -> None:
    api, allowed, victim = fenced
    os.symlink(victim, allowed / "link")
    r = api.post(f"{V1}/runs", json={"name": unique(), "roots": {"local": str(allowed / "link" / "run")}})
    assert r.status_code == 422 and "allowed" in r.json()["detail"]


def test_gc_does_not_follow_a_symlinked_step_directory(fenced: tuple[httpx.Client, Path, Path]) -> None:
    api, allowed, victim = fenced
    name = unique()
    root = allowed / name
    root.mkdir()
    assert api.post(f"{V1}/runs", json={"name": name, "roots": {"local": str(root)}}).status_code == 201
    step_dir = root / "step_0000000001"
    body = {"step": 1, "locations": [{"tier": "local", "uri": str(step_dir)}]}
    ckpt = api.post(f"{V1}/runs/{name}/checkpoints", json=body).json()
    os.symlink(victim / "data", step_dir)  # swapped in after registration
    assert api.patch(f"{V1}/checkpoints/{ckpt['id']}", json={"state": "failed"}).status_code == 200
    result = api.post(f"{V1}/runs/{name}/gc").json()
    assert [e["step"] for e in result["failed"]] == [1] and "symlink" in result["failed"][0]["reason"]
    assert (victim / "data" / "precious.txt").read_text() == "keep me"


def test_the_default_allows_only_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CKPTD_ALLOW_ROOTS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = CatalogSettings(database_url="sqlite://")
    assert settings.allow_roots == (str(tmp_path / ".local" / "share" / "ckptd"),)
    monkeypatch.setenv("CKPTD_ALLOW_ROOTS", f"/data/a{os.pathsep}s3://bucket/x,/data/b")
    assert CatalogSettings(database_url="sqlite://").allow_roots == ("/data/a", "s3://bucket/x", "/data/b")


@pytest.mark.parametrize("bad", ["relative", "http://x/y", "/a/../b", ""])
def test_bad_allowed_roots_are_refused_at_startup(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_allow_roots(bad) if bad else CatalogSettings(database_url="sqlite://", allow_roots=(bad,))


def test_serve_refuses_a_bad_allowed_root_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from ckptd.cli.main import main

    for var in ("CKPTD_ALLOW_ROOTS", "CKPTD_DATABASE_URL", "CKPTD_ALLOWED_HOSTS"):
        # serve exports its flags to the environment: setenv first, so that monkeypatch restores
        # "unset" after the test (a bare delenv of an unset variable records nothing to undo, and the
        # bad root would leak into every later server this process starts)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    db = f"sqlite:///{tmp_path / 'c.db'}"
    assert main(["serve", "--db", db, "--allow-root", "relative/dir"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ckptd: error: allowed root 'relative/dir'")


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--allow-root", "relative/dir"], "ckptd: error: allowed root 'relative/dir'"),
        (["--allowed-host", "ckptd.example.com", "--max-body-bytes", "5", "--allow-root", "/srv/runs"],
         "ckptd: error: max_body_bytes must be between 1 KiB and 1 GiB"),
    ],
)
def test_a_refused_serve_flag_leaves_the_environment_as_it_was(
    flags: list[str], error: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from ckptd.cli.main import main

    monkeypatch.setenv("CKPTD_ALLOW_ROOTS", str(tmp_path))  # what the operator had set before
    for var in ("CKPTD_DATABASE_URL", "CKPTD_MAX_BODY_BYTES", "CKPTD_ALLOWED_HOSTS"):
        monkeypatch.setenv(var, "")  # so that monkeypatch restores "unset" if serve leaks it
        monkeypatch.delenv(var)
    before = dict(os.environ)
    assert main(["serve", "--db", f"sqlite:///{tmp_path / 'c.db'}", *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(error)
    assert dict(os.environ) == before
