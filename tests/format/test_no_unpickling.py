"""Loading a checkpoint runs no code: no module of ckptd unpickles (checked on the source, with a
self-test that the scan finds what it looks for)."""

from __future__ import annotations

import ast
from pathlib import Path

from damaged import REPO

# ---------------------------------------------------------------------- nothing unpickles

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _source_files() -> list[Path]:
    folders = ["src/ckptd", "format", "converters", "api", "training"]
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


def _unpickling_calls(source: str, filename: str) -> list[str]:
    """Calls that would run code from data: pickle-family loads, torch.load without
    weights_only=True, numpy.load with allow_pickle, eval/exec."""
    offences = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in _PICKLE_MODULES:
            offences += [
                f"{where}: from {node.module} import {a.name}"
                for a in node.names
                if a.name in ("load", "loads", "Unpickler", "open")
            ]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        kwargs = {k.arg: k.value for k in node.keywords}
        if owner in _PICKLE_MODULES and name in ("load", "loads", "Unpickler", "open"):
            offences.append(f"{where}: {owner}.{name}(...)")
        if owner == "torch" and name == "load":
            wo = kwargs.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                offences.append(f"{where}: torch.load without weights_only=True")
        if name == "load" and owner in ("np", "numpy"):
            ap = kwargs.get("allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                offences.append(f"{where}: numpy.load with allow_pickle")
        if name in ("eval", "exec") and not owner:
            offences.append(f"{where}: {name}(...)")
    return offences


def test_no_module_unpickles() -> None:
    files = _source_files()
    assert any(p.parts[-2:] == ("format", "reader.py") for p in files)
    offences = [o for p in files for o in _unpickling_calls(p.read_text(), str(p.relative_to(REPO)))]
    assert not offences, "\n".join(offences)


def test_the_scan_catches_what_it_looks_for() -> None:
    src = (
        "import pickle, torch, numpy as np\n"
        "from pickle import loads\n"
        "pickle.loads(b'')\n"
        "torch.load('x')\n"
        "torch.load('x', weights_only=False)\n"
        "torch.load('x', weights_only=True)\n"
        "np.load('x', allow_pickle=True)\n"
        "np.load('x')\n"
        "eval('1')\n"
    )
    found = _unpickling_calls(src, "sample.py")
    assert [f.split(":")[1] for f in found] == ["2", "3", "4", "5", "7", "9"], found
