"""Render a pytest-benchmark JSON of bench/ as a markdown report and a PNG plot; compare two runs.

    python bench/report.py RESULTS.json [--markdown OUT.md] [--plot OUT.png] [--compare OTHER.json]

The report says what was measured where (device, fusedloss backend, versions, timer) and what the numbers mean on
that machine. On a GPU it leads with speed (against eager, the peers and the ceilings measured in the same run);
on CPU, where fusedloss runs its torch backend, with what is meaningful there: peak memory against eager and
correctness. ``--compare`` checks a rerun against this run: does each configuration's time agree within the
spread that each run states, as measured and after the machine's drift between the two runs is divided out?

Also reads the JSON of the earlier harness (wall clock, one repeat, no versions), saying so in the header.
"""

import argparse
import json
import math
import os
from collections import defaultdict
from statistics import median

# Stable colours and order, one per provider, in every panel and every report.
PROVIDERS = {
    "fusedloss": "#1f77b4",
    "fusedloss-single_read": "#aec7e8",
    "fusedloss-fixed_shift": "#393b79",
    "fusedloss-tma": "#aec7e8",
    "fusedloss-fast": "#c5b0d5",
    "eager": "#7f7f7f",
    "torch.compile": "#9467bd",
    "liger": "#2ca02c",
    "liger_fp32": "#98df8a",
    "cce": "#ff7f0e",
    "cce_exact": "#ffbb78",
    "inf_cl": "#8c564b",
    "matmul": "#17becf",
}
# Benchmark functions (``test_<panel>``) in the order of the report, the performance targets first, and their titles.
PANELS = {
    "cross_entropy": "cross-entropy",
    "linear_cross_entropy": "linear cross-entropy",
    "clip": "CLIP",
    "nt_xent": "NT-Xent",
    "siglip": "SigLIP",
    "retrieval": "retrieval InfoNCE",
    "distillation": "distillation KL",
    "pointwise": "pointwise losses",
    "binary": "binary losses",
    "triplet_margin_loss": "triplet margin",
    "batch_hard": "batch-hard triplet",
    "clip_largest_batch": "largest CLIP batch",
    "siglip_largest_batch": "largest SigLIP batch",
}
# The test suite's tolerances (relative norm error against fp64), by dtype.
TOLERANCE = {"float64": 1e-10, "float32": 5e-5, "float16": 1e-2, "bfloat16": 2e-2}
OLD_TIMER = "wall-clock, earlier harness"
QUIET = 0.05  # a CPU configuration timed while other processes took less than this share of it


# ---------------------------------------------------------------------------------------------------------------
# Loading: one record per configuration, its repeats combined


def load(path):
    """(run, configurations): ``run`` describes the machine and harness; each configuration combines the rows of
    its repeats (``ms`` = mean of the repeats' medians)."""
    with open(path) as f:
        data = json.load(f)
    machine = data.get("machine_info", {})
    rows = [_row(bench) for bench in data["benchmarks"]]
    configs = defaultdict(list)
    for r in rows:
        configs[(r["panel"], r["family"], r["shape"], r["config"], r["mode"], r["provider"])].append(r)
    combined = [_combine(group) for group in configs.values()]
    old = not any(r["timer"] != OLD_TIMER for r in rows)
    ceilings = _ceilings(rows)
    device_type = machine.get("device_type") or ("cpu" if _first(rows, "device") in (None, "cpu") else "cuda")
    run = {
        "path": path,
        "device": machine.get("device") or _first(rows, "device") or "unknown device",
        "device_type": device_type,
        "backend": machine.get("fusedloss_backend") or _first([r for r in rows if r["provider"] == "fusedloss"],
                                                               "backend"),
        "date": data.get("datetime", "")[:10],
        "commit": data.get("commit_info", {}),
        "versions": {k: machine.get(k) for k in ("torch", "triton", "cuda")} if not old else _old_versions(path),
        "threads": machine.get("torch_threads"),
        "peers": machine.get("peers"),
        "ceilings": ceilings if device_type == "cuda" else None,
        "old": old,
        "skipped": data.get("skipped", []),
        "not_run": data.get("not_run", []),
    }
    return run, combined


def _row(bench):
    info = dict(bench.get("extra_info", {}))
    stats = bench["stats"]
    timer = info.get("timer", OLD_TIMER)
    ms = info.get("ms", info.get("median_ms", stats["median"] * 1e3))
    return {
        **info,
        "panel": bench["name"].split("[")[0].removeprefix("test_"),
        "family": info.get("family", bench["name"].split("[")[0].removeprefix("test_")),
        "shape": info.get("shape", ""), "config": info.get("config", ""), "mode": info.get("mode", ""),
        "provider": info.get("provider", ""),
        "timer": timer, "ms": ms, "iqr_ms": info.get("iqr_ms", stats["iqr"] * 1e3),
        "wall_ms": info.get("wall_ms", stats["median"] * 1e3), "rounds": stats["rounds"],
        "repeat": info.get("repeat", 1),
    }


def _combine(rows):
    rows = sorted(rows, key=lambda r: r["repeat"])
    out = dict(rows[0])
    medians = [r["ms"] for r in rows]
    out["ms"] = sum(medians) / len(medians)
    out["repeats"] = medians
    out["wall_ms"] = sum(r["wall_ms"] for r in rows) / len(rows)
    # spread: the larger of the repeats' difference and each repeat's dispersion, relative to the time; dispersion
    # is the interquartile range for a median, and how far the median lies above the fastest round for a minimum
    out["spread"] = max([(max(medians) - min(medians)) / out["ms"]] + [_dispersion(r) for r in rows])
    waits = [r["runqueue_wait_frac"] for r in rows if r.get("runqueue_wait_frac") is not None]
    out["runqueue_wait_frac"] = max(waits) if waits else None
    for key in ("peak_mem_mb", "max_rel_error", "error_note"):
        out[key] = next((r[key] for r in rows if r.get(key) is not None), None)
    return out


def _dispersion(row):
    if row.get("statistic") == "min":
        return (row["median_ms"] - row["ms"]) / row["ms"]
    return row["iqr_ms"] / row["ms"]


def _first(rows, key):
    return next((r[key] for r in rows if r.get(key)), None)


def _ceilings(rows):
    """Every row carries the ceilings of its session (one session per file): their range over the run."""
    copy = [r["copy_gbps_ceiling"] for r in rows if r.get("copy_gbps_ceiling")]
    mm = [r["matmul_tflops_ceiling"] for r in rows if r.get("matmul_tflops_ceiling")]
    if not copy:
        return None
    return {"copy_gbps": min(copy), "copy_gbps_max": max(copy), "matmul_tflops": min(mm), "matmul_tflops_max": max(mm),
            "matmul_dtype": "bfloat16"}


def _old_versions(path):
    """The earlier harness did not record versions; gpu_check.sh wrote them next to the JSON (``STEM.gpu.txt``)."""
    sidecar = os.path.splitext(path)[0] + ".gpu.txt"
    if os.path.exists(sidecar):
        with open(sidecar) as f:
            for line in f:
                words = line.split()
                if words[:1] == ["torch"] and "triton" in words:
                    return {"torch": words[1], "triton": words[words.index("triton") + 1], "cuda": None}
    return {"torch": None, "triton": None, "cuda": None}


# ---------------------------------------------------------------------------------------------------------------
# Derived numbers


def _problem(c):
    return (c["panel"], c["family"], c["shape"], c["config"], c["mode"])


def derive(run, configs):
    """Throughput, fraction of the ceiling (GPU), speed-ups and the linear cross-entropy ratios, per configuration."""
    by_problem = defaultdict(dict)
    for c in configs:
        by_problem[_problem(c)][c["provider"]] = c
    for c in configs:
        peers = by_problem[_problem(c)]
        c["gbps"] = c["bytes"] / c["ms"] / 1e6 if c.get("bytes") else None
        c["tflops"] = c["flops"] / c["ms"] / 1e9 if c.get("flops") else None
        c["frac"] = None
        if run["ceilings"]:  # against the ceilings of the row's own session
            c["frac"] = (c["gbps"] / c["copy_gbps_ceiling"] if c["gbps"] else
                         c["tflops"] / c["matmul_tflops_ceiling"] if c["tflops"] else None)
        c["vs_eager"] = peers["eager"]["ms"] / c["ms"] if "eager" in peers else None
        c["x_matmul"] = c["ms"] / peers["matmul"]["ms"] if "matmul" in peers and c["provider"] != "matmul" else None
        c["frac_logits"] = (c["peak_mem_mb"] / c["logits_mb"] if c.get("logits_mb") and c.get("peak_mem_mb")
                            is not None else None)
    return by_problem


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def _ms(v):
    if v is None:
        return ""
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def _x(v):
    return "" if v is None else f"{v:.3g}x"


def _mb(v):
    if v is None:
        return ""
    return f"{v / 1024:.1f} GB" if v >= 1024 else f"{v:.0f} MB" if v >= 10 else f"{v:.1f} MB"


def _pct(v):
    """A fraction of a measured ceiling; above 100% it is marked (the header explains why it can happen)."""
    return "" if v is None else f"{100 * v:.0f}%" + ("*" if v > 1 else "")


def _err(c):
    if c.get("max_rel_error") is None:
        return c.get("error_note") or ""
    tol = TOLERANCE.get(c.get("dtype"))
    mark = "" if tol is None or c["max_rel_error"] <= tol else " (above tolerance)"
    return f"{c['max_rel_error']:.1e}{mark}"


def _spread(c):
    return f"{100 * c['spread']:.0f}%" + ("" if len(c["repeats"]) > 1 else " (1 run)")


def _contention(configs):
    """A line on how much of the CPU timings other processes took (their runqueue wait), when it matters."""
    waits = sorted(c["runqueue_wait_frac"] for c in configs if c.get("runqueue_wait_frac") is not None)
    if not waits or waits[-1] < 0.05:
        return []
    return [f"- **This machine was busy**: other processes kept the benchmark waiting for a CPU during "
            f"{100 * median(waits):.0f}% of the timed rounds' time (median over configurations; up to "
            f"{100 * waits[-1]:.0f}%), and slowed it while running too (shared caches, memory bandwidth). The times "
            "of such a run are not reproducible; peak memory and errors do not depend on it."]


def header(run, configs):
    gpu = run["device_type"] == "cuda"
    v = run["versions"]
    commit = run["commit"]
    commit_text = (f", commit {commit['id'][:10]}{' + local changes' if commit.get('dirty') else ''}"
                   if all(ch in "0123456789abcdef" for ch in commit.get("id") or "-") else "")
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "cuda") if v.get(k)) or \
        "torch / triton versions not recorded"
    lines = [f"# fusedloss benchmarks: {run['device']}", "",
             f"{run['date']}{commit_text}; {versions}; fusedloss backend **{run['backend']}**"
             + (f"; {run['threads']} CPU thread(s)" if not gpu and run["threads"] else "") + ".", ""]
    if run["peers"]:
        lines += ["Peers installed: " + ", ".join(f"{k} {ver or 'no'}" for k, ver in run["peers"].items()) + ".", ""]
    lines += ["## What the numbers mean", ""]
    if gpu:
        ceil = run["ceilings"] or {}
        copy = _range(ceil, "copy_gbps", ".0f")
        mm = _range(ceil, "matmul_tflops", ".0f")
        if run["old"]:
            lines.append("- **Time**: measured by the earlier harness: wall clock around one call and "
                         "`torch.cuda.synchronize()`, median of its rounds, no L2 flush, one run per configuration "
                         "(so `spread` is the interquartile range of the rounds only).")
        else:
            lines.append("- **Time** (ms): CUDA events around each call, the L2 flushed (256 MB written) before it; "
                         "median of the rounds, mean of two runs of each configuration minutes apart. `wall ms`: "
                         "the wall clock of call + synchronize, flushed likewise (adds launch and sync latency). "
                         "`spread`: the larger of the two runs' difference and each run's interquartile range, "
                         "relative to the time.")
        lines.append(f"- **Ceilings** measured in the same run: device copy {copy} GB/s (bytes read + bytes written, "
                     f"2 GiB `copy_`), bf16 matmul {mm} TFLOP/s (8192^3, random data). `% of ceiling` divides the "
                     "work each benchmark file states (minimal bytes, or the matmuls' FLOPs) by the time and by the "
                     "matching ceiling.")
        if any((c.get("frac") or 0) > 1 for c in configs):
            lines.append("- `*` above 100%: a forward that only reads counts only bytes read, and reading alone runs "
                         "faster than a copy's read + write; a bare matmul of another shape can beat the 8192^3 one.")
    else:
        backend = run["backend"]
        what = ("plain PyTorch with the same formulas, chunked where the point of a loss is memory"
                if backend == "torch" else
                "the Triton kernels in Triton's interpreter, a correctness mode, far from any speed")
        lines += [f"- **CPU run**: fusedloss ran its `{backend}` backend ({what}); the Triton kernels were not "
                  "compiled, so the times compare two PyTorch programs on this CPU and say nothing about GPU speed. "
                  "Meaningful here: **peak memory** against eager and the **error** column. GPU ceilings (copy "
                  "bandwidth, matmul rate) are not shown: they do not apply.",
                  *_contention(configs),
                  "- **Time** (ms): wall clock per call, the fastest of the rounds (other processes on the machine "
                  "only add time), mean of two runs of each configuration minutes apart; `spread`: the larger of the "
                  "two runs' difference and, in each run, how far the median round lies above the fastest, relative "
                  "to the time. `report.py A.json --compare B.json` checks that a rerun agrees within it (also "
                  "after dividing out the machine's drift between the runs: on a shared CPU a whole run can be ~20% "
                  "slower than another)."]
    lines += ["- **peak memory**: the most memory allocated at any moment of one call beyond what was allocated "
              "before it (inputs, weights) and beyond the gradients the step leaves in `.grad` (a gradient written "
              "over its input allocates nothing): what the loss costs on top of what any implementation holds. "
              + ("GPU: the allocator's peak counter." if gpu else
                 "CPU: the allocation events of `torch.profiler` (`profile_memory=True`), summed in time order."),
              "- `vs eager`: eager's time / this time (above 1: faster than eager)."]
    if run["old"]:
        return lines + ["- The earlier harness measured peak memory as the peak during a call minus what was "
                        "allocated before it, the previous call's gradients included, which the call frees first "
                        "(`x.grad = None`): the same quantity. Its `peak_beyond_grads_frac_logits` subtracted the "
                        "gradients a second time (hence negative values) and is not used; `peak / logits` below is "
                        "computed from the peak.", "- **error**: not measured by the earlier harness.", ""]
    return lines + ["- **error**: the largest relative norm error ||ours - ref|| / ||ref|| of the loss and each "
                    "gradient against eager PyTorch on fp64 copies of the same inputs (forward + backward rows); the "
                    "test suite's tolerances: fp32 5e-5, bf16 2e-2.", ""]


def _range(ceil, key, spec):
    lo, hi = ceil.get(key), ceil.get(key + "_max")
    if lo is None:
        return "?"
    return format(lo, spec) if hi is None or format(hi, spec) == format(lo, spec) else \
        f"{format(lo, spec)}-{format(hi, spec)}"


def glance(run, by_problem):
    """Forward + backward, one line per problem: fusedloss against eager and the peers."""
    gpu = run["device_type"] == "cuda"
    if gpu:
        lines = ["## At a glance: forward + backward", "",
                 "Speed-up = the other's time / fusedloss's time (above 1: fusedloss is faster).", "",
                 "| problem | fusedloss | % of ceiling | vs eager | vs the others | peak memory: fusedloss / eager "
                 "| error |", "|---|---:|---:|---:|---|---:|---:|"]
    else:
        lines = ["## At a glance: forward + backward on CPU", "",
                 "Peak memory beyond inputs and gradients; time on the torch backend (not the GPU kernels).", "",
                 "| problem | peak: fusedloss | peak: eager | fusedloss / eager | error | time: fusedloss | "
                 "time: eager | spread |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    families = defaultdict(set)
    for key in by_problem:
        families[key[0]].add(key[1])
    for key in sorted(by_problem, key=_problem_order):
        p = by_problem[key]
        if key[4] != "fwd_bwd" or "fusedloss" not in p or p["fusedloss"].get("probe"):
            continue
        ours, eager = p["fusedloss"], p.get("eager")
        name = f"{PANELS.get(key[0], key[0])}: {_label(key, with_family=len(families[key[0]]) > 1)}"
        eager_peak = eager.get("peak_mem_mb") if eager else None
        if gpu:
            others = ", ".join(f"{'bare matmuls' if prov == 'matmul' else prov} {_x(c['ms'] / ours['ms'])}"
                               for prov, c in _ordered(p) if prov not in ("fusedloss", "eager"))
            absent = _missing(run, key, "eager") or "not measured"
            lines.append(f"| {name} | {_ms(ours['ms'])} ms | {_pct(ours['frac'])} | {_x(ours['vs_eager']) or absent} | "
                         f"{others} | {_mb(ours.get('peak_mem_mb'))} / {_mb(eager_peak) or absent} | {_err(ours)} |")
        else:
            ratio = ("" if eager_peak is None or ours.get("peak_mem_mb") is None else
                     "eager ~0" if eager_peak < 0.1 else _x(ours["peak_mem_mb"] / eager_peak))
            lines.append(f"| {name} | {_mb(ours.get('peak_mem_mb'))} | {_mb(eager_peak)} | {ratio} | "
                         f"{_err(ours)} | {_ms(ours['ms'])} ms | {_ms(eager['ms']) + ' ms' if eager else ''} | "
                         f"{_spread(ours)} |")
    return lines + [""]


def _missing(run, key, provider):
    """'out of memory' when that provider's run of this problem was skipped for it."""
    for s in run["skipped"]:
        if (s.get("provider"), s.get("family"), s.get("shape"), s.get("config"), s.get("mode")) == (provider, *key[1:]):
            return "out of memory"
    return ""


def _ordered(providers):
    return sorted(providers.items(), key=lambda kv: list(PROVIDERS).index(kv[0]) if kv[0] in PROVIDERS else 99)


def _shape_key(shape):
    return [int(p) for p in shape.split("x") if p.isdigit()]


def _problem_order(key):
    return (list(PANELS).index(key[0]) if key[0] in PANELS else len(PANELS), key[0], key[1], _shape_key(key[2]),
            key[3], key[4])


def _label(key, sep=" ", with_family=False):
    """A problem's name: the family (where a panel holds several), the shape (2^k for powers of two), the config."""
    shape = key[2]
    if shape.isdigit() and int(shape) > 1024 and int(shape) & (int(shape) - 1) == 0:
        shape = f"2^{int(shape).bit_length() - 1}"
    family = key[1] if with_family else ""
    return sep.join(p for p in (f"{family} {shape}".strip(), key[3]) if p)


def linear_ce(run, by_problem):
    """The linear cross-entropy target: time against the bare matmuls, memory against the logits."""
    keys = [k for k in sorted(by_problem, key=_problem_order) if k[1] == "linear_cross_entropy"]
    if not keys:
        return []
    lines = ["## Linear cross-entropy: against the bare matmuls and the logits", "",
             "`x matmuls`: time / the bare matmuls' time at this shape (targets for fusedloss, forward + backward, "
             "on a GPU: <= 1.45x exact, <= 1.2x `fusedloss-fast`; the floor of an exact method without the logits is "
             "1.33x, its backward recomputing them). `peak / logits`: peak memory beyond inputs and gradients / the "
             "logits' size in the input dtype (target: <= 5%).", "",
             "| shape | config | mode | provider | ms | x matmuls | TFLOP/s (counted) | peak memory | peak / logits "
             "| error |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        for prov, c in _ordered(by_problem[k]):
            tflops = "" if c["tflops"] is None or not run["ceilings"] else f"{c['tflops']:.0f}"
            of_logits = "" if c["frac_logits"] is None else f"{100 * c['frac_logits']:.1f}%"
            lines.append(f"| {k[2]} | {k[3]} | {k[4]} | {prov} | {_ms(c['ms'])} | {_x(c['x_matmul'])} | {tflops} | "
                         f"{_mb(c.get('peak_mem_mb'))} | {of_logits} | {_err(c)} |")
    return lines + [""]


def largest_batch(run, configs):
    probes = [c for c in configs if c.get("probe")]
    if not probes:
        return []
    peak = "peak memory at N" + (" (with the gradients: earlier harness)" if run["old"] else "")
    lines = ["## Largest contrastive batch (forward + backward), probed within a time bound", "",
             f"| loss | features | provider | largest N that ran | s per step at N | {peak} | points (N: s) |",
             "|---|---|---|---:|---:|---:|---|"]
    for c in probes:
        last = c["probe"][-1]
        peak = last.get("peak_mem_mb", last.get("peak_mb"))
        points = ", ".join(f"{p['n']}: {p['seconds']:.2f}" for p in c["probe"])
        loss = PANELS.get(c["panel"], c["panel"]).removeprefix("largest ").removesuffix(" batch")
        lines.append(f"| {loss} | {c.get('config', '')} {c.get('dtype', '')} | {c['provider']} | {c['largest_n']} | "
                     f"{last['seconds']:.2f} | {_mb(peak)} | {points} |")
    return lines + ["", "The probe stops when the next size's predicted time would exceed its budget "
                    f"({probes[0].get('probe_budget_s')} s) or at the first out-of-memory error; nothing is "
                    "extrapolated.", ""]


def providers(configs):
    """How each provider was called (the rows' ``settings``)."""
    settings = defaultdict(set)
    for c in configs:
        if c.get("settings"):
            settings[c["provider"]].add(c["settings"])
    if not settings:
        return []
    return ["## Providers, as called", ""] + [f"- {p}: " + "; ".join(f"`{s}`" for s in sorted(settings[p]))
                                              for p in PROVIDERS if p in settings] + [""]


def full_table(run, configs):
    gpu = run["device_type"] == "cuda"
    cols = ["family", "shape", "config", "mode", "provider", "backend", "dtype", "ms", "spread"]
    cols += ["wall ms", "GB/s", "TFLOP/s", "% of ceiling"] if gpu else []
    cols += ["peak memory", "vs eager", "error"]
    lines = ["## All measurements", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if c in ("ms", "spread", "wall ms", "GB/s", "TFLOP/s", "% of ceiling",
                                            "peak memory", "vs eager", "error") else "---" for c in cols) + "|"]
    for c in sorted((c for c in configs if not c.get("probe")),
                    key=lambda c: (_problem_order(_problem(c)), list(PROVIDERS).index(c["provider"])
                                   if c["provider"] in PROVIDERS else 99)):
        cells = [c["family"], c["shape"], c["config"], c["mode"], c["provider"],
                 c.get("backend") if c["provider"] == "fusedloss" else "", c.get("dtype", ""), _ms(c["ms"]),
                 _spread(c)]
        if gpu:
            cells += [_ms(c["wall_ms"]) if not run["old"] else "", "" if c["gbps"] is None else f"{c['gbps']:.0f}",
                      "" if c["tflops"] is None else f"{c['tflops']:.1f}", _pct(c["frac"])]
        cells += [_mb(c.get("peak_mem_mb")), _x(c["vs_eager"]), _err(c)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def not_measured(run):
    """What was skipped and why, grouped by reason (the rows that the quick CPU sizes never define left out)."""
    reasons = defaultdict(list)
    for s in run["skipped"]:
        if "no such size" in s["reason"] or "is not run" in s["reason"]:
            continue
        reasons[s["reason"]].append(s["name"])
    if not reasons and not run["not_run"]:
        return []
    lines = ["## Not measured", ""]
    if run["not_run"]:
        lines.append(f"- the time limit came first: {', '.join(run['not_run'])}")
    for reason, names in sorted(reasons.items()):
        shown = ", ".join(f"`{n}`" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"- {reason}: {shown}")
    return lines + [""]


def markdown(run, configs):
    by_problem = derive(run, configs)
    lines = header(run, configs) + glance(run, by_problem) + linear_ce(run, by_problem) + largest_batch(run, configs)
    return "\n".join(lines + providers(configs) + full_table(run, configs) + not_measured(run))


# ---------------------------------------------------------------------------------------------------------------
# Plot


def plot(run, configs, path):
    """Forward + backward, one row of panels per benchmark file, one group of bars per problem, one bar per
    provider (fixed colours). GPU columns: time / eager's (log), % of the measured ceiling, peak memory (log);
    CPU columns: peak memory first, then time / eager's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_problem = derive(run, configs)
    gpu = run["device_type"] == "cuda"
    panels = defaultdict(list)  # panel -> problems (fwd_bwd)
    for key in sorted(by_problem, key=_problem_order):
        if key[4] == "fwd_bwd" and "fusedloss" in by_problem[key] and not by_problem[key]["fusedloss"].get("probe"):
            panels[key[0]].append(key)
    if not panels:
        return
    columns = ([("time", "time ÷ fusedloss's: lower is better"),
                ("frac", "% of measured ceiling: higher is better"),
                ("mem", "peak memory: lower is better")] if gpu else
               [("mem", "peak memory: lower is better"),
                ("time", f"time ÷ fusedloss's ({run['backend']} backend): lower is better")])
    heights = [sum(len(by_problem[k]) + 0.6 for k in keys) + 1.5 for keys in panels.values()]
    fig, axes = plt.subplots(len(panels), len(columns), figsize=(6.5 * len(columns), 0.2 * sum(heights) + 2.2),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for row_axes, (panel, keys) in zip(axes, panels.items()):
        for ax, (metric, title) in zip(row_axes, columns):
            _bars(ax, run, [(k, by_problem[k]) for k in keys], metric, len({k[1] for k in keys}) > 1)
            ax.set_title(f"{PANELS.get(panel, panel)}: {title}", fontsize=10, loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for color in PROVIDERS.values()]
    present = {c["provider"] for c in configs}
    fig.legend([h for h, p in zip(handles, PROVIDERS) if p in present], [p for p in PROVIDERS if p in present],
               loc="upper center", ncol=len(present), fontsize=10, frameon=False, bbox_to_anchor=(0.5, 1 - 0.75 /
                                                                                                  fig.get_figheight()))
    what = ("GPU, fusedloss on its Triton kernels" + ("; times: the earlier harness (wall clock, no L2 flush)"
                                                      if run["old"] else "") if gpu else
            f"CPU, fusedloss on its {run['backend']} backend: memory is the meaningful comparison here")
    fig.suptitle(f"fusedloss, forward + backward: {run['device']}, {run['date']}\n{what}", fontsize=13,
                 y=1 - 0.1 / fig.get_figheight())
    fig.tight_layout(rect=(0, 0, 1, 1 - 1.1 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, run, problems, metric, several_families):
    """One group of horizontal bars per problem, top to bottom, each bar labelled with its value. Time: each
    provider's time / fusedloss's (fusedloss is the dashed line at 1, its time in the group's label)."""
    import matplotlib.ticker

    y, ticks, labels, shown_values = 0.0, [], [], []
    for key, providers in problems:
        ours = providers["fusedloss"]
        start = y
        for prov, c in _ordered(providers):
            if metric == "time":
                if prov == "fusedloss":
                    continue
                value, text = c["ms"] / ours["ms"], f"{_x(c['ms'] / ours['ms'])} ({_ms(c['ms'])} ms)"
            elif metric == "frac":
                value, text = c["frac"], _pct(c["frac"])
            else:
                value, text = c.get("peak_mem_mb"), _mb(c.get("peak_mem_mb"))
            if value is not None:
                shown = max(value, 0.01) if metric == "mem" else value
                shown_values.append(shown)
                left = 1.0 if metric == "time" else 0.0  # time: bars grow from fusedloss's line, left if faster
                ax.barh(-y, shown - left, left=left, height=0.8, color=PROVIDERS.get(prov, "#000000"))
                ax.text(shown, -y, f" {text} ", va="center", fontsize=7.5,
                        ha="left" if shown >= left else "right")
            y += 1
        if "eager" not in providers:
            ax.text(0, -y, f" eager: {_missing(run, key, 'eager') or 'not measured'}", va="center", fontsize=7.5,
                    color=PROVIDERS["eager"], transform=ax.get_yaxis_transform())
            y += 1
        ticks.append(-(start + y - 1) / 2)
        label = _label(key, "\n", several_families)
        labels.append(label + (f" · {_ms(ours['ms'])} ms" if metric == "time" else ""))
        y += 0.6
    ax.set_ylim(-(y - 1.6) - 0.7, 0.7)  # y - 1.6: the last slot (each group ends with a 0.6 gap)
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=8.5)
    ax.tick_params(axis="x", labelsize=8.5)
    if metric in ("time", "mem"):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if metric == "time":
        ax.axvline(1.0, color=PROVIDERS["fusedloss"], linestyle="--", linewidth=1.2)
        ax.set_xlabel("log scale; dashed line: fusedloss; a bar left of it: faster than fusedloss", fontsize=8.5)
    elif metric == "mem":
        ax.set_xlabel("MB beyond inputs and gradients, log scale (< 0.01 MB drawn at 0.01)", fontsize=8.5)
    else:
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.xaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
    lo, hi = ax.get_xlim()  # room on both sides for the labels
    if metric == "mem" and shown_values:  # log bars start a decade below the smallest, so lengths compare fairly
        lo = 10 ** (math.floor(math.log10(min(shown_values))) - 1)
    ax.set_xlim(lo / (6 if metric == "time" else 1), hi * (6 if ax.get_xscale() == "log" else 1.25))


# ---------------------------------------------------------------------------------------------------------------
# Rerun agreement


def compare(path_a, path_b):
    """Each configuration's time in two runs: do they agree within the larger of the two stated spreads? Also after
    dividing out the machine's drift between the runs, the median ratio over all configurations: a shared CPU can
    run a whole run 19% slower than an hour earlier (seen on this project's 2-core machines), which no
    spread measured within one run can state."""
    a, b = load(path_a)[1], load(path_b)[1]
    b = {(_problem(c), c["provider"]): c for c in b}
    pairs = [(c, b[(_problem(c), c["provider"])]) for c in sorted(a, key=lambda c: (_problem_order(_problem(c)),
                                                                                   c["provider"]))
             if (_problem(c), c["provider"]) in b and not c.get("probe")]
    if not pairs:
        return f"No configuration of {path_a} was measured in {path_b}\n"
    drift = median([math.log(other["ms"] / c["ms"]) for c, other in pairs])
    lines = [f"Rerun agreement: {path_a} (A) against {path_b} (B)", "",
             f"Machine drift, B / A, the median over configurations: {math.exp(drift):.3f}.", "",
             "| problem | provider | ms A | ms B | difference | after drift | stated spread | CPU wait | agrees | "
             "after drift |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    counts = {"agree": 0, "agree_drift": 0, "quiet": 0, "quiet_agree": 0}
    for c, other in pairs:
        diff = abs(c["ms"] - other["ms"]) / min(c["ms"], other["ms"])
        diff_drift = math.exp(abs(math.log(other["ms"] / c["ms"]) - drift)) - 1
        spread = max(c["spread"], other["spread"])
        wait = max(c.get("runqueue_wait_frac") or 0, other.get("runqueue_wait_frac") or 0)
        counts["agree"] += diff <= spread
        counts["agree_drift"] += diff_drift <= spread
        if wait < QUIET:
            counts["quiet"] += 1
            counts["quiet_agree"] += diff <= spread
        lines.append(f"| {c['family']} {c['shape']} {c['config']} {c['mode']} | {c['provider']} | {_ms(c['ms'])} | "
                     f"{_ms(other['ms'])} | {100 * diff:.1f}% | {100 * diff_drift:.1f}% | {100 * spread:.1f}% | "
                     f"{100 * wait:.0f}% | {'yes' if diff <= spread else 'NO'} | "
                     f"{'yes' if diff_drift <= spread else 'NO'} |")
    lines += ["", f"{counts['agree']} of {len(pairs)} configurations agree within the stated spread "
              f"({counts['agree_drift']} after the machine's drift is divided out); of those timed while no other "
              f"process took the CPU (runqueue wait < {100 * QUIET:.0f}% in both runs), {counts['quiet_agree']} of "
              f"{counts['quiet']}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--markdown", help="write the report here (default: print it)")
    parser.add_argument("--plot", help="write the PNG plot here")
    parser.add_argument("--compare", metavar="OTHER", help="print the rerun agreement of RESULTS against OTHER")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(args.results, args.compare))
        return
    run, configs = load(args.results)
    text = markdown(run, configs)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    else:
        print(text)
    if args.plot:
        plot(run, configs, args.plot)


if __name__ == "__main__":
    main()
