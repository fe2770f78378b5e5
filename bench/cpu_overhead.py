"""The torch backend's plain losses against eager on a CPU: what the wrapper costs over the ATen call it makes.

On the torch backend the plain losses call the ATen kernels ``torch.nn.functional`` calls; the difference is the
Python argument checks (the same errors on every backend). This script measures it in two ways, on one thread:

- the per-call cost at a size where the checks dominate (cross-entropy 8 x 10, forward only);
- forward + backward at the report's CPU sizes, calls of eager and fusedloss interleaved one by one (alternating
  which goes first), so that the machine's drift hits both alike; the median and the 10th percentile of each.

The pytest-benchmark report times configurations minutes apart, which on a shared 2-core machine varies more than
the few microseconds measured here. Run: ``python bench/cpu_overhead.py`` (about a minute).
"""

import statistics
import time

import torch
import torch.nn.functional as F

import fusedloss


def _ce(rows, classes):
    x = torch.randn(rows, classes, requires_grad=True)
    y = torch.randint(0, classes, (rows,))
    return x, (lambda: F.cross_entropy(x, y)), (lambda: fusedloss.cross_entropy(x, y))


def _pointwise(eager, ours, target=torch.randn):
    a, b = torch.randn(1 << 20, requires_grad=True), target(1 << 20)
    return a, (lambda: eager(a, b)), (lambda: ours(a, b))


CASES = {
    "cross_entropy 512x1000": lambda: _ce(512, 1000),
    "cross_entropy 256x32000": lambda: _ce(256, 32000),
    "mse 2^20": lambda: _pointwise(F.mse_loss, fusedloss.mse_loss),
    "l1 2^20": lambda: _pointwise(F.l1_loss, fusedloss.l1_loss),
    "huber 2^20": lambda: _pointwise(F.huber_loss, fusedloss.huber_loss),
    "smooth_l1 2^20": lambda: _pointwise(F.smooth_l1_loss, fusedloss.smooth_l1_loss),
    "bce_with_logits 2^20": lambda: _pointwise(F.binary_cross_entropy_with_logits,
                                               fusedloss.binary_cross_entropy_with_logits, torch.rand),
}


def _seconds(fn, leaf=None):
    start = time.perf_counter()
    loss = fn()
    if leaf is not None:
        loss.backward()
        leaf.grad = None
    return time.perf_counter() - start


def _interleaved(eager, ours, leaf, calls):
    times = {"eager": [], "fusedloss": []}
    for i in range(calls):
        order = (("eager", eager), ("fusedloss", ours)) if i % 2 else (("fusedloss", ours), ("eager", eager))
        for name, fn in order:
            times[name].append(_seconds(fn, leaf))
    return times


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"fusedloss backend: {fusedloss.backend('cpu')}, torch {torch.__version__}, 1 thread")
    _, eager, ours = _ce(8, 10)
    times = _interleaved(eager, ours, None, 20000)
    per_call = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    print(f"cross_entropy 8x10 forward, median of 20000 calls: eager {per_call['eager']:.1f} us, "
          f"fusedloss {per_call['fusedloss']:.1f} us")
    print("\nforward + backward | calls | eager ms | fusedloss ms | eager / fusedloss: median | 10th percentile")
    for name, make in CASES.items():
        leaf, eager, ours = make()
        _interleaved(eager, ours, leaf, 5)  # warm-up
        calls = max(50, min(600, int(1.5 / _seconds(eager, leaf))))  # ~3 s per case
        times = _interleaved(eager, ours, leaf, calls)
        med = {k: statistics.median(v) for k, v in times.items()}
        p10 = {k: sorted(v)[len(v) // 10] for k, v in times.items()}
        print(f"{name} | {calls} | {med['eager'] * 1e3:.3f} | {med['fusedloss'] * 1e3:.3f} | "
              f"{med['eager'] / med['fusedloss']:.3f} | {p10['eager'] / p10['fusedloss']:.3f}", flush=True)


if __name__ == "__main__":
    main()
