"""Start test processes by forking a warm interpreter instead of exec'ing a cold one.

Every rank of a gloo job and every CLI run of the tests used to be a fresh ``python``, which
imports torch (3-4 s of CPU each on this machine) before it does anything. A zygote imports the
heavy third-party modules once -- never ckptd, never the test's own modules, and it runs no
tensor op, so no thread pool exists yet -- and forks one child per process asked for. The child
is a real, separate process: its own pid, environment, working directory, argv and output files;
it can be SIGKILLed and its exit status is reported the way ``subprocess.Popen`` reports it
(negative signal number when killed).

``spawn(argv, env=..., cwd=..., stdout=...)`` returns a ``Popen``-like handle. ``argv`` is what
would follow ``sys.executable``: a script path, ``-m module`` or ``-c code``, optionally after
``-P``. Set ``CKPTD_TEST_ZYGOTE=0`` to fall back to ``subprocess.Popen`` (same interface).

Protocol (one Unix connection per child): the client sends a JSON request with the stdout and
stderr file descriptors attached (SCM_RIGHTS); the zygote answers the child's pid as one line,
and later its wait status as a second line, then closes.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

PRELOAD = ("numpy", "torch", "torch.distributed", "torch.distributed.checkpoint", "zarr", "numcodecs",
           "fsspec", "crc32c", "tqdm")


# --- the zygote ------------------------------------------------------------------------------

def _child(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the requested process, run it, exit with its status."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):  # stdin, stdout, stderr
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        if request.get("fsize") is not None:  # write() then fails with EFBIG instead of killing
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        code = _run_program(request["argv"], request["env"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        _finalize(code)


def _run_program(argv: list[str], env: Mapping[str, str]) -> int:
    import runpy
    import warnings

    safe_path = False
    while argv and argv[0] in ("-P", "-u", "-B"):
        safe_path = safe_path or argv[0] == "-P"
        argv = argv[1:]
    if env.get("PYTHONWARNINGS"):  # what the interpreter would have set up from this environment
        sys.warnoptions[:] = env["PYTHONWARNINGS"].split(",")
        warnings._processoptions(sys.warnoptions)  # type: ignore[attr-defined]
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[:0] = ([] if safe_path else [os.getcwd()]) + extra
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[:0] = ([] if safe_path else [""]) + extra
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        script = os.path.abspath(argv[0])
        sys.argv = [argv[0], *argv[1:]]
        sys.path[:0] = ([] if safe_path else [os.path.dirname(script)]) + extra
        runpy.run_path(script, run_name="__main__")
    return 0


def _finalize(code: int) -> None:
    """What interpreter shutdown does that a program may rely on, then exit without the zygote's."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    children: dict[int, socket.socket] = {}
    parent = os.getppid()
    while True:
        if os.getppid() != parent:  # the test process died without stopping us: never linger
            return
        ready, _, _ = select.select([srv], [], [], 0.02)
        if ready:
            conn, _ = srv.accept()
            raw, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            while not raw.endswith(b"\n"):
                raw += conn.recv(1 << 20)
            request = json.loads(raw)
            if request.get("stop"):
                return
            pid = os.fork()
            if pid == 0:
                srv.close()
                conn.close()
                for other in children.values():
                    other.close()
                _child(request, fds)
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"{status}\n".encode())
                except OSError:
                    pass  # the client is gone
                conn.close()


# --- the client ------------------------------------------------------------------------------

class ZygoteProcess:
    """The part of ``subprocess.Popen``'s interface the tests use."""

    def __init__(self, conn: socket.socket, pipes: dict[str, IO[Any]]) -> None:
        self._conn = conn
        self._buf = b""
        self.pid = int(self._line(None))
        self.returncode: int | None = None
        self.stdin: IO[Any] | None = pipes.get("stdin")
        self.stdout: IO[Any] | None = pipes.get("stdout")
        self.stderr: IO[Any] | None = pipes.get("stderr")

    def _line(self, timeout: float | None) -> str:
        while b"\n" not in self._buf:
            if timeout is not None:
                ready, _, _ = select.select([self._conn], [], [], timeout)
                if not ready:
                    raise subprocess.TimeoutExpired(str(self._conn), timeout)
            piece = self._conn.recv(64)
            if not piece:
                raise RuntimeError("the test zygote went away")
            self._buf += piece
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.wait(timeout=0)
            except subprocess.TimeoutExpired:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            status = int(self._line(timeout))
            self.returncode = os.waitstatus_to_exitcode(status)
            self._conn.close()
        return self.returncode

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]:
        """Like ``Popen.communicate``: feed ``input``, read both pipes to the end, wait."""
        if self.stdin is not None:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        results: dict[str, Any] = {}
        readers = [threading.Thread(target=lambda n=name, f=f: results.__setitem__(n, f.read()), daemon=True)
                   for name, f in (("stdout", self.stdout), ("stderr", self.stderr)) if f is not None]
        for t in readers:
            t.start()
        self.wait(timeout)
        for t in readers:
            t.join()
        return results.get("stdout"), results.get("stderr")

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygote:
    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="ckptd-zygote-")
        self.path = os.path.join(self._dir, "sock")
        # its own output goes nowhere: a zygote outliving its test process must not hold the
        # caller's pipes open (each child gets the caller's own descriptors instead)
        self._proc = subprocess.Popen([sys.executable, __file__, "serve", self.path],
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd="/",
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        atexit.register(self.close)

    def _connect(self) -> socket.socket:
        import time

        deadline = time.monotonic() + 120  # the first connection waits for torch's import
        while True:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(self.path)
                return conn
            except (FileNotFoundError, ConnectionRefusedError):
                conn.close()
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the test zygote did not start") from None
                time.sleep(0.05)

    def spawn(self, request: dict[str, Any], fds: list[int]) -> socket.socket:
        conn = self._connect()
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], fds)
        return conn

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                conn = self._connect()
                conn.sendall(b'{"stop": true}\n')
                conn.close()
                self._proc.wait(timeout=10)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)


_ZYGOTE: Zygote | None = None
Stream = IO[Any] | int | None


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: Stream = None,
    stdout: Stream = None,
    stderr: Stream = None,
    text: bool = False,
    fsize: int | None = None,
) -> Any:
    """Start ``python ARGV`` as ``subprocess.Popen([sys.executable, *ARGV], ...)`` would (a fork of
    the warm zygote unless CKPTD_TEST_ZYGOTE=0). Streams: a file, ``subprocess.PIPE``,
    ``subprocess.STDOUT`` (stderr only) or ``None`` (inherit). ``fsize`` caps the size of files it
    writes (RLIMIT_FSIZE), to play a full disk."""
    env = dict(os.environ if env is None else env)
    cwd = os.getcwd() if cwd is None else os.fspath(cwd)
    if os.environ.get("CKPTD_TEST_ZYGOTE", "1") == "0":
        limit = None if fsize is None else _fsize_limit(fsize)
        return subprocess.Popen([sys.executable, *argv], env=env, cwd=cwd, stdin=stdin, stdout=stdout,
                                stderr=stderr, text=text, preexec_fn=limit)
    global _ZYGOTE
    if _ZYGOTE is None:
        _ZYGOTE = Zygote()
    fds: list[int] = []
    pipes: dict[str, IO[Any]] = {}
    to_close: list[int] = []
    for name, stream, default in (("stdin", stdin, 0), ("stdout", stdout, 1), ("stderr", stderr, 2)):
        if name == "stderr" and stream == subprocess.STDOUT:
            fds.append(fds[1])
        elif stream == subprocess.PIPE:
            r, w = os.pipe()
            mine, theirs = (w, r) if name == "stdin" else (r, w)
            if name == "stdin":  # unbuffered as Popen's: what the test writes reaches the child now
                pipes[name] = os.fdopen(mine, "w", buffering=1) if text else os.fdopen(mine, "wb", 0)
            else:
                pipes[name] = os.fdopen(mine, "r" if text else "rb")
            fds.append(theirs)
            to_close.append(theirs)
        elif stream is None:
            fds.append(default)
        elif isinstance(stream, int):
            fds.append(stream)
        else:
            stream.flush()
            fds.append(stream.fileno())
    request = {"argv": list(argv), "env": env, "cwd": cwd, "fsize": fsize}
    try:
        conn = _ZYGOTE.spawn(request, fds)
    finally:
        for fd in to_close:
            os.close(fd)
    return ZygoteProcess(conn, pipes)


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 300,
    fsize: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([sys.executable, *argv], capture_output=True, text=True)`` through ``spawn``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = spawn(argv, env=env, cwd=cwd, stdout=out, stderr=err, fsize=fsize)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess([sys.executable, *argv], code, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


def _fsize_limit(nbytes: int) -> Any:
    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
