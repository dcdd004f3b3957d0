"""``ckptd train``: launch the bundled GPT trainer on N local ranks through torch's own launcher.

    ckptd train --nproc N --tp T --pp P --zero S --steps K --every E --ckpt URI [--log-json FILE]
                [-- TRAINER-OPTIONS]

dp is N / (T * P). The ranks run ``python -m ckptd.training.trainer`` under
``torch.distributed.run --standalone``; across machines run that module under your own
``torchrun`` instead. Options after ``--`` go to the trainer unchanged (model size, batch,
learning rate: see ``python -m ckptd.training.trainer --help``).

With ``--ckpt URI`` the run resumes from the newest committed checkpoint there (saved by a
job of any layout: it is resharded on load), saves every ``--every`` steps and at its last
step. SIGTERM sent to this command is passed to the launcher, which passes it to the ranks:
they write a durable checkpoint at the next step boundary and exit (status 143). The
launcher waits 30 s for that before it kills the ranks.

This module imports neither torch nor the trainer at import time (``ckptd --help`` stays fast).
"""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `ckptd --help` stays fast
if TYPE_CHECKING:
    from types import FrameType
    from typing import Any

SIGTERM_EXIT_CODE = 143
"""Status after a SIGTERM-triggered checkpoint (the ranks' own; 128 + SIGTERM)."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the bundled GPT on local ranks (dp x tp x pp, ZeRO 0-3)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nproc", type=int, default=1, help="local ranks to launch (the world size)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b", help="pipeline schedule")
    p.add_argument("--steps", type=int, default=50, help="train up to this step")
    p.add_argument("--every", type=int, default=0, help="checkpoint interval in steps (needs --ckpt)")
    p.add_argument("--ckpt", metavar="URI", help="checkpoint run root: resume, then save there")
    p.add_argument("--log-json", default=None, metavar="FILE", help="append one JSON line per step")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER, help="after --: options for the trainer")
    p.set_defaults(func=run)


def trainer_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "--tp",
        str(args.tp),
        "--pp",
        str(args.pp),
        "--zero",
        str(args.zero),
        "--schedule",
        args.schedule,
        "--steps",
        str(args.steps),
        "--every",
        str(args.every),
    ]
    if args.ckpt:
        argv += ["--ckpt", args.ckpt]
    if args.log_json:
        argv += ["--log-json", args.log_json]
    extra = list(args.trainer_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return argv + extra


def run(args: argparse.Namespace) -> int:
    # Imported here: the trainer pulls in torch.
    from ckptd.training.config import TrainingConfigError
    from ckptd.training.trainer import build_arg_parser, config_from_args

    argv = trainer_argv(args)
    try:
        if args.nproc < 1:
            raise TrainingConfigError(f"--nproc must be at least 1, got {args.nproc}")
        cfg = config_from_args(build_arg_parser().parse_args(argv))
        dp = cfg.parallel.check_world(args.nproc)
        cfg.data.micro_batches(dp)
    except TrainingConfigError as e:
        # Fail before launching anything, with the option to change.
        print(f"ckptd train: configuration error: {e}", file=sys.stderr)
        return 2
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "ckptd.training.trainer",
        *argv,
    ]
    return _run_forwarding_sigterm(cmd)


def _run_forwarding_sigterm(cmd: list[str]) -> int:
    """Run the launcher; a SIGTERM to this process is passed on (by default it would orphan the ranks)."""
    import signal
    import subprocess
    import threading

    proc = subprocess.Popen(cmd)
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()  # signal handlers can only be installed on the main thread

    forwarded = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal forwarded
        if proc.poll() is None:
            forwarded = True
            proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        rc = proc.wait()
        # The launcher reports its own termination as a failure (status 1); the ranks stopped as asked.
        return SIGTERM_EXIT_CODE if forwarded and rc != 0 else rc
    finally:
        signal.signal(signal.SIGTERM, previous)
