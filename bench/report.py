"""Render a pytest-benchmark JSON file as a markdown table and a PNG plot.

    python bench/report.py RESULTS.json [--markdown OUT.md] [--plot OUT.png]

Rows are grouped by (family, shape, config, mode); within a group each provider's median time, throughput
(GB/s or TFLOP/s, with the fraction of the ceiling measured in the same run), peak memory and speed-up over
eager PyTorch. Skipped benchmarks (an importable peer missing, an eager baseline out of memory) are absent.
"""

import argparse
import json
from collections import defaultdict


def load_rows(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = dict(bench.get("extra_info", {}))
        info.setdefault("median_ms", bench["stats"]["median"] * 1e3)
        info.setdefault("family", bench["name"].split("[")[0].removeprefix("test_"))
        rows.append(info)
    return data, rows


def _group_key(row):
    return (row.get("family", ""), row.get("shape", ""), row.get("config", ""), row.get("mode", ""))


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def markdown(data, rows):
    machine = data.get("machine_info", {})
    device = next((r["device"] for r in rows if r.get("device")), "unknown device")
    lines = [
        f"Device: **{device}** (host {machine.get('node', '?')}, {data.get('datetime', '')[:10]}). "
        f"Ceilings measured in the same run: copy {_fmt(rows[0].get('copy_gbps_ceiling'), '.0f')} GB/s, "
        f"matmul {_fmt(rows[0].get('matmul_tflops_ceiling'), '.1f')} TFLOP/s." if rows else "No results.",
        "",
        "| family | shape | config | mode | provider | dtype | median ms | GB/s | % copy BW | TFLOP/s | % matmul "
        "| peak MB | vs eager |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups = defaultdict(list)
    for row in rows:
        groups[_group_key(row)].append(row)
    for key in sorted(groups):
        eager = next((r["median_ms"] for r in groups[key] if r.get("provider") == "eager"), None)
        for row in sorted(groups[key], key=lambda r: r["median_ms"]):
            speedup = f"{eager / row['median_ms']:.2f}x" if eager else ""
            frac_bw = row.get("frac_copy_bw")
            frac_mm = row.get("frac_matmul")
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {row.get('provider', '')} | {row.get('dtype', '')} "
                f"| {row['median_ms']:.3f} | {_fmt(row.get('gbps'), '.0f')} "
                f"| {'' if frac_bw is None else f'{100 * frac_bw:.0f}%'} | {_fmt(row.get('tflops'), '.1f')} "
                f"| {'' if frac_mm is None else f'{100 * frac_mm:.0f}%'} | {_fmt(row.get('peak_mem_mb'), '.0f')} "
                f"| {speedup} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """One panel per (family, mode): median time per provider across shapes (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        label = f"{row.get('provider')} [{row.get('config', '')}]"
        panels[(row.get("family", ""), row.get("mode", ""))][label][row.get("shape", "")] = row["median_ms"]
    if not panels:
        return
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, ((family, mode), series) in zip(axes.flat, sorted(panels.items())):
        shapes = sorted({s for points in series.values() for s in points},
                        key=lambda s: [int(p) if p.isdigit() else p for p in s.replace("x", " ").split()])
        for label, points in sorted(series.items()):
            xs = [i for i, s in enumerate(shapes) if s in points]
            ax.plot(xs, [points[shapes[i]] for i in xs], marker="o", label=label)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"{family} {mode}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--markdown", help="write the table here (default: print it)")
    parser.add_argument("--plot", help="write a PNG plot here")
    args = parser.parse_args(argv)
    data, rows = load_rows(args.results)
    table = markdown(data, rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    else:
        print(table)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
