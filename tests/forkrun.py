"""A fork server for mutation testing: pay for importing torch once, not once per mutant.

``python tests/forkrun.py serve SOCKET`` imports ckptd with its heavy third-party modules
(torch, sympy, numpy, pytest), forgets ckptd's own modules, then waits.
``python tests/forkrun.py run SOCKET -- ARGS``
(mutmut's runner; it imports nothing heavy) asks the server to fork a child that runs
``pytest ARGS`` and exits with pytest's status. Each child imports ckptd afresh, so it sees the
mutant mutmut just wrote. ``serve SOCKET PATH...`` names the mutated files: their ``.pyc`` is
deleted before every run, so a same-size mutant written within the same second as the previous
one is never served from a stale cache (the other modules keep theirs).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from pathlib import Path

# torch.distributed.tensor too: its first import inside a confined test (file-access audit) would
# be reported as reads outside the case directory.
PRELOAD = ("pytest", "ckptd", "ckptd.converters", "ckptd.cli.main", "ckptd.storage",
           "torch.distributed.tensor", "hypothesis", "pytest_timeout", "anyio.pytest_plugin",
           "_hypothesis_pytestplugin", "schemathesis.pytest.plugin")


def _run_child(conn: socket.socket, args: list[str], fresh: list[str]) -> None:
    import pytest

    for path in fresh:  # the mutated module: never from a .pyc, whatever its mtime says
        stem = Path(path).stem
        # next to the source, and next to the strict editable install's symlink (what is imported)
        for pyc in [*Path(path).parent.glob(f"__pycache__/{stem}.*.pyc"),
                    *Path("build").glob(f"**/__pycache__/{stem}.*.pyc")]:
            pyc.unlink(missing_ok=True)

    code = 3
    try:
        # Plain asserts: nothing to rewrite, so the preloaded plugins are fine and nothing compiles.
        code = int(pytest.main(["--assert=plain", *args]))
    except BaseException as e:  # report, then count the mutant as killed
        print(f"forkrun: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            conn.sendall(struct.pack("<i", code))
        finally:  # the runner may be gone (mutmut's timeout); never fall back into the server loop
            os._exit(0)


def serve(path: str, fresh: list[str]) -> None:
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    # Keep what ckptd imports (torch, sympy, numpy, ...), forget ckptd itself: each child imports
    # it again from the (mutated) source.
    for name in list(sys.modules):
        if name.split(".")[0] == "ckptd":
            del sys.modules[name]
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    while True:
        conn, _ = srv.accept()
        with conn:
            raw = b""
            while not raw.endswith(b"\0"):
                piece = conn.recv(65536)
                if not piece:
                    break
                raw += piece
            args = raw.rstrip(b"\0").decode().split("\x1f")
            if args == ["STOP"]:
                return
            pid = os.fork()
            if pid == 0:
                srv.close()
                _run_child(conn, args, fresh)
            os.waitpid(pid, 0)


def run(path: str, args: list[str]) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        conn.sendall("\x1f".join(args).encode() + b"\0")
        reply = conn.recv(4)
    return struct.unpack("<i", reply)[0] if len(reply) == 4 else 2  # a crashed child: killed


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "stop":
        run(sys.argv[2], ["STOP"])
    else:
        sys.exit(run(sys.argv[2], sys.argv[4:]))
