#!/usr/bin/env python3
"""Picks at most MAX inputs that cover the most coverage edges, greedily, from a libFuzzer merge
control file (-merge=1 -merge_control_file=FILE), and copies them into OUT_DIR (emptied first).

libFuzzer's own minimization keeps every input that adds a feature, which for the frame targets
is well over a thousand tiny files; the stored corpus is meant to stay a few hundred, so this
keeps the inputs that add the most edges first and stops at MAX.

usage: fuzz_corpus_pick.py CONTROL_FILE MAX OUT_DIR
"""
import os
import shutil
import sys


def main(control, limit, out):
    with open(control) as f:
        lines = f.read().splitlines()
    count = int(lines[0])
    paths = lines[2 : 2 + count]
    edges = {}
    for line in lines[2 + count :]:
        parts = line.split()
        if parts and parts[0] == "COV":
            edges[int(parts[1])] = set(parts[2:])
    covered, picked = set(), []
    while len(picked) < limit:
        best = max(edges, key=lambda i: (len(edges[i] - covered), -i), default=None)
        if best is None or not edges[best] - covered:
            break
        covered |= edges.pop(best)
        picked.append(paths[best])
    # Read before emptying OUT_DIR: it is usually one of the merged corpora.
    kept = {}
    for path in picked:
        with open(path, "rb") as f:
            kept[os.path.basename(path)] = f.read()
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name, data in kept.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    total = set().union(covered, *edges.values())
    print(f"{out}: {len(picked)} inputs cover {len(covered)} of {len(total)} edges")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
