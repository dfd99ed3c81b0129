#!/usr/bin/env python3
"""Renders folded stacks (`weft-bench profile` writes them: `a;b;c count` per line) as a
flame graph SVG: one box per frame, width = share of samples, callers below callees;
hover a box for its name and share. Standard library only.

    python3 bench/flamegraph.py bench/profiles/weft-h2-1000.folded > bench/profiles/weft-h2-1000.svg
"""
import html
import zlib
import sys

WIDTH, ROW, FONT = 1600, 16, 11


def main(path):
    root = {"n": 0, "kids": {}}
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        node = root
        node["n"] += n
        for frame in stack.split(";"):
            node = node["kids"].setdefault(frame, {"n": 0, "kids": {}})
            node["n"] += n
    total = root["n"] or 1
    boxes = []

    def walk(node, depth, x):
        for name, kid in sorted(node["kids"].items()):
            w = kid["n"] / total * WIDTH
            if w >= 0.5:
                boxes.append((name, depth, x, w, kid["n"]))
                walk(kid, depth + 1, x)
            x += w

    walk(root, 0, 0.0)
    depth = max((b[1] for b in boxes), default=0) + 1
    height = depth * ROW + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="monospace" font-size="{FONT}">',
        f'<text x="4" y="14">{html.escape(path)}: {total} samples (hover a box)</text>',
    ]
    for name, d, x, w, n in boxes:
        y = height - (d + 1) * ROW
        h = (zlib.crc32(name.encode()) & 0xFFFF) / 0xFFFF
        color = f"rgb({200 + int(55 * h)},{80 + int(120 * (1 - h))},{40})"
        label = html.escape(name)
        text = label[: int(w / (FONT * 0.6))] if w > 30 else ""
        out.append(
            f'<g><title>{label} ({n} samples, {n * 100 / total:.2f}%)</title>'
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{ROW - 1}" fill="{color}"/>'
            f'<text x="{x + 2:.1f}" y="{y + ROW - 4}">{text}</text></g>'
        )
    out.append("</svg>")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
