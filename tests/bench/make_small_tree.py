#!/usr/bin/env python3
"""Benchmark tree of N small files (~12 bytes each) in directories of 1,000.

Usage: make_small_tree.py ROOT N
"""
import os
import sys

root, n = sys.argv[1], int(sys.argv[2])
per = 1000
for i in range(n):
    if i % per == 0:
        d = os.path.join(root, "d%04d" % (i // per))
        os.mkdir(d)
    with open(os.path.join(d, "f%04d" % (i % per)), "w") as f:
        f.write("file %d\n" % i)
