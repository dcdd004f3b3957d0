"""Mutation score per module from a mutmut 2.x cache (``.mutmut-cache``, SQLite), as JSON.

``python benchmarks/mutation_score.py CACHE [--equivalent FILE:ID ...] [--killed-by-hand FILE:ID ...]``
prints one JSON line per module and writes them, with the machine description, under
benchmarks/results/. Score = killed / (mutants tested - documented equivalents); timeouts are
listed apart (a mutant that loops forever is detected, but on a loaded machine a slow run of a
harmless mutant times out too) and are not counted as killed. Untested mutants are reported,
never scored.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import write_results


def scores(cache: str, equivalent: set[str], by_hand: set[str]) -> list[dict[str, object]]:
    con = sqlite3.connect(cache)
    rows = con.execute(
        "select f.filename, m.id, m.status from Mutant m join Line l on m.line = l.id "
        "join SourceFile f on l.sourcefile = f.id"
    ).fetchall()
    per: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for filename, mid, status in rows:
        if f"{filename}:{mid}" in equivalent:
            status = "equivalent"
        elif f"{filename}:{mid}" in by_hand and status == "bad_survived":
            status = "ok_killed"  # killed by a test added after the run, checked by applying the mutant
        per[filename][status].append(mid)
    out = []
    for filename, by in sorted(per.items()):
        killed = len(by["ok_killed"]) + len(by["ok_suspicious"])
        scored = killed + len(by["bad_survived"]) + len(by["bad_timeout"])
        out.append({
            "module": filename, "mutants": sum(len(v) for v in by.values()), "killed": killed,
            "survived": sorted(by["bad_survived"]), "timeout": sorted(by["bad_timeout"]),
            "equivalent": sorted(by["equivalent"]), "untested": len(by["untested"]) + len(by["skipped"]),
            "score": round(killed / scored, 3) if scored else None,
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache")
    ap.add_argument("--equivalent", nargs="*", default=[])
    ap.add_argument("--killed-by-hand", nargs="*", default=[])
    ap.add_argument("--out")
    args = ap.parse_args()
    results = scores(args.cache, set(args.equivalent), set(args.killed_by_hand))
    for r in results:
        print(json.dumps(r))
    print(write_results("mutation", args.out, vars(args), results), file=sys.stderr)


if __name__ == "__main__":
    main()
