"""Write every mutant mutmut 2.x generated as a unified diff, ``OUT/<id>.diff`` (run in a checkout
whose sources are unmutated, after ``mutmut run --runner true`` has enumerated them there).

mutmut 2.5.1 crashed twice mid-run here ("Attribute Mutant.line is required", its cache losing
the rows of lines that occur twice in a file), and ``mutmut show`` re-reads the current source, so
it cannot run beside a copy being mutated; exporting once and applying the diffs with
``apply_each.sh`` avoids both.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from mutmut.cache import get_unified_diff


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    # every id first: iterating the cursor while mutmut's own connection opens the file for
    # writing fails with "database is locked"
    con = sqlite3.connect(".mutmut-cache")
    ids = [pk for (pk,) in con.execute("select m.id from Mutant m join Line l on m.line = l.id")]
    con.close()
    for pk in ids:
        (out / f"{pk}.diff").write_text(get_unified_diff(pk, []))


if __name__ == "__main__":
    main()
