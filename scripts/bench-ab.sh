#!/usr/bin/env bash
# One benchmark scenario for two builds side by side in one invocation: REV (a git revision,
# built in a worktree under target/ab/) and the working tree, taken in turn ROUNDS times so
# that this VM's drifting speed hits both alike. Prints one JSON document per run, tagged
# with the build, then a summary line per build.
#   scripts/bench-ab.sh REV ROUNDS SCENARIO [ARGS...]
#   e.g. scripts/bench-ab.sh ed7a0e2 3 swarm-lo --runs 1 --peers rsync
#        scripts/bench-ab.sh ed7a0e2 2 swarm-netns --nodes 8 --no-peers
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$1 rounds=$2; shift 2
base=target/ab/$rev
if [ ! -x "$base/target/release/shoal" ]; then
  rm -rf "$base"; mkdir -p target/ab
  git worktree add --detach "$base" "$rev" >/dev/null
  (cd "$base" && cargo build --release --locked -p shoal-cli >/dev/null)
fi
bash scripts/bench.sh --help >/dev/null  # installs the peer tools, builds this tree
old=$(cd "$base" && pwd)/target/release/shoal
new=$PWD/target/release/shoal
export SHOAL_SHARED_BENCH="${SHOAL_SHARED_BENCH:-$(cd .. && pwd)/shared/bench}"
for r in $(seq 1 "$rounds"); do
  for b in "$rev:$old" "HEAD+work:$new"; do
    name=${b%%:*} bin=${b#*:}
    out=$(SHOAL_BENCH_BIN=$bin target/release/shoal-bench "$@" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))')
    echo "{\"build\":\"$name\",\"round\":$r,\"result\":$out}"
  done
done
