#!/usr/bin/env bash
# Fuzzes every decoder an outsider can feed (tree and chunk-list nodes, pack indexes,
# versions, tags, control messages, bulk request frames, daemon requests) with cargo-fuzz
# (libFuzzer + AddressSanitizer), SECS seconds each (default 300). Installs cargo-fuzz if
# missing. Inputs that crash are copied into fuzz/regressions/<target>/, which the normal
# test suite replays (testnet/tests/fuzz_regressions.rs): fix the crash, keep the input.
# Prints one JSON line per target.
#   bash scripts/fuzz.sh [SECS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-300}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz passes flags only nightly accepts (sanitizer, coverage instrumentation); the
# machine's stable toolchain takes them when told it is bootstrapping.
export RUSTC_BOOTSTRAP=1
corpus=target/fuzz-corpus
cargo run --quiet --manifest-path fuzz/Cargo.toml --bin seeds -- "$corpus"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=($(ls fuzz/fuzz_targets | sed 's/\.rs$//'))
status=0
for t in "${targets[@]}"; do
  mkdir -p "$corpus/$t" "fuzz/artifacts/$t"
  log=target/fuzz-$t.log
  set +e
  cargo fuzz run "$t" "$corpus/$t" "fuzz/regressions/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=1048576 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  crashes=0
  for a in fuzz/artifacts/"$t"/*; do
    [ -f "$a" ] || continue
    cp "$a" "fuzz/regressions/$t/"
    crashes=$((crashes + 1))
  done
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  printf '{"target":"%s","seconds":%s,"runs":%s,"crashes":%s,"exit":%s}\n' "$t" "$secs" "${runs:-0}" "$crashes" "$rc"
  [ "$crashes" -eq 0 ] && [ "$rc" -eq 0 ] || status=1
done
exit $status
