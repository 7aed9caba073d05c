#!/usr/bin/env bash
# Builds bitcoind and bitcoin-cli (Bitcoin Core, no wallet, no GUI, no ZMQ) from the source tree
# that the crates.io package libbitcoinkernel-sys ships, into a cache outside the repository, and
# prints the path of bitcoind. A cached build is reused. The wallet crate's regtest tests want
# BITCOIND_EXE set to that path:
#
#   export BITCOIND_EXE="$(scripts/build-bitcoind.sh)"
#
# Needs: cargo, a C++ toolchain, and the Debian packages cmake libboost-dev libevent-dev pkg-config
# (set INSTALL_DEPS=1 to have this script apt-get them). Takes about 20 minutes on 2 cores.
set -euo pipefail

KERNEL_SYS_VERSION="0.4.1"
CACHE_ROOT="${MEDIATOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mediator}"
PREFIX="$CACHE_ROOT/bitcoind-kernel-sys-$KERNEL_SYS_VERSION"
JOBS="${JOBS:-2}"

log() { printf '%s\n' "$*" >&2; }

if [[ -x "$PREFIX/bin/bitcoind" && -x "$PREFIX/bin/bitcoin-cli" ]]; then
    printf '%s\n' "$PREFIX/bin/bitcoind"
    exit 0
fi

if [[ "${INSTALL_DEPS:-0}" == "1" ]]; then
    log "installing build dependencies with apt-get"
    apt-get update >&2
    apt-get install -y cmake libboost-dev libevent-dev pkg-config g++ make >&2
fi
for tool in cargo cmake pkg-config c++; do
    command -v "$tool" >/dev/null || { log "error: $tool not found (see the header of $0)"; exit 1; }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/mediator-bitcoind.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# 1. The source through cargo, without building the crate: a throwaway manifest that depends on it.
mkdir -p "$WORK/fetch/src"
cat >"$WORK/fetch/Cargo.toml" <<TOML
[package]
name = "fetch-bitcoin-source"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
libbitcoinkernel-sys = "=$KERNEL_SYS_VERSION"

[workspace]
TOML
: >"$WORK/fetch/src/lib.rs"
log "fetching libbitcoinkernel-sys $KERNEL_SYS_VERSION"
cargo fetch --manifest-path "$WORK/fetch/Cargo.toml" >&2
MANIFEST="$(cargo metadata --format-version 1 --manifest-path "$WORK/fetch/Cargo.toml" |
    python3 -c '
import json, sys
meta = json.load(sys.stdin)
for p in meta["packages"]:
    if p["name"] == "libbitcoinkernel-sys":
        print(p["manifest_path"])
        break
')"
[[ -n "$MANIFEST" ]] || { log "error: libbitcoinkernel-sys not found in cargo metadata"; exit 1; }
SRC="$(dirname "$MANIFEST")/bitcoin"
[[ -f "$SRC/CMakeLists.txt" ]] || { log "error: no Bitcoin Core source at $SRC"; exit 1; }

# 2. Build a writable copy (the registry copy is read-only by convention).
cp -R "$SRC" "$WORK/bitcoin"
cd "$WORK/bitcoin"
log "configuring Bitcoin Core in $WORK/bitcoin"
cmake -B build \
    -DBUILD_DAEMON=ON -DBUILD_CLI=ON -DENABLE_WALLET=OFF -DBUILD_TESTS=OFF -DBUILD_BENCH=OFF \
    -DBUILD_GUI=OFF -DWITH_ZMQ=OFF -DBUILD_KERNEL_LIB=OFF -DBUILD_UTIL=OFF -DBUILD_TX=OFF \
    -DBUILD_WALLET_TOOL=OFF -DENABLE_IPC=OFF -DBUILD_FUZZ_BINARY=OFF -DWITH_EMBEDDED_ASMAP=OFF \
    -DCMAKE_BUILD_TYPE=Release >&2
log "building bitcoind and bitcoin-cli with $JOBS jobs (about 20 minutes on 2 cores)"
cmake --build build -j"$JOBS" --target bitcoind bitcoin-cli >&2

# 3. Install into the cache atomically: a half-finished build never looks cached.
mkdir -p "$CACHE_ROOT"
STAGE="$(mktemp -d "$CACHE_ROOT/.stage.XXXXXX")"
mkdir -p "$STAGE/bin"
for bin in bitcoind bitcoin-cli; do
    found="$(find build -type f -name "$bin" -perm -u+x | head -n 1)"
    [[ -n "$found" ]] || { log "error: $bin was not built"; rm -rf "$STAGE"; exit 1; }
    install -m 0755 "$found" "$STAGE/bin/$bin"
done
rm -rf "$PREFIX"
mv "$STAGE" "$PREFIX"
log "cached in $PREFIX"
printf '%s\n' "$PREFIX/bin/bitcoind"
