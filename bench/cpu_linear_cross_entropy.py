"""The torch backend of ``fusedloss.linear_cross_entropy`` against torch's own chunked ``F.linear_cross_entropy``
(``options=torch.nn.LinearCrossEntropyOptions()``, torch >= 2.13) and eager (``F.cross_entropy(F.linear(x, W),
y)``, the logits materialized), side by side in one process on a CPU: forward + backward time and the peak memory
beyond inputs, weight and their gradients (``benchutil.peak_extra_bytes``).

Work: 6 N H V FLOPs (the three matmuls) for every provider. Timing: the providers interleaved call by call
(alternating which goes first), so that a shared machine's drift hits all alike; the median of ``--repeats``.
Run: ``python bench/cpu_linear_cross_entropy.py --out bench/results/NAME`` (writes NAME.json and NAME.md; about
5 minutes at the default 8192 x 512 x 50000 on 2 cores).
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import fusedloss

from benchutil import peak_extra_bytes


def providers():
    table = {
        "fusedloss (torch backend)": lambda x, w, y: fusedloss.linear_cross_entropy(x, w, y),
        "eager": lambda x, w, y: F.cross_entropy(F.linear(x, w).float(), y),
    }
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        table["torch chunked"] = lambda x, w, y: F.linear_cross_entropy(x, w, y, options=options)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192x512x50000", help="N x H x V")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True, help="path prefix of the .json and .md results")
    args = parser.parse_args()
    os.environ["FUSEDLOSS_BACKEND"] = "torch"
    n, hidden, vocab = map(int, args.shape.split("x"))
    flops = 6 * n * hidden * vocab
    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, hidden, generator=gen).to(dtype).requires_grad_()
        w = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5).to(dtype).requires_grad_()
        y = torch.randint(0, vocab, (n,), generator=gen)
        table = providers()
        steps = {name: (lambda fn=fn, x=x, w=w, y=y: fn(x, w, y).backward()) for name, fn in table.items()}
        with torch.no_grad():
            reference = F.cross_entropy(F.linear(x.double(), w.double()), y)
        times = {name: [] for name in steps}
        for step in steps.values():  # warm-up
            step()
        for repeat in range(args.repeats):
            order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
            for name in order:
                x.grad = w.grad = None
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
        for name, step in steps.items():
            peak = peak_extra_bytes(step, x.device, [x, w], [x, w, y])
            loss = table[name](x, w, y).detach().double()
            median = statistics.median(times[name])
            results.append(dict(provider=name, dtype=dtype_name, shape=args.shape, seconds=median,
                                gflops=flops / median / 1e9, peak_extra_mb=peak / 2**20,
                                logits_mb=n * vocab * x.element_size() / 2**20,
                                loss_rel_err=abs(float(loss - reference) / float(reference)), times=times[name]))
            print(f"{dtype_name} {name}: {median:.2f} s, {flops / median / 1e9:.0f} GFLOP/s, "
                  f"peak extra {peak / 2**20:.0f} MiB")
    meta = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, date=time.strftime("%Y-%m-%d"), flops_counted="6 N H V")
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    lines = [f"# linear cross-entropy on CPU, {args.shape} (N x H x V), forward + backward",
             "", f"torch {meta['torch']}, {meta['threads']} threads, {meta['date']}; FLOPs counted: 6 N H V; "
             "peak memory beyond inputs, weight and their gradients; median of "
             f"{args.repeats} interleaved runs.", "",
             "| dtype | provider | time (s) | GFLOP/s | peak extra (MiB) | share of the logits "
             "| loss rel. err vs fp64 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['dtype']} | {r['provider']} | {r['seconds']:.2f} | {r['gflops']:.0f} | "
                     f"{r['peak_extra_mb']:.0f} | {r['peak_extra_mb'] / r['logits_mb']:.1%} "
                     f"| {r['loss_rel_err']:.1e} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
