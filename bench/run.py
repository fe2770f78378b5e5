"""The main job: run the benchmark suite and render its report.

    python bench/run.py [--quick] [--out DIR] [-k EXPR] [--deadline SECONDS] [--file-timeout SECONDS] [FILE ...]

Each ``bench/bench_*.py`` file runs in its own pytest process with its own JSON, so a file that runs out of time
or crashes costs only its own results; the JSONs are merged into DIR/results.json and rendered as DIR/results.md
(the report) and DIR/results.png (the plot). Files run in order of importance (the performance targets first), so
a time limit cuts the least important: ``--deadline`` bounds the whole run, ``--file-timeout`` each file; a file
still running at its limit is interrupted (SIGINT), and pytest-benchmark still writes what it measured. Without a
CUDA device the suite runs at --quick CPU sizes. DIR defaults to bench/out.
"""

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["bench_cross_entropy.py", "bench_linear_cross_entropy.py", "bench_log_probs.py", "bench_contrastive.py",
         "bench_distillation.py", "bench_pointwise.py", "bench_binary.py", "bench_triplet.py", "bench_largest_batch.py"]
GRACE_S = 30  # after SIGINT: time for pytest to finish the current measurement and write its JSON
# glibc's malloc moves its mmap and trim thresholds as a process runs, so the same CPU benchmark allocates from warm
# heap pages in one process and from fresh (page-faulting) mmaps in another: up to 8x apart. Fixed thresholds
# (mmap above 32 MiB, its maximum; never trim the heap) make reruns agree. No effect on GPU memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def bench_files(names):
    files = [os.path.join(HERE, os.path.basename(n)) for n in names] if names else \
        glob.glob(os.path.join(HERE, "bench_*.py"))
    return sorted(files, key=lambda f: (ORDER.index(os.path.basename(f)) if os.path.basename(f) in ORDER
                                        else len(ORDER), f))


def run_file(cmd, limit):
    """Run one pytest process; at ``limit`` seconds interrupt it, then kill it after the grace period. Returns its
    exit status, or -SIGINT when interrupted."""
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(HERE), env={**MALLOC_ENV, **os.environ})
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"{os.path.basename(cmd[3])}: interrupted after {limit:.0f} s; keeping what it measured", flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return -signal.SIGINT


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="bench_*.py files (default: all)")
    parser.add_argument("--quick", action="store_true", help="small CPU sizes even on a GPU machine")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("-k", dest="select", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--file-timeout", type=float, default=None, help="seconds per benchmark file")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    end = time.monotonic() + (args.deadline or float("inf"))
    merged, not_run = None, []
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in bench_files(args.files):
            left = end - time.monotonic() - GRACE_S
            if left <= 0:
                print(f"{os.path.basename(path)}: not run (deadline)", flush=True)
                not_run.append(os.path.basename(path))
                continue
            part = os.path.join(tmp, os.path.basename(path) + ".json")
            cmd = [sys.executable, "-m", "pytest", path, "-q", "-rs", "-p", "no:cacheprovider",
                   f"--benchmark-json={part}", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
            cmd += ["--quick"] if args.quick else []
            cmd += ["-k", args.select] if args.select else []
            code = run_file(cmd, min(left, args.file_timeout or float("inf")))
            if code == -signal.SIGINT:
                not_run.append(f"{os.path.basename(path)} (interrupted: what it finished is kept)")
            status = status or (code if code != 5 else 0)  # 5: nothing selected in this file
            if os.path.exists(part):
                with open(part) as f:
                    data = json.load(f)
                if merged is None:
                    merged = data
                else:
                    merged["benchmarks"] += data["benchmarks"]
                    merged["skipped"] = merged.get("skipped", []) + data.get("skipped", [])
    if merged is None:
        print("no benchmark results")
        return status or 1
    merged["not_run"] = not_run  # the report names them
    results = os.path.join(args.out, "results.json")
    with open(results, "w") as f:
        json.dump(merged, f, indent=1)
    subprocess.check_call([sys.executable, os.path.join(HERE, "report.py"), results,
                           "--markdown", os.path.join(args.out, "results.md"),
                           "--plot", os.path.join(args.out, "results.png")])
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    return status


if __name__ == "__main__":
    sys.exit(main())
