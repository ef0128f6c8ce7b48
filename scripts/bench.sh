#!/usr/bin/env bash
# Benchmarks beside the peer tools, on the shared generated data. Prints JSON.
#   scripts/bench.sh publish [--datasets shards,images] [--runs 3] [--skip-peers]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v casync >/dev/null || need+=(casync)
command -v b3sum >/dev/null || need+=(b3sum)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v bc >/dev/null || need+=(bc)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --locked -p shoal-cli -p shoal-testnet
export SHOAL_SHARED_BENCH="${SHOAL_SHARED_BENCH:-$(cd .. && pwd)/shared/bench}"
exec target/release/shoal-bench "$@"
