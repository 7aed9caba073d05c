#!/usr/bin/env bash
# Prints the path of a bitcoind to use, or exits 1.
# Order: $BITCOIND_EXE, `bitcoind` on PATH, the shared prebuilt copy beside the checkout
# (../shared/bin/bitcoind), the cache that scripts/build-bitcoind.sh fills.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${BITCOIND_EXE:-}" ]; then
  if [ -x "$BITCOIND_EXE" ]; then echo "$BITCOIND_EXE"; exit 0; fi
  echo "BITCOIND_EXE=$BITCOIND_EXE is not an executable" >&2; exit 1
fi
if command -v bitcoind >/dev/null 2>&1; then command -v bitcoind; exit 0; fi
for c in "$root/../shared/bin/bitcoind" "${XDG_CACHE_HOME:-$HOME/.cache}"/mediator/bitcoind-*/bin/bitcoind; do
  if [ -x "$c" ]; then echo "$(cd "$(dirname "$c")" && pwd)/$(basename "$c")"; exit 0; fi
done
exit 1
