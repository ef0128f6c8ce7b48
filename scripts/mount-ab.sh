#!/usr/bin/env bash
# Alternating A/B of warm small-file reads through `shoal mount`: the bench's own read
# (`tar -cf - . | cat`) over images_v1, one fresh mount per run, binaries taken in turn, so
# this VM's drifting speed hits each alike. `sqll` stands for squashfuse_ll on a squashfs
# image of the same files. Prints one line per run: name seconds.
#   scripts/mount-ab.sh ROUNDS BIN_OR_sqll...   e.g. scripts/mount-ab.sh 3 sqll /tmp/old/shoal target/release/shoal
set -euo pipefail
rounds=$1; shift
B=${BENCH_ROOT:-/tmp/shoal-bench}
DATA=$B/data/images_v1
W=$B/work/mount-ab; MNT=$W/mnt
[ -d "$DATA" ] || { echo "no $DATA: run scripts/bench.sh mount once to generate the data" >&2; exit 1; }
mkdir -p "$W" "$MNT"
export SHOAL_HOME=$W/home SHOAL_ORIGIN=$W/origin
first=""
for b in "$@"; do [ "$b" != sqll ] && { first=$b; break; }; done
if [ -n "$first" ] && [ ! -e "$W/ready" ]; then
  mkdir -p "$SHOAL_ORIGIN"
  "$first" publish "$DATA" images@v1 >/dev/null
  "$first" pull --no-files images@v1 >/dev/null
  touch "$W/ready"
fi
if [[ " $* " == *" sqll "* ]] && [ ! -e "$W/images.sqfs" ]; then
  mksquashfs "$DATA" "$W/images.sqfs" -noappend -no-progress >/dev/null
fi
for _ in $(seq 1 "$rounds"); do
  for b in "$@"; do
    if [ "$b" = sqll ]; then
      cat "$W/images.sqfs" >/dev/null
      squashfuse_ll -f "$W/images.sqfs" "$MNT" >/dev/null 2>&1 &
    else
      "$b" mount images@v1 "$MNT" >/dev/null 2>&1 &
    fi
    for _ in $(seq 1 100); do mountpoint -q "$MNT" && break; sleep 0.1; done
    s=$(date +%s.%N)
    tar -C "$MNT" -cf - . | cat >/dev/null
    e=$(date +%s.%N)
    echo "$(basename "$b") $(echo "$e - $s" | bc)"
    if [ "$b" = sqll ]; then umount "$MNT"; else "$b" unmount "$MNT" >/dev/null; fi
    wait; sleep 0.5
  done
done
