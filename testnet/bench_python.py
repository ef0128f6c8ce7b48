"""Warm read throughput of a version through the FUSE mount and through shoalfs (fsspec),
in one run: every file read whole, by 1 and by N worker processes, each mode read once to
warm it and then timed. Prints one JSON document.

    python3 bench_python.py --mount MP --ref ds@v1 [--workers 1,8]
"""

import argparse
import json
import multiprocessing as mp
import os
import time

import fsspec
import shoalfs  # noqa: F401  (registers shoal://)

MOUNT = None
REF = None
FS = None


def read_mount(rels):
    n = 0
    for r in rels:
        with open(os.path.join(MOUNT, r), "rb") as f:
            n += len(f.read())
    return n


def read_fsspec(rels):
    global FS
    if FS is None:
        FS = fsspec.filesystem("shoal", skip_instance_cache=True)
    n = 0
    for r in rels:
        n += len(FS.cat_file(REF + "/" + r))
    return n


def run(fn, rels, workers):
    t = time.perf_counter()
    if workers == 1:
        total = fn(rels)
    else:
        # Interleaved slices: every worker reads files from all over the version.
        parts = [rels[i::workers] for i in range(workers)]
        with mp.get_context("fork").Pool(workers) as pool:
            total = sum(pool.map(fn, parts))
    return total, time.perf_counter() - t


def main():
    global MOUNT, REF
    ap = argparse.ArgumentParser()
    ap.add_argument("--mount", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--workers", default="1,8")
    a = ap.parse_args()
    MOUNT, REF = a.mount, a.ref
    rels = []
    for root, _, files in os.walk(MOUNT):
        for f in files:
            rels.append(os.path.relpath(os.path.join(root, f), MOUNT))
    rels.sort()
    out = {"ref": REF, "files": len(rels), "runs": []}
    for workers in [int(w) for w in a.workers.split(",")]:
        row = {"workers": workers}
        for name, fn in [("mount", read_mount), ("fsspec", read_fsspec)]:
            run(fn, rels, workers)  # warm
            total, secs = run(fn, rels, workers)
            row[name] = {
                "bytes": total,
                "seconds": secs,
                "files_per_s": len(rels) / secs,
                "mb_per_s": total / secs / 1e6,
            }
        row["fsspec_over_mount"] = row["mount"]["seconds"] / row["fsspec"]["seconds"]
        out["runs"].append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
