"""Read throughput of a version through the FUSE mount, through shoalfs (fsspec) and, with
--native, from the directory it was published from, in one run: every file read whole, in one
shuffled order (fixed seed), by 1 and by N worker processes. Prints one JSON document.

    python3 bench_python.py --mount MP --ref ds@v1 [--native DIR] [--workers 1,8] [--cold]

Warm: each mode is read once, then timed (the mount's and the native files' pages are then in
the kernel's page cache). Two ways of opening a file are timed for the mount and native
directories: `open(path, "rb")` as CPython 3.11 does it (its buffered open asks whether the file
is a terminal, an ioctl that a FUSE mount must answer: one request per file) and unbuffered
(`buffering=0`: no such ioctl, as C readers and CPython 3.14's `open()` do).
--cold: also times the unbuffered reads with the page cache dropped first (needs root).
"""

import argparse
import json
import multiprocessing as mp
import os
import random
import time

import fsspec
import shoalfs  # noqa: F401  (registers shoal://)

ROOTS = {}
REF = None
FS = None


def reader(root, buffering):
    def read(rels):
        base = ROOTS[root]
        n = 0
        for r in rels:
            with open(os.path.join(base, r), "rb", buffering=buffering) as f:
                n += len(f.read())
        return n

    return read


def read_fsspec(rels):
    global FS
    if FS is None:
        FS = fsspec.filesystem("shoal", skip_instance_cache=True)
    n = 0
    for r in rels:
        n += len(FS.cat_file(REF + "/" + r))
    return n


MODES = {
    "mount": reader("mount", -1),
    "mount_unbuffered": reader("mount", 0),
    "fsspec": read_fsspec,
    "native": reader("native", -1),
    "native_unbuffered": reader("native", 0),
}


def work(arg):
    mode, rels = arg
    return MODES[mode](rels)


def run(mode, rels, workers):
    t = time.perf_counter()
    if workers == 1:
        total = MODES[mode](rels)
    else:
        # Interleaved slices: every worker reads files from all over the version.
        parts = [(mode, rels[i::workers]) for i in range(workers)]
        with mp.get_context("fork").Pool(workers) as pool:
            total = sum(pool.map(work, parts))
    return total, time.perf_counter() - t


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def figures(total, secs, files):
    return {
        "bytes": total,
        "seconds": secs,
        "files_per_s": files / secs,
        "mb_per_s": total / secs / 1e6,
    }


def main():
    global REF
    ap = argparse.ArgumentParser()
    ap.add_argument("--mount", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--native")
    ap.add_argument("--workers", default="1,8")
    ap.add_argument("--cold", action="store_true")
    a = ap.parse_args()
    ROOTS["mount"] = a.mount
    if a.native:
        ROOTS["native"] = a.native
    REF = a.ref
    rels = []
    for root, _, files in os.walk(a.mount):
        for f in files:
            rels.append(os.path.relpath(os.path.join(root, f), a.mount))
    rels.sort()
    random.Random(7).shuffle(rels)
    out = {"ref": REF, "files": len(rels), "runs": []}
    modes = ["mount", "mount_unbuffered", "fsspec"]
    if a.native:
        modes += ["native", "native_unbuffered"]
    for workers in [int(w) for w in a.workers.split(",")]:
        row = {"workers": workers}
        for mode in modes:
            run(mode, rels, workers)  # warm
            row[mode] = figures(*run(mode, rels, workers), len(rels))
        if a.cold:
            for mode in ["mount_unbuffered", "native_unbuffered"]:
                if mode in modes:
                    drop_caches()
                    row[mode + "_cold"] = figures(*run(mode, rels, workers), len(rels))

        def ratio(a, b):
            if a in row and b in row:
                row[f"{a}_over_{b}"] = row[b]["seconds"] / row[a]["seconds"]

        ratio("fsspec", "mount")
        ratio("mount", "native")
        ratio("mount_unbuffered", "native_unbuffered")
        ratio("mount_unbuffered_cold", "native_unbuffered_cold")
        ratio("fsspec", "native")
        out["runs"].append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
