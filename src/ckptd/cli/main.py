"""``ckptd`` command line: a thin layer over library functions.

Each command group lives in its own module and exposes ``register(subparsers)``;
modules are imported lazily so that ``ckptd ls`` does not import FastAPI or the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ckptd.format.errors import CheckpointError

# module path -> the commands it registers (so `--help` can list them without importing).
_COMMAND_MODULES: tuple[str, ...] = (
    "ckptd.cli.checkpoints",  # ls, inspect, verify, gc
    "ckptd.cli.convert",  # convert
    "ckptd.cli.train",  # train
    "ckptd.cli.catalog",  # serve, db, catalog
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptd", description="Checkpoints for PyTorch distributed training."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # the command group is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except CheckpointError as e:
        print(f"ckptd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
