#!/usr/bin/env bash
# The main job end to end on the embedded default (a local origin directory, an in-process
# node): generate a small dataset, publish v1, edit it, publish v2 (only the change is
# uploaded), pull v2 on a "second machine" (fresh state dir that trusts the publisher's key),
# verify every byte, print a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 >/dev/null; }
cargo build --release --locked -p shoal-cli
shoal="$PWD/target/release/shoal"

work=$(mktemp -d /tmp/shoal-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export SHOAL_ORIGIN="$work/origin"

python3 - "$work/data" <<'PY'
import os, random, sys
root = sys.argv[1]; rnd = random.Random(7)
for d in range(8):
    os.makedirs(f"{root}/images/d{d}", exist_ok=True)
    for i in range(100):
        with open(f"{root}/images/d{d}/img{i:04}.jpg", "wb") as f: f.write(os.urandom(rnd.randint(10_000, 120_000)))
os.makedirs(f"{root}/shards", exist_ok=True)
for s in range(4):
    with open(f"{root}/shards/shard-{s:03}.bin", "wb") as f: f.write(os.urandom(32 << 20))
with open(f"{root}/README.txt", "w") as f: f.write("demo dataset\n")
PY

echo "== publish demo@v1"
SHOAL_HOME="$work/publisher" "$shoal" publish "$work/data" demo@v1 --tag latest
echo "== edit: 1 MiB inserted into one shard, 5 images added"
python3 - "$work/data" <<'PY'
import os, sys
root = sys.argv[1]; p = f"{root}/shards/shard-001.bin"
data = open(p, "rb").read(); mid = len(data) // 2
open(p, "wb").write(data[:mid] + os.urandom(1 << 20) + data[mid:])
for i in range(5):
    open(f"{root}/images/d0/new{i}.jpg", "wb").write(os.urandom(50_000))
PY
echo "== publish demo@v2"
SHOAL_HOME="$work/publisher" "$shoal" --json publish "$work/data" demo@v2 --tag latest > "$work/v2.json"
cat "$work/v2.json"
key=$(SHOAL_HOME="$work/publisher" "$shoal" key)

echo "== pull demo@latest on a second machine"
SHOAL_HOME="$work/trainer" "$shoal" trust "$key"
SHOAL_HOME="$work/trainer" "$shoal" --json pull demo@latest --to "$work/pulled" > "$work/pull.json"
cat "$work/pull.json"
diff -r "$work/data" "$work/pulled" && echo "verified: every file of demo@v2 matches the source"
SHOAL_HOME="$work/trainer" "$shoal" diff demo@v1 demo@v2 | tail -1
python3 - "$work/v2.json" "$work/pull.json" <<'PY'
import json, sys
p, q = (json.load(open(f)) for f in sys.argv[1:3])
print(f"summary: v2 is {p['bytes']/2**20:.0f} MiB; publishing it uploaded {p['new_bytes_uploaded']/2**20:.2f} MiB; "
      f"pull fetched {q['bytes_from_origin']/2**20:.0f} MiB from origin in {q['seconds']:.2f} s")
PY
