#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60) and fails if any finds a
# crash, printing where libFuzzer saved the input. CI runs it briefly (`scripts/fuzz.sh 10`);
# a longer run is e.g. `scripts/fuzz.sh 3600`. One target: FUZZ_TARGETS="decimal" scripts/fuzz.sh.
# Needs the nightly toolchain (libFuzzer's sanitizer flags); installs it and cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
case "$seconds" in
  '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS]" >&2; exit 2 ;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
  # A fresh machine: install it (cargo-fuzz needs nightly for libFuzzer's sanitizer flags).
  if ! command -v rustup >/dev/null; then
    echo "fuzz.sh: the nightly toolchain is missing and rustup is not installed" >&2
    exit 1
  fi
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi

# One build directory for the fuzz builds, apart from the normal one (other flags: a full rebuild).
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mediator/fuzz-target}"
mkdir -p "$CARGO_TARGET_DIR"
export CARGO_TERM_COLOR=never

cd fuzz
targets="${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"
# FUZZ_DEV=1 builds the targets unoptimized (cargo fuzz --dev): a cold build takes about half as
# long and still runs every input under the address sanitizer, only fewer of them per second.
# CI uses it for its brief run; long runs should leave it off.
profile=()
[ "${FUZZ_DEV:-0}" = 1 ] && profile=(--dev)
cargo +nightly fuzz build "${profile[@]}"

failed=()
for t in $targets; do
  mkdir -p "corpus/$t" "artifacts/$t"
  # rss_limit 4 GiB: a snapshot may ask for books of up to 1 GiB (MAX_PREALLOCATED_BYTES),
  # and the address sanitizer adds to that. New inputs go to a scratch corpus (the committed seeds in corpus/$t stay small); crashes go
  # to artifacts/$t.
  work="$CARGO_TARGET_DIR/corpus/$t"
  mkdir -p "$work"
  echo "== fuzz $t for ${seconds}s"
  before=$(ls "artifacts/$t" | wc -l)
  ok=1
  if ! cargo +nightly fuzz run "${profile[@]}" "$t" "$work" "corpus/$t" -- \
      -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=4096 \
      -print_final_stats=1 2>"$CARGO_TARGET_DIR/$t.log"; then
    ok=0
  fi
  after=$(ls "artifacts/$t" | wc -l)
  [ "$after" -gt "$before" ] && ok=0
  if [ "$ok" = 1 ]; then
    grep -E '^Done' "$CARGO_TARGET_DIR/$t.log" || true
  else
    grep -E -A3 'panicked|ERROR: libFuzzer|SUMMARY' "$CARGO_TARGET_DIR/$t.log" | head -n 20 >&2 || true
    echo "full log: $CARGO_TARGET_DIR/$t.log" >&2
    failed+=("$t")
  fi
done

found=$(find artifacts -type f 2>/dev/null | sort)
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: crashes in: ${failed[*]}" >&2
  [ -n "$found" ] && echo "$found" | sed 's|^|  fuzz/|' >&2
  echo "reproduce: cd fuzz && cargo +nightly fuzz run <target> <artifact>" >&2
  exit 1
fi
echo "fuzz.sh: no crashes (${seconds}s per target)"
