"""Per-phase breakdown of linear cross-entropy forward + backward, both kernel schedules, against the bare matmuls
and the bf16 matmul ceiling measured in the same run (bench/NOTES.md holds the predictions it checks).

    python bench/phases_linear_cross_entropy.py [--out DIR]     # GPU: N = 8192, H = 4096, V = 128256, bf16, ~1-2 min
    python bench/phases_linear_cross_entropy.py --dry           # CPU: tiny fp16 sizes in Triton's interpreter

Every time is a CUDA-event median with the L2 flushed before each call (``benchutil.event_times_ms``), so the phases
add up to what a training step pays. Phases, each with its FLOPs and its share of the ceiling:
- ceilings: the 8192^3 bf16 matmul, the 2 GiB device copy;
- bare: ``x @ W^T``, ``G @ W``, ``G^T @ x`` with a random G of the logits' shape (cuBLAS; the 6 N H V floor);
- forward: ``linear_cross_entropy_forward`` (logit tiles, online statistics, combine) per schedule;
- dlogits: one vocabulary chunk of the recompute per schedule (its own chunk width), and x chunks;
- dW chunk: G^T X for a chunk of the "tma" width, Triton (pointer, tensor descriptors) and cuBLAS;
- dX chunk: G @ W[chunk] added into the running sum, Triton pointer with the fp32 sum, Triton descriptors with the
  compensated bf16 pair, cuBLAS ``addmm(out_dtype=fp32)`` where torch has it (and cuBLAS into bf16, lossy);
- step: forward + backward of ``fusedloss.linear_cross_entropy`` under "pointer", "tma", each feature of "tma"
  alone on top of "pointer" (``LinearCrossEntropySchedule``: which change helps), and with
  ``accumulate_in_input_dtype=True``, with the peak memory beyond inputs and gradients as a share of the bf16
  logits.
Writes ``phases.json`` and ``phases.md`` to ``--out`` (default ``$OUT`` or ``.``); one failing phase is recorded
and the others still run.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU, in Triton's interpreter")
    args = parser.parse_args()
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, which fixes the mode at decoration
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    Phases(dry=args.dry).run(args.out)


class Phases:
    def __init__(self, dry):
        import torch

        from benchutil import l2_flush

        self.torch, self.dry = torch, dry
        self.device = torch.device("cpu" if dry else "cuda")
        # the interpreter computes bf16 tl.dot wrongly: the dry run checks the plumbing in fp16
        self.dtype = torch.float16 if dry else torch.bfloat16
        self.n, self.h, self.v = (64, 32, 1000) if dry else (8192, 4096, 128256)
        self.flush = l2_flush(self.device)
        self.rows = []
        self.ceiling_tflops = None

    # -- measurement ---------------------------------------------------------------------------------------------

    def time_ms(self, fn):
        from benchutil import event_times_ms

        fn()  # compiles
        if self.dry:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        fn()
        self.torch.cuda.synchronize()
        return statistics.median(event_times_ms(fn, 10, self.flush))

    def record(self, phase, name, ms, flops=None, times=1, **extra):
        row = dict(phase=phase, name=name, ms=ms, times=times, total_ms=ms * times, **extra)
        if flops:
            row["tflops"] = flops / (ms * 1e9)
            if self.ceiling_tflops:
                row["of_ceiling"] = row["tflops"] / self.ceiling_tflops
        self.rows.append(row)
        share = f"  {row['of_ceiling']:.0%} of the matmul ceiling" if "of_ceiling" in row else ""
        scaled = f"  x{times} = {ms * times:.2f} ms" if times != 1 else ""
        print(f"{phase:<9} {name:<58} {ms:9.3f} ms{scaled}{share}", flush=True)

    def run(self, out):
        torch = self.torch
        print(torch.__version__, __import__("triton").__version__,
              "cpu (dry)" if self.dry else torch.cuda.get_device_name(), flush=True)
        for phase in (self.ceilings, self.bare, self.forward, self.dlogits, self.gemms, self.steps):
            try:
                phase()
            except Exception as exc:  # one broken phase must not cost the others' device time
                print(f"{phase.__name__}: FAILED {type(exc).__name__}: {exc}", flush=True)
                self.rows.append(dict(phase=phase.__name__, name="FAILED", error=f"{type(exc).__name__}: {exc}"))
            if not self.dry:
                torch.cuda.empty_cache()
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "phases.json"), "w") as f:
            json.dump(dict(shape=[self.n, self.h, self.v], dtype=str(self.dtype), rows=self.rows), f, indent=1)
        with open(os.path.join(out, "phases.md"), "w") as f:
            f.write(self.markdown())

    def markdown(self):
        lines = [f"N = {self.n}, H = {self.h}, V = {self.v}, {str(self.dtype).replace('torch.', '')}", "",
                 "| phase | what | ms | x | total ms | TFLOP/s | of ceiling | notes |",
                 "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            notes = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                              if k not in ("phase", "name", "ms", "times", "total_ms", "tflops", "of_ceiling"))
            cells = [r["phase"], r["name"], _fmt(r.get("ms")), str(r.get("times", "")), _fmt(r.get("total_ms")),
                     _fmt(r.get("tflops")), f"{r['of_ceiling']:.0%}" if "of_ceiling" in r else "", notes]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    # -- inputs --------------------------------------------------------------------------------------------------

    def inputs(self):
        torch = self.torch
        gen = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(self.n, self.h, device=self.device, dtype=self.dtype, generator=gen)
        w = torch.randn(self.v, self.h, device=self.device, dtype=self.dtype, generator=gen) / self.h ** 0.5
        y = torch.randint(0, self.v, (self.n,), device=self.device, generator=gen)
        return x, w, y

    def config(self, x, w, schedule):
        """The kernels' configuration under the named schedule."""
        from fusedloss.kernels.linear_cross_entropy import config_for

        from fusedloss.losses.linear_cross_entropy import SCHEDULES

        s = SCHEDULES[schedule]
        return config_for(x, w, tma_loads=s.tma_loads, compact_workspace=s.compensated_dx,
                          skip_ignored=s.skip_ignored)

    # -- phases --------------------------------------------------------------------------------------------------

    def ceilings(self):
        from benchutil import measure_ceilings

        if self.dry:
            return
        ceilings = measure_ceilings(self.device)
        self.ceiling_tflops = ceilings["matmul_tflops"]
        self.rows.append(dict(phase="ceiling", name="bf16 matmul 8192^3", tflops=ceilings["matmul_tflops"]))
        self.rows.append(dict(phase="ceiling", name="device copy 2 GiB", copy_gbps=ceilings["copy_gbps"]))
        print(f"ceiling   matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, copy {ceilings['copy_gbps']:.0f} GB/s",
              flush=True)

    def bare(self):
        torch = self.torch
        x, w, _ = self.inputs()
        g = torch.randn(self.n, self.v, device=self.device, dtype=self.dtype) * 1e-3
        f2 = 2 * self.n * self.h * self.v
        self.record("bare", "x @ W^T (logits)", self.time_ms(lambda: x @ w.t()), f2)
        self.record("bare", "G @ W (dX)", self.time_ms(lambda: g @ w), f2)
        self.record("bare", "G^T @ x (dW)", self.time_ms(lambda: g.t() @ x), f2)
        self.record("bare", "all three (the 6 N H V floor)", self.time_ms(lambda: (x @ w.t(), g @ w, g.t() @ x)),
                    3 * f2)

    def forward(self):
        from fusedloss.kernels.cross_entropy_rows import ROW_STATE
        from fusedloss.kernels.linear_cross_entropy import linear_cross_entropy_forward

        torch = self.torch
        x, w, y = self.inputs()
        loss = torch.empty(self.n, device=self.device)
        state = torch.empty(self.n, ROW_STATE, device=self.device)
        kw = dict(ignore_index=-100, label_smoothing=0.0, focal_gamma=0.0, z_loss=0.0, softcap=None, shift=False,
                  input_precision=None)
        for schedule in ("pointer", "tma"):
            ms = self.time_ms(lambda tma=schedule == "tma": linear_cross_entropy_forward(
                x, w, None, y, loss, state, tma_loads=tma, skip_ignored=tma, **kw))
            self.record("forward", f"{schedule}: logit tiles + online statistics + combine", ms,
                        2 * self.n * self.h * self.v)

    def dlogits(self):
        from fusedloss.kernels.cross_entropy_rows import ROW_STATE
        from fusedloss.kernels.linear_cross_entropy import linear_cross_entropy_dlogits

        torch = self.torch
        x, w, y = self.inputs()
        state = torch.zeros(self.n, ROW_STATE, device=self.device)
        one = torch.ones((), device=self.device)
        for schedule in ("pointer", "tma"):
            cfg = self.config(x, w, schedule)
            width = min(cfg["chunk"], self.v)
            g = torch.empty(self.n, width, device=self.device, dtype=self.dtype)
            ms = self.time_ms(lambda g=g, tma=schedule == "tma": linear_cross_entropy_dlogits(
                x, w, None, y, state, one, None, g, None, 0, ignore_index=-100, label_smoothing=0.0, softcap=None,
                shift=False, input_precision=None, skip_ignored=tma, tma_loads=tma))
            self.record("dlogits", f"{schedule}: one chunk of {width} columns (recompute + G)", ms,
                        2 * self.n * self.h * width, times=-(-self.v // width))

    def gemms(self):
        from fusedloss.kernels._gemm import matmul
        from fusedloss.kernels.linear_cross_entropy import gemm_tile

        torch = self.torch
        x, w, _ = self.inputs()
        cfg = {s: self.config(x, w, s) for s in ("pointer", "tma")}
        width = min(cfg["tma"]["chunk"], self.v)
        chunks = -(-self.v // width)
        flops = 2 * self.n * self.h * width
        g = torch.randn(self.n, width, device=self.device, dtype=self.dtype) * 1e-3
        w_chunk = w[:width]
        dw = torch.empty(width, self.h, device=self.device, dtype=self.dtype)
        for schedule in ("pointer", "tma"):
            tile = gemm_tile(cfg[schedule], "gemm_dw")
            ms = self.time_ms(lambda tile=tile, programs=cfg[schedule]["programs"]: matmul(
                g.t(), x, dw, tile=tile, programs=programs))
            self.record("dW", f"Triton {schedule} {tile[:3]}: G^T X, K = N", ms, flops, times=chunks)
        self.record("dW", "cuBLAS torch.mm(G^T, X)", self.time_ms(lambda: torch.mm(g.t(), x, out=dw)), flops,
                    times=chunks)

        dx = torch.zeros(self.n, self.h, device=self.device, dtype=self.dtype)
        dx32 = torch.zeros(self.n, self.h, device=self.device)
        lo = torch.zeros(self.n, self.h, device=self.device, dtype=torch.bfloat16)
        tile = gemm_tile(cfg["pointer"], "gemm_dx")
        self.record("dX", f"Triton pointer {tile[:3]}: fp32 sum (8 N H bytes/chunk)", self.time_ms(
            lambda: matmul(g, w_chunk, dx32, acc=dx32, tile=tile)), flops, times=chunks)
        tile = gemm_tile(cfg["tma"], "gemm_dx")
        self.record("dX", f"Triton tma {tile[:3]}: compensated bf16 pair (8 N H bytes/chunk)", self.time_ms(
            lambda: matmul(g, w_chunk, dx, acc=dx, lo_in=lo, lo_out=lo, tile=tile, programs=cfg["tma"]["programs"])),
            flops, times=chunks)
        if "dtype" in torch.ops.aten.addmm.overloads() and not self.dry:
            self.record("dX", "cuBLAS addmm(out_dtype=fp32) into the fp32 sum", self.time_ms(
                lambda: torch.addmm(dx32, g, w_chunk, out_dtype=torch.float32, out=dx32)), flops, times=chunks)
        self.record("dX", "cuBLAS addmm into bf16 dX (lossy: a bf16 rounding per chunk)", self.time_ms(
            lambda: dx.addmm_(g, w_chunk)), flops, times=chunks)

    def steps(self):
        import fusedloss
        from fusedloss.losses.linear_cross_entropy import LinearCrossEntropySchedule

        torch = self.torch
        x, w, y = self.inputs()
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logits_bytes = self.n * self.v * x.element_size()
        grads_bytes = (xg.numel() + wg.numel()) * x.element_size()
        features = [f.name for f in dataclasses.fields(LinearCrossEntropySchedule) if f.type is bool]
        features.remove("chunked")
        runs = ([("chunked (the default for bf16 on CUDA)", "chunked", False),
                 ("chunked, 2 GiB logits chunk", LinearCrossEntropySchedule(chunked=True, workspace_bytes=2 << 30),
                  False),
                 ("chunked, accumulate_in_input_dtype=True", "chunked", True),
                 ("pointer", "pointer", False), ("tma", "tma", False)]
                + [(f"{f} alone", LinearCrossEntropySchedule(**{f: True}), False) for f in features])
        for name, schedule, fast in runs:

            def step(fast=fast, schedule=schedule):
                xg.grad = wg.grad = None
                fusedloss.linear_cross_entropy(xg, wg, y, accumulate_in_input_dtype=fast,
                                               schedule=schedule).backward()

            ms = self.time_ms(step)
            extra = {}
            if not self.dry:
                xg.grad = wg.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base - grads_bytes
                extra = dict(peak_extra_mb=peak / 2**20, of_logits=peak / logits_bytes)
            self.record("step", f"forward + backward, {name}", ms, 6 * self.n * self.h * self.v, **extra)
        bare = next((r for r in self.rows if r["name"].startswith("all three")), None)
        if bare:
            for r in self.rows:
                if r["phase"] == "step":
                    r["x_bare"] = r["ms"] / bare["ms"]
                    print(f"{r['name']}: {r['x_bare']:.2f}x the bare matmuls", flush=True)


def _fmt(value):
    return "" if value is None else f"{value:.3f}" if value < 100 else f"{value:.1f}"


if __name__ == "__main__":
    main()
