"""``ckptd ls | inspect | verify | rm | gc``: look at and look after the checkpoints of a run root."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `ckptd --help` stays fast
if TYPE_CHECKING:  # loaded by the commands, not by `ckptd --help` (numpy, numcodecs, fsspec)
    from typing import Any

    from ckptd.format.manifest import Manifest
    from ckptd.format.run import Run


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ls", help="list the committed checkpoints of a run root")
    p.add_argument("uri", help="run root: a local path or any fsspec URL (s3://bucket/run)")
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
    p.add_argument("--all", action="store_true", help="also list uncommitted (in progress or crashed) steps")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="show the arrays, shapes, dtypes, layouts and codecs of a checkpoint")
    p.add_argument("uri")
    p.add_argument("--step", type=int, default=None, help="step to inspect (default: latest committed)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every chunk checksum of a checkpoint (exit 1 when damaged)")
    p.add_argument("uri")
    p.add_argument("--step", type=int, default=None, help="step to verify (default: latest committed)")
    p.add_argument("--all", action="store_true", help="verify every committed checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("rm", help="delete a committed checkpoint")
    p.add_argument("uri")
    p.add_argument("--step", type=int, required=True)
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("gc", help="delete uncommitted leftovers of crashed saves")
    p.add_argument("uri")
    p.add_argument(
        "--min-age", type=float, default=3600.0,
        help="only attempts whose writer has not touched them (lease, files) for this many seconds "
             "(default: %(default)s)"
    )
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_gc)


def _run(uri: str) -> Run:
    from ckptd.format.run import Run
    from ckptd.storage import open_store

    return Run(open_store(uri))


def _resolve_step(run: Run, step: int | None) -> int:
    if step is not None:
        return step
    latest = run.latest()
    if latest is None:
        from ckptd.format.errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(f"no committed checkpoint in {run.url}")
    return latest


def _human(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.1f} {unit}" if unit != "B" else f"{int(x)} B"
        x /= 1024
    return f"{n} B"


def cmd_ls(args: argparse.Namespace) -> int:
    from ckptd.cli.pipes import closed_pipe_ok
    from ckptd.format.errors import CheckpointError, CheckpointNotFoundError

    with closed_pipe_ok():  # `... | head` stops reading early
        run = _run(args.uri)
        if "://" not in args.uri and not Path(args.uri).is_dir():
            raise CheckpointNotFoundError(f"{args.uri} is not a directory (no run root there)")
        rows: list[dict[str, Any]] = []
        for step in run.steps():
            try:
                m = run.manifest(step)
            except CheckpointError as e:  # one bad manifest must not hide the other checkpoints
                print(f"ckptd: step {step}: {e}", file=sys.stderr)
                rows.append({"step": step, "committed": True, "error": str(e)})
                continue
            rows.append(
                {
                    "step": step,
                    "created_at": m.created_at,
                    "arrays": m.array_count,
                    "nbytes": m.nbytes,
                    "stored_bytes": m.stored_bytes,
                    "world_size": m.world_size,
                    "committed": True,
                }
            )
        if args.all:
            rows += [{"step": s, "committed": False} for s in run.uncommitted()]
            rows.sort(key=lambda r: r["step"])
        if args.json:
            for r in rows:
                print(json.dumps(r))
            return 0
        if not rows:
            print(f"no committed checkpoints in {run.url}")
            return 0
        print(f"{'STEP':>10}  {'CREATED':<29} {'ARRAYS':>6} {'SIZE':>10} {'STORED':>10} {'RANKS':>5}")
        for r in rows:
            if not r["committed"]:
                print(f"{r['step']:>10}  (uncommitted)")
                continue
            if "error" in r:
                print(f"{r['step']:>10}  (unreadable: see above)")
                continue
            print(
                f"{r['step']:>10}  {r['created_at']:<29} {r['arrays']:>6} {_human(r['nbytes']):>10} "
                f"{_human(r['stored_bytes']):>10} {r['world_size']:>5}"
            )
        return 0


def summary(m: Manifest) -> dict[str, Any]:
    return {
        "step": m.step,
        "checkpoint_id": m.checkpoint_id,
        "created_at": m.created_at,
        "format_version": m.format_version,
        "world_size": m.world_size,
        "writers": m.writers if m.totals is None else m.writer_count,
        "attempt": m.attempt or None,
        "mesh": dict(m.mesh),
        "nbytes": m.nbytes,
        "stored_bytes": m.stored_bytes,
        "metadata": dict(m.metadata),
        "arrays": {
            p: {
                "shape": list(a.shape),
                "dtype": a.dtype.name,
                "storage_dtype": a.dtype.storage,
                "kind": a.kind,
                "layout": None if a.layout is None else a.layout.to_json(),
                "nbytes": a.nbytes,
                "stored_bytes": a.stored_bytes,
                "codecs": a.codec.label(),
                "shards": a.shard_count,
                "chunks": list(a.parts[0].chunks) if a.parts else [],
            }
            for p, a in sorted(m.arrays.items())
        },
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from ckptd.cli.pipes import closed_pipe_ok

    with closed_pipe_ok():  # `... | head` stops reading early
        run = _run(args.uri)
        m = run.manifest(_resolve_step(run, args.step))
        doc = summary(m)
        if args.json:
            print(json.dumps(doc, indent=2))
            return 0
        print(f"checkpoint step {m.step} in {run.url}")
        print(
            f"  created {m.created_at}  format v{m.format_version}  world size {m.world_size}  "
            f"mesh {dict(m.mesh) or '-'}"
        )
        ratio = m.stored_bytes / m.nbytes if m.nbytes else 1.0
        print(
            f"  {m.array_count} arrays, {_human(m.nbytes)} logical, "
            f"{_human(m.stored_bytes)} stored ({ratio:.2f}x)"
        )
        if m.metadata:
            print(f"  metadata {json.dumps(dict(m.metadata))}")
        width = max([len(p) for p in m.arrays] + [5])
        print(
            f"  {'ARRAY':<{width}}  {'DTYPE':<13} {'SHAPE':<20} {'KIND':<8} {'SHARDS':>6} {'BYTES':>10}"
            "  CODECS  LAYOUT"
        )
        for p, a in doc["arrays"].items():
            layout = "-" if a["layout"] is None else json.dumps(a["layout"]["partition"])
            print(
                f"  {p:<{width}}  {a['dtype']:<13} {tuple(a['shape'])!s:<20} {a['kind']:<8} {a['shards']:>6} "
                f"{_human(a['nbytes']):>10}  {a['codecs']:<6}  {layout}"
            )
        return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ckptd.cli.pipes import closed_pipe_ok
    from ckptd.format.verify import verify

    with closed_pipe_ok():  # `... | head` stops reading early
        run = _run(args.uri)
        steps = run.steps() if args.all else [_resolve_step(run, args.step)]
        bad = 0
        for step in steps:
            m = run.manifest(step)
            total = sum(1 + (len(part.shards) if part.listed else part.ncells) for a in m.arrays.values()
                        for part in a.parts)
            with tqdm(
                total=total,
                desc=f"verify step {step}",
                unit="obj",
                disable=args.quiet or not sys.stderr.isatty(),
                file=sys.stderr,
            ) as bar:
                problems = verify(run.data_store(step, m), m, progress=bar.update)
            for prob in problems:
                print(f"step {step}: CORRUPT {prob.array}: {prob}")
            if problems:
                bad += 1
                print(f"step {step}: {len(problems)} problem(s) found")
            else:
                print(f"step {step}: ok ({m.array_count} arrays, {_human(m.stored_bytes)} verified)")
        return 1 if bad else 0


def cmd_rm(args: argparse.Namespace) -> int:
    run = _run(args.uri)
    run.manifest(args.step)  # raises CheckpointNotFoundError with a clear message
    run.delete(args.step)
    print(f"deleted step {args.step} from {run.url}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    run = _run(args.uri)
    steps = run.gc_uncommitted(min_age_s=args.min_age, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(steps)} uncommitted step(s): {steps}" if steps else "nothing to collect")
    return 0
