"""Draws the latency distribution of every closed-loop workload in a
compare.jsonl (written by benches/compare.sh) as one SVG: latency against
percentile, HDR-histogram style (the x axis stretches the tail: 90 %, 99 %,
99.9 %, 99.99 % are equally spaced), warden and the Redis recipe side by side.

    python3 benches/plot_latency.py target/bench/compare.jsonl benches/results/latency.svg

Standard library only, so it runs wherever compare.sh does.
"""

from __future__ import annotations

import json
import math
import sys

WIDTH, HEIGHT = 920, 480
LEFT, RIGHT, TOP, BOTTOM = 70, 300, 40, 60
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#e377c2", "#7f7f7f"]
# Quantiles past 99.99 % say more about one unlucky request than the curve.
MAX_NINES = 4.0


def x_of(q: float) -> float:
    """Position of a quantile on the 'number of nines' axis."""
    nines = MAX_NINES if q >= 1.0 else min(MAX_NINES, -math.log10(1.0 - q))
    return LEFT + (WIDTH - LEFT - RIGHT) * nines / MAX_NINES


def main(src: str, dst: str) -> None:
    rows = [json.loads(line) for line in open(src) if line.strip()]
    series = [r for r in rows if r.get("percentiles") and "rate" not in r.get("label", "").lower()
              and "50%" not in r.get("label", "")]
    if not series:
        raise SystemExit(f"{src}: no workload with a percentile curve")
    top_ms = max(ms for r in series for q, ms in r["percentiles"] if q <= 0.9999)
    step = 10 ** math.floor(math.log10(max(top_ms, 0.001)))
    y_max = math.ceil(top_ms / step) * step

    def y_of(ms: float) -> float:
        return TOP + (HEIGHT - TOP - BOTTOM) * (1.0 - min(ms, y_max) / y_max)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="15">Latency by percentile: warden and the Redis recipe '
        f'(same load generator, 2 cores)</text>',
    ]
    # Grid and axes.
    for i in range(6):
        ms = y_max * i / 5
        y = y_of(ms)
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{ms:g}</text>')
    for q, label in [(0.0, "0%"), (0.9, "90%"), (0.99, "99%"), (0.999, "99.9%"), (0.9999, "99.99%")]:
        x = x_of(q)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">{label}</text>')
    out.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 15}" text-anchor="middle">percentile</text>')
    out.append(f'<text x="18" y="{(TOP + HEIGHT - BOTTOM) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 18 {(TOP + HEIGHT - BOTTOM) / 2})">latency (ms)</text>')
    # Curves and legend.
    for i, r in enumerate(series):
        color = COLORS[i % len(COLORS)]
        points = " ".join(f"{x_of(q):.1f},{y_of(ms):.1f}" for q, ms in r["percentiles"] if q <= 0.9999)
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        ly = TOP + 10 + i * 20
        lx = WIDTH - RIGHT + 15
        out.append(f'<line x1="{lx}" x2="{lx + 20}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/>')
        label = r["label"].replace("&", "&amp;").replace("<", "&lt;")
        out.append(f'<text x="{lx + 26}" y="{ly + 4}">{label} ({r["rps"]:,.0f}/s)</text>')
    out.append("</svg>")
    with open(dst, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
