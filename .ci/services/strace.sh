#!/usr/bin/env bash
# Make sure strace is installed (the crash-state tests record a save's file-system calls with it).
set -euo pipefail
if ! command -v strace >/dev/null 2>&1; then
  echo "strace.sh: installing strace from Debian packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends strace >&2
fi
strace -V | head -n 1 >&2
