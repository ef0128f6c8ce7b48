#!/usr/bin/env bash
# Benchmarks beside the peer tools, on the shared generated data. Prints JSON.
#   scripts/bench.sh publish [--datasets shards,images] [--runs 3] [--skip-peers]
#   scripts/bench.sh mount [--runs 3] [--peers squash,casync] | mount-peer [--runs 3]
#   scripts/bench.sh eviction | chunking
#   scripts/bench.sh swarm-lo [--runs 3] [--peers rsync,aria2,sendme] [--wire on|off|both] [--text] [--seed-rate 100MB]
#   scripts/bench.sh swarm-netns [--nodes 8] [--rate 200mbit] [--kill 2] [--no-peers] [--second-origin 200mbit]
#   scripts/bench.sh swarm-zones [--rate 200mbit]
#   scripts/bench.sh scale [--entries 1000000] [--width 1000] [--real-files [--src DIR]] [--no-pull | --pull-no-files] [--no-find]
#       (N tiny files generated into an origin: pull RSS, cold mount, first stat, find, ls)
#   scripts/bench.sh compress [--runs 3]   (two Django releases: origin bytes vs tar | zstd -3,
#       upload vs rsync literal data, with and without compression; shards_v1 publish both ways)
#   scripts/bench.sh scale-gen --entries N --origin DIR [--target NAME@VERSION]   (generate only)
#   scripts/bench.sh gc [--versions 100] [--files 5000] [--churn 0.01] [--keep 10]   (origin gc's cost)
#   scripts/bench.sh python [--workers 8]   (shoalfs/fsspec against the FUSE mount, warm)
#   scripts/bench.sh rates [--mb 100]   (origin, download and upload limits against the rate set)
#   scripts/bench.sh origins-netns [--rates 100mbit,300mbit] [--no-peers]   (two origins, one node)
#   scripts/bench.sh origins-data [--no-peers]   (in-place vs packed publish; replicate vs rclone, aws s3 sync)
#   scripts/bench.sh mount-netns [--nodes 4] [--rate 200mbit] [--isolated]
#   scripts/bench.sh sim --nodes N [--size BYTES] [--churn F] [--liars F] [--stallers F] [--zones 3]
#       [--node-rate 10gbit] [--origin-rate 10gbit] [--seed S]   (a fleet in virtual time)
#       [--peers K (0: full mesh, polled have-maps)] [--delta-ms 5] [--trace-ms MS]
#       [--stagger-ms MS (pulls start spread over MS)] [--readers-by-rank (readers as before)]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v casync >/dev/null || need+=(casync)
command -v b3sum >/dev/null || need+=(b3sum)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v bc >/dev/null || need+=(bc)
command -v rsync >/dev/null || need+=(rsync)
command -v aria2c >/dev/null || need+=(aria2)
command -v mktorrent >/dev/null || need+=(mktorrent)
command -v opentracker >/dev/null || need+=(opentracker)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
command -v squashfuse_ll >/dev/null || need+=(squashfuse)
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
command -v tc >/dev/null || need+=(iproute2)
command -v rclone >/dev/null || need+=(rclone)
[ -x /usr/bin/time ] || need+=(time)
command -v zstd >/dev/null || need+=(zstd)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
cargo build --release --locked -p shoal-cli -p shoal-testnet
export SHOAL_SHARED_BENCH="${SHOAL_SHARED_BENCH:-$(cd .. && pwd)/shared/bench}"
exec target/release/shoal-bench "$@"
