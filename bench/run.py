"""The main job: run the benchmark suite and render its report.

    python bench/run.py [--quick] [--out DIR] [-k EXPR] [--file-timeout SECONDS] [FILE ...]

Each ``bench/bench_*.py`` file runs in its own pytest process with its own JSON, so a file that runs out of
time (``--file-timeout``) or crashes costs only its own results; the JSONs are then merged into
DIR/results.json and rendered as DIR/results.md (the table) and DIR/results.png (the plot). Without a CUDA
device the suite runs at --quick CPU sizes. DIR defaults to bench/out.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# The issues' performance targets first, so a time limit cuts the least important files.
ORDER = ["bench_cross_entropy.py", "bench_linear_cross_entropy.py", "bench_contrastive.py"]


def bench_files(names):
    files = [os.path.join(HERE, n) for n in names] if names else sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    return sorted(files, key=lambda f: (ORDER.index(os.path.basename(f)) if os.path.basename(f) in ORDER
                                        else len(ORDER), f))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="bench_*.py files (default: all)")
    parser.add_argument("--quick", action="store_true", help="small CPU sizes even on a GPU machine")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("-k", dest="select", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--file-timeout", type=float, default=None, help="seconds per benchmark file")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    merged = None
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in bench_files(args.files):
            part = os.path.join(tmp, os.path.basename(path) + ".json")
            cmd = [sys.executable, "-m", "pytest", path, "-q", "-rs", "-p", "no:cacheprovider",
                   f"--benchmark-json={part}", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
            if args.quick:
                cmd.append("--quick")
            if args.select:
                cmd += ["-k", args.select]
            try:
                code = subprocess.call(cmd, cwd=os.path.dirname(HERE), timeout=args.file_timeout)
            except subprocess.TimeoutExpired:
                print(f"{os.path.basename(path)}: stopped after {args.file_timeout} s; its results are lost")
                code = 1
            status = status or (code if code != 5 else 0)  # 5: nothing selected in this file
            if os.path.exists(part):
                with open(part) as f:
                    data = json.load(f)
                if merged is None:
                    merged = data
                else:
                    merged["benchmarks"] += data["benchmarks"]
    if merged is None:
        print("no benchmark results")
        return status or 1
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
