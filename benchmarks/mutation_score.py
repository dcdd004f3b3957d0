"""Mutation score per module from ``tests/mutation/apply_each.sh`` result files, as JSON.

``python benchmarks/mutation_score.py --patches DIR --results FILE... [--equivalent ID...]
[--killed-by-hand ID...]`` prints one JSON line per module and writes them, with the machine
description, under benchmarks/results/. Score = killed / (mutants run - documented equivalents).
``--killed-by-hand``: survivors of the run that a test added afterwards kills (each checked by
applying the mutant and running the fast tests again). Mutants not run are counted, never scored.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import write_results


def module_of(patch: Path) -> str:
    first = patch.read_text().splitlines()[:1]
    return first[0].removeprefix("--- ").strip() if first else "?"


def scores(patches: Path, results: list[Path], equivalent: set[int],
           by_hand: set[int]) -> list[dict[str, object]]:
    status: dict[int, str] = {}
    for f in results:
        if not f.exists():
            continue
        for line in f.read_text().split("\n"):
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                # a later line (a recheck) wins; a run cut by `timeout` (rc=124) is not a kill
                status[int(parts[0])] = "timeout" if "rc=124" in parts[2:] else parts[1]
    per: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for patch in patches.glob("*.diff"):
        pk = int(patch.stem)
        s = status.get(pk, "not-run")
        if pk in equivalent:
            s = "equivalent"
        elif pk in by_hand and s == "survived":
            s = "killed"
        per[module_of(patch)][s].append(pk)
    out = []
    for module, by in sorted(per.items()):
        killed, survived = len(by["killed"]), len(by["survived"])
        if killed + survived == 0:
            continue
        out.append({
            "module": module, "mutants": sum(len(v) for v in by.values()), "killed": killed,
            "survived": sorted(by["survived"]), "equivalent": sorted(by["equivalent"]),
            "not_run": len(by["not-run"]) + len(by["patch-failed"]), "timeout": sorted(by["timeout"]),
            "score": round(killed / (killed + survived), 3),
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patches", type=Path, required=True)
    ap.add_argument("--results", type=Path, nargs="+", required=True)
    ap.add_argument("--equivalent", type=int, nargs="*", default=[])
    ap.add_argument("--killed-by-hand", type=int, nargs="*", default=[])
    ap.add_argument("--out")
    args = ap.parse_args()
    results = scores(args.patches, args.results, set(args.equivalent), set(args.killed_by_hand))
    for r in results:
        print(json.dumps(r))
    path = write_results("mutation", args.out, {k: str(v) for k, v in vars(args).items()}, results)
    print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
