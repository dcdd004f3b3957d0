#!/usr/bin/env bash
# Make sure Debian's chromium is installed (for the headless web-page test); print its path.
set -euo pipefail
if [[ ! -x /usr/bin/chromium ]]; then
  echo "chromium.sh: installing chromium from Debian packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
fi
/usr/bin/chromium --version >&2
echo /usr/bin/chromium
