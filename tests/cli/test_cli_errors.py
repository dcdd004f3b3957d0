"""User errors as a user meets them (real ``ckptd`` subprocesses): ``ckptd: error: <one line>``, exit 2,
no traceback, nothing partial left behind — also when the disk fills up half way (``RLIMIT_FSIZE``
in the child makes every write past the limit fail with EFBIG, as a full disk fails with ENOSPC)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ckptd
from ckptd.cli.main import main
from tests import zygote

EXE = Path(sys.executable).with_name("ckptd")
CMD = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "ckptd"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def ckptd_cli(*args: str | Path, cwd: Path, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m ckptd ARGS`` as its own process (a fork of the warm test zygote: torch is not
    imported again), with file sizes capped at ``limit`` bytes to play a full disk."""
    return zygote.run(["-m", "ckptd", *map(str, args)], cwd=cwd, env=ENV, timeout=300, fsize=limit)


def in_process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The same command through ``ckptd.cli.main.main`` (a raised exception fails the test)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = int(e.code or 0)
    return subprocess.CompletedProcess(list(map(str, args)), rc, out.getvalue(), err.getvalue())


def assert_user_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptd: error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tree(p: Path) -> list[str]:
    return sorted(str(q.relative_to(p)) for q in p.rglob("*"))


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src") / "run"
    state = {"model": {f"w{i}": torch.randn(64, 64, generator=torch.Generator().manual_seed(i))
                       for i in range(6)}, "rng": list(range(20_000)), "step": 3}
    ckptd.save(state, str(root), step=3)
    return root


def test_export_into_a_missing_directory(run_root: Path, tmp_path: Path) -> None:
    done = ckptd_cli("export", run_root, tmp_path / "missing" / "x.pt", cwd=tmp_path)
    assert_user_error(done, "does not exist", str(tmp_path / "missing"))
    done = in_process("export", run_root, tmp_path / "missing" / "x.safetensors")
    assert_user_error(done, "does not exist")
    assert tree(tmp_path) == []


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "dcp", "hf"])
def test_disk_full_during_export_leaves_nothing(run_root: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out" / ({"torch": "x.pt", "safetensors": "x.safetensors"}.get(fmt, "dir"))
    out.parent.mkdir()
    (out.parent / "keep").write_bytes(b"an unrelated file")
    done = ckptd_cli("export", run_root, out, "--format", fmt, cwd=tmp_path, limit=20_000)
    assert_user_error(done, f"writing {out} failed")
    assert tree(tmp_path) == ["out", "out/keep"]
    assert in_process("export", run_root, out, "--format", fmt).returncode == 0  # with room, it works


def test_disk_full_during_convert_leaves_nothing(run_root: Path, tmp_path: Path) -> None:
    done = ckptd_cli("convert", run_root, tmp_path / "dst", "--mesh", "tp=2", "--quiet", cwd=tmp_path,
                     limit=10_000)
    assert_user_error(done, "File too large")
    assert tree(tmp_path) == []
    (tmp_path / "existing").mkdir()
    done = ckptd_cli("convert", run_root, tmp_path / "existing", "--mesh", "tp=2", "--quiet", cwd=tmp_path,
                     limit=10_000)
    assert_user_error(done)
    assert tree(tmp_path) == ["existing"]  # the user's directory stays, empty as it was


def test_inspect_into_a_closed_pipe_prints_no_traceback(run_root: Path, tmp_path: Path) -> None:
    for args in (["inspect", "--json"], ["verify"]):
        shell = " ".join([*CMD, *args, str(run_root)]) + " | head -c 1 >/dev/null; echo ${PIPESTATUS[0]} >&2"
        done = subprocess.run(["bash", "-c", shell], env=ENV, capture_output=True, text=True, timeout=300)
        assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, (args, done.stderr)
        assert done.stderr.strip().splitlines()[-1] in ("0", "141"), (args, done.stderr)


def _safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


BAD_IMPORTS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("keys a and a/b",
     lambda d: _safetensors(d / "ab.safetensors", {"a": torch.ones(2), "a/b": torch.ones(3)}), "collide"),
    ("truncated safetensors",
     lambda d: _truncated(_safetensors(d / "t.safetensors", {"x": torch.ones(999)})), "unreadable"),
    ("garbage safetensors", lambda d: _write(d / "g.safetensors", b"garbage, not a header"), "unreadable"),
    ("truncated torch file", lambda d: _truncated(_torch_file(d / "t.pt")), "not a plain tensor checkpoint"),
    ("pickle of an object",
     lambda d: _torch_file(d / "o.pt", {"f": Path("x")}), "holds a pathlib.PosixPath object"),
    ("missing file", lambda d: d / "nothing.pt", "does not exist"),
    ("directory of nothing", lambda d: _mkdir(d / "empty"), "neither a DCP checkpoint"),
]


def _write(p: Path, raw: bytes) -> Path:
    p.write_bytes(raw)
    return p


def _truncated(p: Path) -> Path:
    return _write(p, p.read_bytes()[: p.stat().st_size // 2])


def _torch_file(p: Path, obj: object | None = None) -> Path:
    torch.save(obj if obj is not None else {"a": torch.ones(500)}, p)
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


@pytest.mark.parametrize(("name", "make", "needle"), BAD_IMPORTS, ids=[c[0] for c in BAD_IMPORTS])
def test_bad_imports(tmp_path: Path, name: str, make: Callable[[Path], Path], needle: str) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = make(src_dir)
    (tmp_path / "existing").mkdir()
    for dst in (tmp_path / "new", tmp_path / "existing"):
        assert_user_error(in_process("import", src, dst, "--step", "1"), needle)
    assert not (tmp_path / "new").exists() and tree(tmp_path / "existing") == []


OTHER_USER_ERRORS: list[tuple[str, list[str], str]] = [
    ("codec level not a number", ["convert", "{run}", "{tmp}/d", "--mesh", "tp=2", "--codec", "zstd:abc"],
     "the level must be an integer"),
    ("unknown codec",
     ["convert", "{run}", "{tmp}/d", "--mesh", "tp=2", "--codec", "lzma"], "unknown compressor"),
    ("mesh axis with a slash", ["convert", "{run}", "{tmp}/d", "--mesh", "a/b=2"], "not allowed"),
    ("missing step", ["inspect", "{run}", "--step", "7"], "no committed checkpoint at step 7"),
    ("ls of a missing path", ["ls", "{tmp}/nothing"], "is not a directory"),
    ("verify of an empty root", ["verify", "{tmp}"], "no committed checkpoint"),
    ("rm of a missing step", ["rm", "{run}", "--step", "8"], "no committed checkpoint at step 8"),
    ("export of a missing step", ["export", "{run}", "{tmp}/x.pt", "--step", "8"], "no committed checkpoint"),
    ("export to a directory as a file", ["export", "{run}", "{tmp}"], "is a directory"),
    ("bad shard size", ["export", "{run}", "{tmp}/hf", "--format", "hf", "--max-shard-size", "lots"],
     "bad size"),
]


@pytest.mark.parametrize(("name", "argv", "needle"), OTHER_USER_ERRORS, ids=[c[0] for c in OTHER_USER_ERRORS])
def test_other_user_errors(run_root: Path, tmp_path: Path, name: str, argv: list[str], needle: str) -> None:
    args = [a.format(run=run_root, tmp=tmp_path) for a in argv]
    assert_user_error(in_process(*args), needle)
    assert tree(tmp_path) == []


def test_an_import_error_as_a_subprocess_prints_one_line(tmp_path: Path) -> None:
    src = _safetensors(tmp_path / "ab.safetensors", {"a": torch.ones(2), "a/b": torch.ones(3)})
    assert_user_error(ckptd_cli("import", src, tmp_path / "dst", "--step", "1", cwd=tmp_path), "collide")
    assert tree(tmp_path) == ["ab.safetensors"]
