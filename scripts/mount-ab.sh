#!/usr/bin/env bash
# Alternating A/B of reads through `shoal mount`: the bench's own read (`tar -cf - . | cat`
# over images_v1, or `dd bs=1M` of each shard of shards_v1 with DATASET=shards), one fresh
# mount per run, binaries taken in turn, so this VM's drifting speed hits each alike. `sqll`
# stands for squashfuse_ll on a squashfs image of the same files. Warm by default (the store
# filled once, its files in the page cache); COLD=1 empties the store and whole-file copies and
# drops the page cache before each Shoal run (every chunk then comes from the local origin).
# To compare flags, pass wrapper scripts, e.g. one running `shoal "$@" --passthrough off` for
# `mount`. Prints one line per run: name seconds.
#   scripts/mount-ab.sh ROUNDS BIN_OR_sqll...   e.g. scripts/mount-ab.sh 3 sqll /tmp/old/shoal target/release/shoal
#   DATASET=shards COLD=1 scripts/mount-ab.sh 3 /tmp/off /tmp/on
set -euo pipefail
rounds=$1; shift
B=${BENCH_ROOT:-/tmp/shoal-bench}
DS=${DATASET:-images}
DATA=$B/data/${DS}_v1
W=$B/work/mount-ab-$DS; MNT=$W/mnt
[ -d "$DATA" ] || { echo "no $DATA: run scripts/bench.sh mount once to generate the data" >&2; exit 1; }
mkdir -p "$W" "$MNT"
export SHOAL_HOME=$W/home SHOAL_ORIGIN=$W/origin
first=""
for b in "$@"; do [ "$b" != sqll ] && { first=$b; break; }; done
if [ -n "$first" ] && [ ! -e "$W/ready" ]; then
  mkdir -p "$SHOAL_ORIGIN"
  "$first" publish "$DATA" "$DS@v1" >/dev/null
  "$first" pull --no-files "$DS@v1" >/dev/null
  touch "$W/ready"
fi
if [[ " $* " == *" sqll "* ]] && [ ! -e "$W/$DS.sqfs" ]; then
  mksquashfs "$DATA" "$W/$DS.sqfs" -noappend -no-progress >/dev/null
fi
for _ in $(seq 1 "$rounds"); do
  for b in "$@"; do
    if [ "$b" = sqll ]; then
      cat "$W/$DS.sqfs" >/dev/null
      squashfuse_ll -f "$W/$DS.sqfs" "$MNT" >/dev/null 2>&1 &
    else
      if [ "${COLD:-0}" = 1 ]; then
        rm -rf "$SHOAL_HOME/store" "$SHOAL_HOME/files"; sync; echo 3 > /proc/sys/vm/drop_caches
      fi
      "$b" mount "$DS@v1" "$MNT" >/dev/null 2>&1 &
    fi
    for _ in $(seq 1 100); do mountpoint -q "$MNT" && break; sleep 0.1; done
    s=$(date +%s.%N)
    if [ "$DS" = shards ]; then
      for f in "$MNT"/*; do dd if="$f" of=/dev/null bs=1M status=none; done
    else
      tar -C "$MNT" -cf - . | cat >/dev/null
    fi
    e=$(date +%s.%N)
    echo "$(basename "$b") $(echo "$e - $s" | bc)"
    if [ "$b" = sqll ]; then umount "$MNT"; else "$b" unmount "$MNT" >/dev/null; fi
    wait; sleep 0.5
  done
done
