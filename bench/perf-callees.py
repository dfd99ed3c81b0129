#!/usr/bin/env python3
# Direct callees (or the frames under) a function in perf script output, as shares of all samples.
import sys, re, collections
# usage: callees.py script FUNC_SUBSTR [depth]
path, func = sys.argv[1], sys.argv[2]
depth = int(sys.argv[3]) if len(sys.argv) > 3 else 1
samples = []
cur = []
for line in open(path, errors='replace'):
    line = line.rstrip('\n')
    if not line.strip():
        if cur: samples.append(cur)
        cur = []
        continue
    if line.startswith('\t') or line.startswith(' '):
        parts = line.strip().split(None, 1)
        sym = parts[1] if len(parts) > 1 else '?'
        sym = re.sub(r'\+0x[0-9a-f]+$', '', sym)
        cur.append(sym)
    else:
        cur = []
if cur: samples.append(cur)
total = len(samples)
inside = 0
callee = collections.Counter()
for fr in samples:  # fr[0] = leaf
    idx = [i for i, s in enumerate(fr) if func in s]
    if not idx: continue
    inside += 1
    i = max(idx)  # outermost occurrence
    key = ' <- '.join(fr[max(0, i - depth):i][::-1]) if i > 0 else '(self)'
    callee[key] += 1
print(f"total samples {total}, in {func}: {inside} ({100*inside/total:.1f}%)")
for k, v in callee.most_common(40):
    print(f"{100*v/total:6.2f}%  {k[:230]}")
