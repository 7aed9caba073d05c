#!/usr/bin/env bash
# Runs every test of the workspace: unit, property, simulation, journal, the regtest tests
# against a real bitcoind, and the browser tests of the checkout pages (installs chromium and
# chromium-driver when missing). Finds bitcoind (scripts/find-bitcoind.sh) or builds it once
# (scripts/build-bitcoind.sh, about 20 minutes on 2 cores) and exports BITCOIND_EXE.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if ! exe=$(scripts/find-bitcoind.sh); then
  echo "no bitcoind found: building Bitcoin Core from source (scripts/build-bitcoind.sh)" >&2
  exe=$(scripts/build-bitcoind.sh | tail -n 1)
fi
export BITCOIND_EXE="$exe"
# The checkout and point-of-sale pages are tested in headless Chromium (Debian's packages).
if [ "${MEDIATOR_SKIP_BROWSER:-0}" != 1 ]; then
  scripts/install-browser.sh
fi
echo "using bitcoind: $BITCOIND_EXE" >&2
exec cargo test --workspace "$@"
