"""The main job: run the benchmark suite and render its report.

    python bench/run.py [--quick] [--out DIR] [-k EXPR]

Without a CUDA device the suite runs at --quick CPU sizes. Writes DIR/results.json (pytest-benchmark),
DIR/results.md (the table) and DIR/results.png (the plot); DIR defaults to bench/out.
"""

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU sizes even on a GPU machine")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("-k", dest="select", help="pytest -k expression selecting benchmarks")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "results.json")
    cmd = [sys.executable, "-m", "pytest", HERE, "-q", "-rs", "-p", "no:cacheprovider", f"--benchmark-json={results}",
           "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    if args.quick:
        cmd.append("--quick")
    if args.select:
        cmd += ["-k", args.select]
    status = subprocess.call(cmd, cwd=os.path.dirname(HERE))
    if not os.path.exists(results):
        return status or 1
    subprocess.check_call([sys.executable, os.path.join(HERE, "report.py"), results,
                           "--markdown", os.path.join(args.out, "results.md"),
                           "--plot", os.path.join(args.out, "results.png")])
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    return status


if __name__ == "__main__":
    sys.exit(main())
