"""Compile every kernel variant the launchers can produce, for sm_80 and sm_90, without a GPU.

Each module of ``fusedloss.kernels`` that defines ``compile_variants()`` calls its own launchers on small CPU
tensors over every combination of its constexpr flags; here ``JITFunction.run`` is replaced by a recorder, so
the launchers run their real argument and flag logic but launch nothing. Each distinct (kernel, signature,
constexprs, options) is then compiled with ``triton.compile`` for a ``GPUTarget`` and its cubin read with the
``cuobjdump`` that Triton bundles: registers, local memory and stack frame, local loads/stores (LDL/STL: spills)
in the SASS, shared memory, and how many ``HGMMA`` (wgmma) and ``UTMALDG`` (tensor-descriptor loads by the bulk
tensor copy engine) instructions the SASS holds on sm_90.

    python bench/compile_report.py [--arch 80 90] [--cubin-dir DIR] [--jobs N] [--only SUBSTRING]

Exits non-zero when a variant fails to compile or spills (LOCAL > 0 or any LDL/STL in its SASS).
"""

import argparse
import concurrent.futures
import contextlib
import importlib
import os
import pkgutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels only; the interpreter would bypass JITFunction.run
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


@contextlib.contextmanager
def record_launches():
    """Within the block, ``kernel[grid](...)`` records (kernel, args, kwargs) instead of launching."""
    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def collect_variants(only=None):
    """{key: (module name, kernel, args, kwargs)} for every distinct launch of every kernels module."""
    import fusedloss.kernels as kernels_pkg

    variants = {}
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"fusedloss.kernels.{info.name}")
        if not hasattr(module, "compile_variants"):
            continue
        with record_launches() as launches:
            module.compile_variants()
        for kernel, args, kwargs in launches:
            key = (info.name, kernel.__name__, _describe(kernel, args, kwargs))
            if only and only not in f"{info.name}.{kernel.__name__}":
                continue
            variants.setdefault(key, (info.name, kernel, args, kwargs))
    return variants


def _describe(kernel, args, kwargs):
    """A hashable description of a launch: what Triton specializes on. Tensors by dtype; runtime ints by the
    specializations Triton makes (== 1, divisible by 16); keyword arguments (constexprs and options such as
    num_warps) by value, so block-size variants stay distinct."""
    parts = [_type_of(value) for value in args]
    parts += [f"{name}={value!r}" for name, value in sorted(kwargs.items())]
    return ",".join(parts)


def _type_of(value):
    if isinstance(value, torch.Tensor):
        return f"*{value.dtype}"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return "1" if value == 1 else "i16" if value % 16 == 0 else "i"
    if isinstance(value, float):
        return "fp"
    return repr(value)


def compile_one(kernel, args, kwargs, arch):
    """Compile one recorded launch for sm_<arch>; returns the CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def cuobjdump():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin_path):
    """(registers, stack bytes, shared bytes, local bytes) from ``cuobjdump -res-usage``."""
    out = subprocess.run([cuobjdump(), "-res-usage", cubin_path], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
            return int(fields["REG"]), int(fields["STACK"]), int(fields["SHARED"]), int(fields["LOCAL"])
    raise RuntimeError(f"no resource usage in cuobjdump output:\n{out}")


def sass_counts(cubin_path):
    """(HGMMA instructions, UTMALDG instructions, local-memory loads/stores LDL/STL) in the SASS. ptxas may report
    a spill as stack frame rather than LOCAL in -res-usage, so the SASS is the spill test: any LDL/STL is
    local-memory traffic."""
    out = subprocess.run([cuobjdump(), "-sass", cubin_path], capture_output=True, text=True, check=True).stdout
    hgmma = tma = local = 0
    for line in out.splitlines():
        hgmma += "HGMMA" in line
        tma += "UTMALDG" in line
        local += " LDL" in line or " STL" in line
    return hgmma, tma, local


_ITEMS = []  # filled before the pool forks; workers receive indices (kernels do not pickle)


def _job(position):
    index, (module, kernel, args, kwargs), arch, cubin_dir = _ITEMS[position]
    name = f"{module}.{kernel.__name__}"
    flags = {k: v for k, v in kwargs.items() if k.isupper()}
    dtypes = sorted({str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)
                     and a.is_floating_point()})
    row = {"kernel": name, "arch": arch, "flags": flags, "num_warps": kwargs.get("num_warps"),
           "dtypes": dtypes}
    try:
        compiled = compile_one(kernel, args, kwargs, arch)
    except Exception as exc:  # a compile failure is a result to report, not a crash of the report
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return row
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        row["regs"], row["stack"], row["shared"], row["local"] = resource_usage(path)
        row["hgmma"], row["utmaldg"], row["ldl_stl"] = sass_counts(path)
    row["shared"] = max(row["shared"], compiled.metadata.shared)
    if cubin_dir:
        # The first variant of each kernel is its default flags; the rest get an index suffix.
        suffix = "" if index == 0 else f".v{index}"
        with open(os.path.join(cubin_dir, f"{name}-sm{arch}{suffix}.cubin"), "wb") as f:
            f.write(compiled.asm["cubin"])
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--cubin-dir", help="write each variant's cubin as DIR/<module>.<kernel>-sm<arch>.cubin")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", help="compile only kernels whose module.kernel name contains this")
    args = parser.parse_args(argv)
    if args.cubin_dir:
        os.makedirs(args.cubin_dir, exist_ok=True)

    variants = collect_variants(args.only)
    per_kernel = {}
    items = _ITEMS
    for key, variant in variants.items():
        index = per_kernel.setdefault(key[:2], [])
        index.append(key)
        for arch in args.arch:
            if variant[3].get("TMA") and arch < 90:
                continue  # tensor-descriptor variants launch on sm_90 and later only (kernels._gemm.tma_compatible)
            items.append((len(index) - 1, variant, arch, args.cubin_dir))
    print(f"{len(variants)} variants x {len(args.arch)} archs = {len(items)} compiles", flush=True)
    ctx = __import__("multiprocessing").get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        rows = list(pool.map(_job, range(len(items))))

    failures = 0
    header = (f"{'kernel':<42} {'arch':>4} {'warps':>5} {'regs':>4} {'local':>5} {'stack':>5} {'ldl/stl':>7} "
              f"{'shared':>6} {'hgmma':>5} {'utma':>4}  flags")
    print(header)
    print("-" * len(header))
    for row in sorted(rows, key=lambda r: (r["kernel"], r["arch"], str(r["flags"]))):
        flags = " ".join(f"{k}={v}" for k, v in row["flags"].items() if v not in (False, None)) + \
            f" {'/'.join(row['dtypes'])}"
        if "error" in row:
            failures += 1
            print(f"{row['kernel']:<42} {row['arch']:>4} COMPILE FAILED: {row['error']}  [{flags}]")
            continue
        spill = row["local"] > 0 or row["ldl_stl"] > 0
        failures += spill
        print(f"{row['kernel']:<42} {row['arch']:>4} {row['num_warps']!s:>5} {row['regs']:>4} {row['local']:>5} "
              f"{row['stack']:>5} {row['ldl_stl']:>7} {row['shared']:>6} {row['hgmma']:>5} {row['utmaldg']:>4}  {flags}"
              f"{'  <-- SPILLS' if spill else ''}")
    print(f"\n{len(rows)} compiles, {failures} failed or spilled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
