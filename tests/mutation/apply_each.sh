#!/bin/bash
# Apply mutants one at a time in a copy of the checkout and run the fast tests through its fork
# server (tests/forkrun.py serve COPY/fork.sock FILE, started beforehand); appends "ID killed",
# "ID survived" or "ID patch-failed" to OUT. The file is restored from ORIGINAL after every mutant.
# usage: apply_each.sh COPY FILE ORIGINAL OUT PATCH_DIR TESTS... -- IDS...
copy=$1; file=$2; original=$3; out=$4; patches=$5; shift 5
tests=()
while [ "$1" != "--" ]; do tests+=("$1"); shift; done; shift
cd "$copy" || exit 2
cp "$original" "$file"
for id in "$@"; do
  if ! patch -s -p0 "$file" < "$patches/$id.diff" >/dev/null 2>&1; then
    echo "$id patch-failed" >> "$out"; cp "$original" "$file"; continue
  fi
  timeout 300 .venv/bin/python tests/forkrun.py run "$copy/fork.sock" -- -x -q -p no:randomly \
    -p no:cacheprovider "${tests[@]}" > "$copy/mutant-run.log" 2>&1
  rc=$?
  cp "$original" "$file"
  if [ $rc = 0 ]; then echo "$id survived" >> "$out"; else echo "$id killed rc=$rc" >> "$out"; fi
done
