#!/usr/bin/env bash
# The main job end to end on the embedded default (a local origin directory, nodes on
# loopback): generate a small dataset, publish v1, edit it, publish v2 (only the change is
# uploaded), pull v2 on a "second machine" (fresh state dir that trusts the publisher's key),
# verify every byte; then two node daemons on loopback: node a pulls from the origin, node b
# pulls from node a, and node b's daemon serves a FUSE mount of v2; print a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v python3 >/dev/null || need+=(python3)
command -v fusermount3 >/dev/null || need+=(fuse3)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --locked -p shoal-cli
shoal="$PWD/target/release/shoal"

work=$(mktemp -d /tmp/shoal-demo.XXXXXX)
pids=()
cleanup() {
  mountpoint -q "$work/mnt" 2>/dev/null && { fusermount3 -u "$work/mnt" 2>/dev/null || umount -l "$work/mnt"; }
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
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

echo "== two training nodes on loopback: node a pulls from the origin, node b from node a"
for n in a b; do SHOAL_HOME="$work/node-$n" "$shoal" trust "$key" >/dev/null; done
# Waits until the daemon of state directory $1 answers; prints its first listen address.
wait_node() {
  for _ in $(seq 100); do
    if addr=$(SHOAL_HOME="$1" "$shoal" --json status 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["listen"][0])' 2>/dev/null); then
      echo "$addr"; return 0
    fi
    sleep 0.2
  done
  echo "node $1 did not start: $(cat "$1.log")" >&2; return 1
}
SHOAL_HOME="$work/node-a" "$shoal" node run --listen /ip4/127.0.0.1/tcp/0 --no-mdns --zone z1 2>"$work/node-a.log" &
pids+=($!)
addr_a=$(wait_node "$work/node-a")
SHOAL_HOME="$work/node-a" "$shoal" --json pull demo@v2 --no-files > "$work/pull-a.json"
SHOAL_HOME="$work/node-b" "$shoal" node run --listen /ip4/127.0.0.1/tcp/0 --no-mdns --zone z1 --bootstrap "$addr_a" 2>"$work/node-b.log" &
pids+=($!)
wait_node "$work/node-b" >/dev/null
for _ in $(seq 100); do
  SHOAL_HOME="$work/node-b" "$shoal" --json status | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if any(p["connected"] and p["versions"] for p in s["peers"]) else 1)' && break
  sleep 0.2
done
SHOAL_HOME="$work/node-b" "$shoal" --json pull demo@v2 --to "$work/pulled-b" > "$work/pull-b.json"
diff -r "$work/data" "$work/pulled-b" && echo "verified: node b's copy matches the source"
SHOAL_HOME="$work/node-b" "$shoal" status

if [ -e /dev/fuse ]; then
  echo "== mount demo@v2 on node b (its daemon serves the mount)"
  mkdir -p "$work/mnt"
  SHOAL_HOME="$work/node-b" "$shoal" --json mount demo@v2 "$work/mnt" > "$work/mount.json" 2>"$work/mount.log" &
  mount_pid=$!
  for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.1; done
  ls "$work/mnt"
  cmp "$work/data/shards/shard-001.bin" "$work/mnt/shards/shard-001.bin" && echo "verified: shard-001.bin read through the mount matches the source"
  SHOAL_HOME="$work/node-b" "$shoal" unmount "$work/mnt" >/dev/null
  wait "$mount_pid"
  cat "$work/mount.json"
else
  echo "== (no /dev/fuse here: skipping the mount part)"
fi
python3 - "$work/pull-a.json" "$work/pull-b.json" <<'PY'
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:3])
print(f"summary: node a took {a['bytes_from_origin']/2**20:.0f} MiB from the origin; "
      f"node b took {b['bytes_from_peers']/2**20:.0f} MiB from node a and {b['bytes_from_origin']/2**20:.0f} MiB from the origin")
PY
