"""``ckptd convert``: reshard a checkpoint to another parallel layout."""

from __future__ import annotations

import argparse
import sys

from ckptd.format.errors import CheckpointError, LayoutError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `ckptd --help` stays fast
if TYPE_CHECKING:
    from ckptd.format.manifest import Manifest


def parse_mesh(text: str) -> dict[str, int]:
    """``"tp=4,pp=1,dp=2"`` -> ``{"tp": 4, "pp": 1, "dp": 2}``."""
    mesh: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if not name or not value.isdigit() or int(value) < 1:
            raise LayoutError(f"bad mesh entry {item!r}: expected AXIS=SIZE with SIZE >= 1, e.g. tp=4,dp=2")
        mesh[name] = int(value)
    return mesh


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("convert", help="reshard a checkpoint to another parallel layout (streams chunks)")
    p.add_argument("src", help="source run root")
    p.add_argument("dst", help="destination run root (may be the same as the source with --dst-step)")
    p.add_argument("--mesh", required=True, type=parse_mesh, help="target mesh, e.g. tp=4,pp=1,dp=2")
    p.add_argument("--step", type=int, default=None, help="source step (default: latest)")
    p.add_argument("--dst-step", type=int, default=None, help="destination step (default: the source step)")
    p.add_argument(
        "--codec", default=None, help="chunk codec for the output, e.g. none, zstd:3 (default: keep)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination checkpoint")
    p.add_argument("--force", action="store_true",
                   help="convert even to a mesh the trainer would refuse for the recorded model (warns)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a torch.save or safetensors file, a DCP or a Hugging Face directory",
    )
    p.add_argument("uri")
    p.add_argument("out", help="file (torch, safetensors) or directory (dcp, hf)")
    p.add_argument("--step", type=int, default=None, help="default: latest")
    p.add_argument(
        "--format",
        choices=("torch", "safetensors", "dcp", "hf"),
        default=None,
        help="dcp: torch.distributed.checkpoint directory; hf: sharded safetensors + index "
        "(default: from the file suffix (.safetensors), else torch)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="hf: largest file, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument(
        "--select", default=None, help="hf: export only tensors under this prefix, stripped, e.g. model."
    )
    p.add_argument("--overwrite", action="store_true", help="dcp: replace an existing DCP checkpoint in DIR")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import",
        help="save a torch.save (weights only), safetensors, Hugging Face or DCP checkpoint as a checkpoint",
    )
    p.add_argument("src", help="a file, a DCP directory or a sharded safetensors directory")
    p.add_argument("uri")
    p.add_argument("--step", type=int, required=True)
    p.add_argument(
        "--from",
        "--format",
        dest="format",
        choices=("torch", "safetensors", "hf", "dcp"),
        default=None,
        help="default: detected (.metadata: dcp; model.safetensors.index.json: hf; file suffix)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--mesh", type=parse_mesh, default=None,
                   help="dcp: lay the checkpoint out for this mesh, e.g. dp=4 (row blocks along dim 0 over "
                   "all axes; tensors shorter than the mesh stay whole)")
    p.set_defaults(func=cmd_import)


def cmd_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ckptd.converters.model_facts import mesh_refusal
    from ckptd.converters.outputs import new_run_root_removed_on_failure
    from ckptd.converters.reshard import reshard
    from ckptd.format.codecs import CodecSpec
    from ckptd.format.errors import CheckpointNotFoundError
    from ckptd.format.run import Run
    from ckptd.storage import open_store
    from ckptd.training.config import refuse_layout  # the bundled trainer's rules

    codec = CodecSpec.parse(args.codec) if args.codec else None  # a bad codec fails before any work
    src, dst = Run(open_store(args.src)), Run(open_store(args.dst))
    step = args.step if args.step is not None else src.latest()
    if step is None:
        raise CheckpointNotFoundError(f"no committed checkpoint in {src.url}")
    source = src.manifest(step)
    refusal = mesh_refusal(source, args.mesh, refuse_layout)
    if refusal is not None and args.force:
        print(f"ckptd: warning: {refusal}; converting anyway (--force)", file=sys.stderr)
    # reshard deletes its partial attempt on failure; a run root this command created goes too
    bar = tqdm(total=source.nbytes, unit="B", unit_scale=True, desc="convert", file=sys.stderr,
               disable=args.quiet or not sys.stderr.isatty())
    with new_run_root_removed_on_failure(args.dst), bar:
        result = reshard(src, dst, mesh=args.mesh, step=step, dst_step=args.dst_step, codec=codec,
                         overwrite=args.overwrite, progress=bar.update,
                         refuse=refuse_layout, force=args.force)
    m = result.manifest
    print(
        f"wrote step {m.step} to {dst.url} for mesh {dict(m.mesh)}: {m.array_count} arrays, "
        f"{m.stored_bytes} bytes"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ckptd.converters.hf import parse_size
    from ckptd.converters.interop import ExportFormat, export_checkpoint
    from ckptd.converters.outputs import removed_on_failure
    from ckptd.format.errors import CheckpointNotFoundError, StorageError

    fmt: ExportFormat = args.format or ("safetensors" if args.out.endswith(".safetensors") else "torch")
    limit = parse_size(args.max_shard_size)
    out = Path(args.out)
    if fmt in ("torch", "safetensors") and not out.parent.is_dir():
        raise CheckpointNotFoundError(f"cannot write {out}: directory {out.parent} does not exist")
    if fmt in ("torch", "safetensors") and out.is_dir():
        raise StorageError(f"cannot write {out}: it is a directory (give a file name)")
    write_errors: tuple[type[Exception], ...] = (OSError, RuntimeError)  # disk full, permissions (torch)
    try:
        from safetensors import SafetensorError

        write_errors += (SafetensorError,)
    except ImportError:
        pass
    try:
        with removed_on_failure(out):
            step = export_checkpoint(args.uri, out, fmt=fmt, step=args.step, max_shard_bytes=limit,
                                     select=args.select, overwrite=args.overwrite)
    except write_errors as e:
        if isinstance(e, CheckpointError):
            raise
        detail = " ".join(str(e).split())  # one line, whatever the library put in its message
        raise StorageError(f"writing {out} failed (nothing left behind): {detail}") from e
    print(f"exported step {step} of {args.uri} to {args.out} ({fmt})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    import re

    from ckptd.converters.interop import import_checkpoint
    from ckptd.converters.outputs import new_run_root_removed_on_failure

    try:
        with new_run_root_removed_on_failure(args.uri):  # the converters delete their partial attempt
            if args.mesh is not None:
                m = _import_for_mesh(args)
            else:
                m = import_checkpoint(args.src, args.uri, step=args.step, fmt=args.format,
                                      overwrite=args.overwrite)
    except CheckpointError as e:
        # torch's weights_only refusal is a page of advice (ending in "load it unsafely"); say what it found
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused is not None:
            head = str(e).split("Weights only load failed")[0].rstrip(" :(")
            head = head.removesuffix(" (weights_only load refused")
            raise type(e)(f"{head}: it holds a {refused.group(1)} object, which ckptd never unpickles") from e
        if "\n" in str(e).strip():
            raise type(e)(" ".join(str(e).split())) from e
        raise
    laid_out = f" for mesh {dict(m.mesh)}" if args.mesh is not None else ""
    print(f"imported {args.src} as step {m.step} of {args.uri}{laid_out}: {m.array_count} arrays, "
          f"{m.nbytes} bytes")
    return 0


def _import_for_mesh(args: argparse.Namespace) -> Manifest:
    """``import --mesh``: only a DCP directory can be laid out for a mesh on the way in."""
    from pathlib import Path

    from ckptd.converters.dcp_import import import_dcp
    from ckptd.converters.interop import detect_format
    from ckptd.format.errors import ConfigError

    fmt = args.format or detect_format(Path(args.src))
    if fmt != "dcp":
        raise ConfigError(f"--mesh lays out DCP imports only; {args.src} is a {fmt} checkpoint "
                          "(import it, then `ckptd convert --mesh`)")
    return import_dcp(args.src, args.uri, step=args.step, overwrite=args.overwrite, mesh=args.mesh)
