"""Installed = tested: the built wheel, installed alone into a fresh venv, upgrades a catalog
database, serves the web page with its static files, and passes the browser test.

The fresh venv borrows only the *dependencies* from the test venv: a ``.pth`` file names the
test venv's site-packages directories, and Python does not process ``.pth`` files in a directory added that
way, so the checkout's editable install (itself a ``.pth`` file) cannot leak in.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.api import test_web
from tests.api.conftest import AUTH, TOKEN, LiveServer

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Installed:
    wheel: Path
    venv: Path
    env: dict[str, str]

    def run(self, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=300, check=False
        )


def _build_wheel(out: Path) -> Path:
    """``pip wheel --no-deps --no-build-isolation`` of a copy of the sources the wheel is made of."""
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    src = out / "src-copy"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in {Path(d).parts[0] for d in setuptools_cfg["package-dir"].values()}:
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*pip_wheel, str(src), "-w", str(out)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("ckptd-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp)
    venv = tmp / "fresh-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = venv.glob("lib/python3*/site-packages")
    # every site-packages directory the test interpreter sees (a venv may chain to another's)
    deps = [p for p in sys.path if Path(p).name == "site-packages"]
    assert sysconfig.get_paths()["purelib"] in deps
    (site / "test-venv-dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "PYTHONNOUSERSITE": "1"}
    env |= {"CKPTD_API_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "HOME": str(tmp)}
    env.pop("CKPTD_MIGRATIONS_DIR", None)
    inst = Installed(wheel, venv, env)
    done = inst.run(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--ignore-installed", str(wheel), cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return inst


def test_wheel_holds_the_package_data_and_no_tests(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    scripts = (ROOT / "migrations" / "versions").glob("*.py")
    versions = {f"ckptd/migrations/versions/{p.name}" for p in scripts}
    assert versions, "no migrations in the checkout"
    expected = {
        "ckptd/py.typed",
        "ckptd/format/SPEC.md",
        "ckptd/api/static/index.html",
        "ckptd/api/static/app.js",
        "ckptd/migrations/env.py",
        "ckptd/migrations/script.py.mako",
        "ckptd/testing/store_conformance.py",
        *versions,
    }
    assert expected <= names, sorted(expected - names)
    assert {n.split("/")[0] for n in names} == {"ckptd", "ckptd-0.1.0.dist-info"}
    assert not [n for n in names if "tests/" in n or "/conftest.py" in n]


def test_the_installed_package_comes_from_the_wheel(installed: Installed, tmp_path: Path) -> None:
    code = "import ckptd, ckptd.api.db as db; print(ckptd.__file__); print(db.migrations_dir())"
    done = installed.run(str(installed.venv / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    package_file, migrations = (Path(line) for line in done.stdout.splitlines())
    assert package_file.is_relative_to(installed.venv), package_file
    assert migrations.is_relative_to(installed.venv) and (migrations / "env.py").is_file(), migrations


class Served:
    """``ckptd serve`` from the fresh venv on port 0; its URL read from uvicorn's log."""

    def __init__(self, installed: Installed, db_url: str, cwd: Path) -> None:
        argv = [str(installed.venv / "bin" / "ckptd"), "serve", "--db", db_url, "--port", "0",
                "--allow-root", str(cwd)]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=installed.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.url = ""
        found = threading.Event()

        def read() -> None:  # drains the pipe for the life of the process
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if m := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
                    self.url = m.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(120):
            self.stop()
            raise AssertionError("ckptd serve did not start:\n" + "".join(self.lines[-30:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def database(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A new SQLite file brought to the newest revision by the installed ``ckptd db upgrade``."""
    tmp = tmp_path_factory.mktemp("wheel-db")
    url = f"sqlite:///{tmp / 'catalog.db'}"
    done = installed.run(str(installed.venv / "bin" / "ckptd"), "db", "upgrade", "--db", url, cwd=tmp)
    assert done.returncode == 0, done.stdout + done.stderr
    return url


@pytest.fixture(scope="module")
def served(installed: Installed, database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = Served(installed, database, tmp_path_factory.mktemp("wheel-serve"))
    yield server.url
    server.stop()


def test_db_upgrade_from_the_wheel_creates_the_schema(database: str) -> None:
    newest = sorted((ROOT / "migrations" / "versions").glob("*.py"))[-1].read_text()
    head = re.search(r'^revision(?:: str)? = "([^"]+)"', newest, re.M)
    assert head, "the newest migration names no revision"
    with sqlite3.connect(database.removeprefix("sqlite:///")) as conn:
        (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert version == head.group(1)
    assert {"runs", "checkpoints"} <= tables, tables


def test_the_installed_server_serves_the_page_and_its_script(served: str) -> None:
    with httpx.Client(base_url=served, timeout=30) as client:
        page = client.get("/")
        script = client.get("/static/app.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.content == (ROOT / "api" / "static" / "app.js").read_bytes()


@pytest.mark.skipif(not Path(test_web.CHROMIUM).exists(), reason=f"{test_web.CHROMIUM} is absent")
def test_browser_page_against_the_installed_server(served: str, database: str, tmp_path: Path) -> None:
    # The same assertions as tests/api/test_web.py, against the wheel's server instead of the checkout's.
    with httpx.Client(base_url=served, headers=AUTH, timeout=30) as api:
        test_web.test_page_lists_runs_and_draws_the_chart(LiveServer(served, database, None), api, tmp_path)
