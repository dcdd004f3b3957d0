"""Record what a process does to one directory tree, as ALICE does: ``strace -f`` into file-system ops.

``trace(argv, root)`` runs ``argv`` under strace and returns the ops that touched ``root``,
in the order the kernel completed them. Each op names inodes, not paths, so a rename
moves data instead of losing it: ``FsModel`` replays the ops and keeps two views of the
tree, what the page cache shows (volatile) and what a power cut would leave (durable).

The model is the weak POSIX one crash-consistency studies assume: file data is durable
after ``fsync``/``fdatasync`` of that file; a directory entry (create, mkdir, rename,
link, unlink) is durable after ``fsync`` of its directory, never by syncing the file.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SYSCALLS = (
    "openat,open,creat,write,writev,pwrite64,pwritev,pwritev2,fsync,fdatasync,sync,syncfs,"
    "sync_file_range,rename,renameat,renameat2,link,linkat,symlink,symlinkat,mkdir,mkdirat,"
    "unlink,unlinkat,rmdir,truncate,ftruncate,fallocate,copy_file_range,sendfile,close,lseek,"
    "dup,dup2,dup3,fcntl"
)
# Calls the model does not replay: fine elsewhere, an error if they touch the traced tree.
UNSUPPORTED = {"symlink", "symlinkat", "truncate", "ftruncate", "fallocate", "copy_file_range", "sendfile"}

_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+|\?)(?:<([^>]*)>)?(.*)$")
_FD = re.compile(r"^(\d+|AT_FDCWD)(?:<([^>]*)>)?$")
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')

ROOT = 0  # inode number of the traced root directory


class TraceError(AssertionError):
    """The trace holds something the model cannot replay faithfully (so the test cannot vouch for it)."""


@dataclass(frozen=True)
class Op:
    kind: str  # mkdir create write fsync link rename unlink rmdir sync
    path: str  # relative to the root (the destination for rename/link)
    inode: int = -1
    parent: int = -1
    name: str = ""
    src_parent: int = -1  # rename/link: where the entry came from
    src_name: str = ""
    offset: int = 0
    length: int = 0


@dataclass
class FsModel:
    """Volatile and durable views of a tree; ``apply`` replays one op on both as the kernel would."""

    kinds: dict[int, str] = field(default_factory=lambda: {ROOT: "dir"})
    entries: dict[int, dict[str, int]] = field(default_factory=lambda: {ROOT: {}})  # page cache
    durable_entries: dict[int, dict[str, int]] = field(default_factory=lambda: {ROOT: {}})
    extents: dict[int, set[tuple[int, int]]] = field(default_factory=dict)  # (offset, length) written
    durable_extents: dict[int, set[tuple[int, int]]] = field(default_factory=dict)
    preexisting: dict[int, str] = field(default_factory=dict)  # inode -> relative path before the trace

    @classmethod
    def of_tree(cls, root: Path) -> FsModel:
        """A model of ``root`` as it is now, entirely durable (the state before the traced process)."""
        m = cls()
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            parent = m.lookup("" if rel == "." else rel)
            for name in sorted(dirnames) + sorted(filenames):
                ino = m.new_inode("dir" if name in dirnames else "file")
                m.entries[parent][name] = m.durable_entries[parent][name] = ino
                if name in filenames:
                    size = (Path(dirpath) / name).stat().st_size
                    m.extents[ino] = {(0, size)} if size else set()
                    m.durable_extents[ino] = set(m.extents[ino])
                    m.preexisting[ino] = os.path.normpath(os.path.join(rel, name))
        return m

    def new_inode(self, kind: str) -> int:
        ino = len(self.kinds)
        self.kinds[ino] = kind
        if kind == "dir":
            self.entries[ino], self.durable_entries[ino] = {}, {}
        else:
            self.extents[ino], self.durable_extents[ino] = set(), set()
        return ino

    def lookup(self, rel: str, *, durable: bool = False) -> int:
        """The inode at ``rel`` (raises ``KeyError`` when some component is missing)."""
        table = self.durable_entries if durable else self.entries
        ino = ROOT
        for part in [p for p in rel.split("/") if p and p != "."]:
            ino = table[ino][part]
        return ino

    def paths(self, *, durable: bool = False) -> dict[str, int]:
        """Every reachable file, by relative path."""
        table = self.durable_entries if durable else self.entries
        out: dict[str, int] = {}
        stack = [("", ROOT)]
        while stack:
            prefix, d = stack.pop()
            for name, ino in table.get(d, {}).items():
                rel = f"{prefix}{name}"
                if self.kinds[ino] == "dir":
                    stack.append((rel + "/", ino))
                else:
                    out[rel] = ino
        return out

    def apply(self, op: Op) -> None:
        if op.kind in ("mkdir", "create"):
            if op.inode not in self.kinds:
                self.kinds[op.inode] = "dir" if op.kind == "mkdir" else "file"
                if op.kind == "mkdir":
                    self.entries[op.inode], self.durable_entries[op.inode] = {}, {}
                else:
                    self.extents[op.inode], self.durable_extents[op.inode] = set(), set()
            self.entries[op.parent][op.name] = op.inode
        elif op.kind == "write":
            self.extents[op.inode].add((op.offset, op.length))
        elif op.kind == "fsync":
            if self.kinds[op.inode] == "dir":
                self.durable_entries[op.inode] = dict(self.entries[op.inode])
            else:
                self.durable_extents[op.inode] = set(self.extents[op.inode])
        elif op.kind == "rename":
            self.entries[op.src_parent].pop(op.src_name, None)
            self.entries[op.parent][op.name] = op.inode
        elif op.kind == "link":
            self.entries[op.parent][op.name] = op.inode
        elif op.kind in ("unlink", "rmdir"):
            self.entries[op.parent].pop(op.name, None)
        elif op.kind == "sync":
            for d in self.entries:
                self.durable_entries[d] = dict(self.entries[d])
            for f in self.extents:
                self.durable_extents[f] = set(self.extents[f])
        else:  # pragma: no cover - the parser only makes the kinds above
            raise TraceError(f"unknown op {op}")


def trace(argv: list[str], root: Path, *, cwd: Path, timeout: float = 300) -> tuple[list[Op], FsModel]:
    """Run ``argv`` under ``strace -f``; return the ops on ``root`` and the model of ``root`` before them."""
    strace = shutil.which("strace")
    if strace is None:
        raise TraceError("strace is not installed (.ci/services/strace.sh installs it)")
    before = FsModel.of_tree(root)
    log = cwd / "strace.log"
    cmd = [
        strace,
        "-f",
        "--seccomp-bpf",
        "-qq",
        "-y",
        "-s",
        "0",
        "-o",
        str(log),
        "-e",
        f"trace={SYSCALLS}",
        *argv,
    ]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise TraceError(f"traced process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return parse(log.read_text(), root, copy.deepcopy(before), cwd=cwd), before


@dataclass(frozen=True)
class Call:
    """One whole syscall line, with where its two halves sit in the log.

    Why both: with ``-f`` strace prints a call when it handles the call's stops, and a thread's
    stop may be handled after another thread's later call. The kernel did the work somewhere
    between ``entry`` (the line where the call began, or its own line when it was printed whole)
    and ``exit``; the log's order is the order of the exits only.
    """

    entry: int
    exit: int
    text: str


def _merged_lines(text: str) -> list[Call]:
    """Whole syscall lines in exit order: a call another thread interrupted is joined with its
    ``resumed`` half."""
    pending: dict[str, tuple[int, str]] = {}
    out = []
    for i, line in enumerate(text.splitlines()):
        pid, _, rest = line.partition(" ")
        rest = rest.lstrip()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (i, rest.removesuffix("<unfinished ...>").rstrip())
        elif rest.startswith("<... "):
            head = pending.pop(pid, None)
            if head is None:
                raise TraceError(f"resumed call without its start: {line!r}")
            out.append(Call(head[0], i, f"{pid} {head[1]}{rest.split('resumed>', 1)[1]}"))
        elif rest and not rest.startswith(("+++", "---")):
            out.append(Call(i, i, f"{pid} {rest}"))
    return out


@dataclass
class _Fd:
    inode: int
    position: int
    opened: int  # the log line where the open (or dup) that made this fd returned


def parse(text: str, root: Path, model: FsModel, *, cwd: Path) -> list[Op]:
    """Turn a strace log into ops on ``root``; ``model`` (the tree before) is advanced as it goes.

    Two cross-thread orders are repaired from the halves of split lines (see :class:`Call`):
    a ``close`` that began before the open that reused its number returned refers to the older
    file, and a ``mkdir`` whose result another thread used before the ``mkdir``'s own exit was
    logged (its ``EEXIST``, then a file inside) is applied first.
    """
    root_s = os.path.realpath(root)
    fds: dict[str, _Fd] = {}  # one table for the whole process: threads share it
    ops: list[Op] = []
    calls = _merged_lines(text)
    done: set[int] = set()

    def rel(path: str) -> str | None:
        p = os.path.normpath(path)
        if p == root_s:
            return ""
        return p[len(root_s) + 1 :] if p.startswith(root_s + "/") else None

    def emit(op: Op) -> None:
        model.apply(op)
        ops.append(op)

    def close(fd_arg: str, call: Call) -> None:
        fd = fd_arg.partition("<")[0]
        if fd in fds and fds[fd].opened > call.entry:
            return  # the number was reused by an open that returned after this close began
        fds.pop(fd, None)

    def split(rel_path: str, now: int) -> tuple[int, str]:
        head, _, name = rel_path.rpartition("/")
        try:
            return model.lookup(head), name
        except KeyError:
            _mkdir_early(head, now)
            return model.lookup(head), name

    def _mkdir_early(missing: str, now: int) -> None:
        """Apply the logged-later ``mkdir`` of each missing directory on the way to ``missing``,
        outermost first, each one that began before call ``now`` ended; raise if there is none."""
        parts = missing.split("/")
        for depth in range(1, len(parts) + 1):
            want = "/".join(parts[:depth])
            try:
                model.lookup(want)
                continue
            except KeyError:
                pass
            for j in range(now + 1, len(calls)):
                c = calls[j]
                m = _LINE.match(c.text)
                if j in done or c.entry > calls[now].exit or m is None:
                    continue
                if m.group(2) not in ("mkdir", "mkdirat") or m.group(4) == "?" or int(m.group(4)) < 0:
                    continue
                if rel(_paths([a.strip() for a in _split_args(m.group(3))], str(cwd))[0]) == want:
                    done.add(j)
                    handle(j)
                    break
            else:
                raise TraceError(f"call {calls[now].text!r} names {missing!r}, which no mkdir made")

    def handle(i: int) -> None:
        call = calls[i]
        m = _LINE.match(call.text)
        if m is None:
            return
        _, name, args, ret, ret_path, _ = m.groups()
        if ret == "?" or int(ret) < 0:
            return
        argv = [a.strip() for a in _split_args(args)]
        paths = _paths(argv, str(cwd))  # absolute paths named by the call (dirfd + name resolved)
        fd_m = _FD.match(argv[0]) if argv else None
        fd_path = fd_m.group(2) if fd_m and fd_m.group(1) != "AT_FDCWD" else None
        touched = [r for r in (rel(p) for p in paths + ([fd_path] if fd_path else [])) if r is not None]
        if name in ("sync", "syncfs"):
            emit(Op("sync", ""))
            return
        if not touched:
            if name == "close":
                close(argv[0], call)
            return
        if name in UNSUPPORTED:
            raise TraceError(f"the model cannot replay {name} on the traced tree: {call.text}")
        if name in ("open", "openat", "creat"):
            r = rel(ret_path or "")
            if r is None:
                return
            flags = argv[2] if name == "openat" else (argv[1] if name == "open" else "O_CREAT|O_TRUNC")
            try:
                ino = model.lookup(r)
                if "O_TRUNC" in flags and model.extents.get(ino):
                    raise TraceError(f"truncating existing data is not modelled: {call.text}")
            except KeyError:
                parent, base = split(r, i)
                ino = len(model.kinds)
                emit(Op("create", r, inode=ino, parent=parent, name=base))
            fds[ret] = _Fd(ino, 0, call.exit)
        elif name in ("write", "writev", "pwrite64", "pwritev", "pwritev2"):
            f = fds[argv[0].split("<")[0]]
            offset = int(argv[3]) if name in ("pwrite64", "pwritev", "pwritev2") else f.position
            if int(ret):
                emit(Op("write", touched[0], inode=f.inode, offset=offset, length=int(ret)))
            if name in ("write", "writev"):
                f.position += int(ret)
        elif name == "sync_file_range":
            # Starts writeback early (storage/writeback.py) but promises nothing: no metadata, no
            # device cache flush. Modelled as nothing, so durability must come from an fsync.
            pass
        elif name in ("fsync", "fdatasync"):
            emit(Op("fsync", touched[0], inode=fds[argv[0].split("<")[0]].inode))
        elif name == "close":
            close(argv[0], call)
        elif name == "lseek":
            fds[argv[0].split("<")[0]].position = int(ret)
        elif name in ("dup", "dup2", "dup3", "fcntl"):
            if name != "fcntl" or "F_DUPFD" in argv[1]:
                src = fds[argv[0].split("<")[0]]
                fds[ret] = _Fd(src.inode, src.position, call.exit)
        elif name in ("mkdir", "mkdirat"):
            r = rel(paths[0])
            assert r is not None
            parent, base = split(r, i)
            emit(Op("mkdir", r, inode=len(model.kinds), parent=parent, name=base))
        elif name in ("rename", "renameat", "renameat2", "link", "linkat"):
            src_r, dst_r = rel(paths[0]), rel(paths[1])
            if src_r is None or dst_r is None:
                raise TraceError(f"{name} across the traced tree's boundary: {call.text}")
            sp, sn = split(src_r, i)
            dp, dn = split(dst_r, i)
            kind = "link" if name.startswith("link") else "rename"
            emit(Op(kind, dst_r, inode=model.entries[sp][sn], parent=dp, name=dn, src_parent=sp, src_name=sn))
        elif name in ("unlink", "unlinkat", "rmdir"):
            r = rel(paths[0])
            assert r is not None
            parent, base = split(r, i)
            kind = "rmdir" if name == "rmdir" or "AT_REMOVEDIR" in call.text else "unlink"
            emit(Op(kind, r, inode=model.entries[parent].get(base, -1), parent=parent, name=base))

    for i in range(len(calls)):
        if i not in done:
            handle(i)
    return ops


def _split_args(args: str) -> list[str]:
    """Top-level comma split of a strace argument list (strings, brackets and braces kept whole)."""
    out, depth, cur, in_str, esc = [], 0, [], False, False
    for ch in args:
        if in_str:
            cur.append(ch)
            esc = not esc and ch == "\\"
            if ch == '"' and not esc:
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{(<":
            depth += 1
        elif ch in "]})>":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def _paths(argv: list[str], cwd: str) -> list[str]:
    """Absolute paths of the string arguments, each resolved against the dirfd just before it."""
    out = []
    base = cwd
    for a in argv:
        fd_m = _FD.match(a)
        if fd_m:
            base = fd_m.group(2) or cwd
            continue
        s = _STR.fullmatch(a)
        if s:
            p = s.group(1)
            out.append(p if p.startswith("/") else os.path.join(base, p))
            base = cwd
    return out
