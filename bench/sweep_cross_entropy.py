"""Measure the large-vocabulary cross-entropy configs on a GPU, to choose ``CE_LARGE_VOCAB`` in
``kernels/configs.py`` (the ``FUSEDLOSS_AUTOTUNE``-style sweep, on request only).

    python bench/sweep_cross_entropy.py [--out FILE.json]

For each (BLOCK_C, num_warps, CHUNK) and each problem, forward+backward of ``fusedloss.cross_entropy`` on bf16
logits, timed as the benchmarks time (``bench/benchutil.py``: CUDA events, L2 flushed before each call, median of
20 after two warm-up calls). Bytes counted as in ``bench/bench_cross_entropy.py``: logits read once + gradient
written once + targets + losses; the fraction is against the device copy ceiling measured in the same run
(``benchutil.measure_ceilings``).
"""

import argparse
import json
import os
import statistics

import torch

import fusedloss

from benchutil import event_times_ms, l2_flush, measure_ceilings

# The H100 sweep of 2026-11-26 measured the first seven (bench/results/); the larger blocks after them (Liger's
# shape is 32K elements x 32 warps) are the next candidates.
CONFIGS = [(4096, 8, chunk) for chunk in (0, 8192, 16384, 32768)] + [(8192, 16, 16384), (8192, 16, 32768),
                                                                   (2048, 4, 8192),
                                                                   (8192, 16, 0), (16384, 16, 0), (32768, 32, 0)]
PROBLEMS = [(16384, 32000), (16384, 128256), (16384, 256000)]
OPTIONS = {"plain": {}, "ls+focal+z": {"label_smoothing": 0.1, "focal_gamma": 2.0, "z_loss": 1e-4}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("the sweep measures the Triton kernels: it needs a CUDA device")
        return
    device = torch.device("cuda")
    copy_gbps = measure_ceilings(device)["copy_gbps"]
    flush = l2_flush(device)
    rows = []
    for n, v in PROBLEMS:
        x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, v, (n,), device="cuda")
        bytes_moved = 2 * n * v * 2 + 12 * n
        for name, kw in OPTIONS.items():
            for config in CONFIGS:
                os.environ["FUSEDLOSS_CE_CONFIG"] = ",".join(map(str, config))

                def step(x=x, y=y, kw=kw):
                    x.grad = None
                    fusedloss.cross_entropy(x, y, **kw).backward()

                step()  # compile
                step()
                ms = statistics.median(event_times_ms(step, 20, flush))
                frac = bytes_moved / (ms * 1e-3) / 1e9 / copy_gbps
                rows.append({"shape": f"{n}x{v}", "options": name, "block_c": config[0], "num_warps": config[1],
                             "chunk": config[2], "ms": ms, "frac_copy_bw": frac})
                print(f"{n}x{v:<7} {name:<11} BLOCK_C={config[0]:<5} warps={config[1]:<2} CHUNK={config[2]:<6} "
                      f"{ms:8.3f} ms  {100 * frac:5.1f}% of copy BW", flush=True)
                if args.out:  # after every row, so a time limit keeps what was measured
                    with open(args.out, "w") as f:
                        json.dump({"device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps, "rows": rows}, f,
                                  indent=1)
        del x
        torch.cuda.empty_cache()
    os.environ.pop("FUSEDLOSS_CE_CONFIG")
    best = {}
    for r in rows:
        key = (r["shape"], r["options"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    print("\nbest per problem:")
    for (shape, name), r in best.items():
        print(f"  {shape:<13} {name:<11} BLOCK_C={r['block_c']} warps={r['num_warps']} CHUNK={r['chunk']}: "
              f"{r['ms']:.3f} ms, {100 * r['frac_copy_bw']:.1f}% of copy BW")


if __name__ == "__main__":
    main()
