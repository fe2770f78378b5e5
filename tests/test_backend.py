"""Backend choice: per call, from the device and the environment."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch
from fusedloss.kernels import _common

import fusedloss
from fusedloss import _backend


def test_cpu_backends(monkeypatch):
    interpreted = fusedloss.backend("cpu") == "triton-interpret"
    assert fusedloss.backend(torch.device("cpu")) in ("triton-interpret", "torch")
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "torch")
    assert fusedloss.backend("cpu") == "torch"
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "auto")
    assert (fusedloss.backend("cpu") == "triton-interpret") == interpreted


def test_unknown_forced_backend_raises(monkeypatch):
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FUSEDLOSS_BACKEND"):
        fusedloss.backend("cpu")


def test_fp64_matmul_families_fall_back_where_triton_cannot_compile_fp64_dot(monkeypatch):
    if fusedloss.backend("cpu") != "triton-interpret":
        pytest.skip("needs the kernels (interpreter) as the default CPU backend")
    assert _backend.matmul_backend("cpu", torch.float32) == "triton-interpret"
    monkeypatch.setattr(_common, "FP64_DOT_MIN_TRITON", (99, 0))
    assert _backend.matmul_backend("cpu", torch.float64) == "torch"
    assert _backend.matmul_backend("cpu", torch.float32) == "triton-interpret"
    monkeypatch.setattr(_common, "FP64_DOT_MIN_TRITON", (0, 0))
    assert _backend.matmul_backend("cpu", torch.float64) == "triton-interpret"


def test_bf16_matmul_families_leave_an_interpreter_whose_bf16_dot_is_wrong(monkeypatch):
    # the interpreter multiplied bf16 bit patterns in tl.dot (losses of 1e9-1e11): the probe decides, per process
    if fusedloss.backend("cpu") != "triton-interpret":
        pytest.skip("needs the kernels (interpreter) as the default CPU backend")
    exact = _common.interpreter_bf16_dot_exact()
    assert _backend.matmul_backend("cpu", torch.bfloat16) == ("triton-interpret" if exact else "torch")
    monkeypatch.setattr(_common, "interpreter_bf16_dot_exact", lambda: False)
    assert _backend.matmul_backend("cpu", torch.bfloat16) == "torch"
    assert _backend.matmul_backend("cpu", torch.float16) == "triton-interpret"
    monkeypatch.setattr(_common, "interpreter_bf16_dot_exact", lambda: True)
    assert _backend.matmul_backend("cpu", torch.bfloat16) == "triton-interpret"


def _import_fusedloss(code, cwd, **env):
    """Run ``code`` (which imports fusedloss) in a fresh interpreter; its (return code, stderr)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLOSS_BACKEND")}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**environ, **env}, capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stderr


def test_interpreter_without_numpy_is_an_import_error_that_says_so(tmp_path):
    code, err = _import_fusedloss("import sys; sys.modules['numpy'] = None; import fusedloss", tmp_path,
                                  TRITON_INTERPRET="1")
    assert code != 0 and "needs numpy" in err, err


def test_source_tree_without_the_kernels_names_them(monkeypatch):
    # importing from a checkout that was not installed: fusedloss/ is found, fusedloss.kernels (kernels/) is not
    # (an editable install maps it, so the subprocess form of this test could not see the failure here)
    pytest.importorskip("triton")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fusedloss.kernels"
                        else find_spec(name, *a))
    with pytest.raises(ImportError, match="fusedloss.kernels is missing"):
        _backend._load_kernels()


def test_host_and_kernels_from_two_trees_is_an_import_error(tmp_path):
    # a second checkout's host code on PYTHONPATH while the installed (editable) package maps fusedloss.kernels to
    # this checkout's kernels/: refused, naming both trees, instead of computing with mismatched halves
    pytest.importorskip("triton")
    host = os.path.dirname(os.path.abspath(fusedloss.__file__))
    if not os.path.isdir(os.path.join(os.path.dirname(host), "kernels")):
        pytest.skip("needs a checkout's editable install (kernels/ beside fusedloss/)")
    shutil.copytree(host, tmp_path / "fusedloss", ignore=shutil.ignore_patterns("__pycache__"))
    code, err = _import_fusedloss("import fusedloss", tmp_path, PYTHONPATH=str(tmp_path))
    assert code != 0 and "ImportError" in err and str(tmp_path) in err and os.path.dirname(host) in err, err


def test_top_level_kernels_name_is_left_to_its_owner():
    # Python puts the working directory on sys.path, and the repository root holds kernels/ (installed as
    # fusedloss.kernels): a top-level "import kernels" there must reach the distribution that owns the name
    # (Hugging Face's, which transformers imports), or fail as if the folder were not there
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code, err = _import_fusedloss(
        "import kernels, os; assert os.path.dirname(kernels.__file__) != os.path.join(os.getcwd(), 'kernels'); "
        "import fusedloss.kernels as k; assert k.__file__ != kernels.__file__ and hasattr(k, 'INTERPRETED')", root)
    assert code == 0 or "ModuleNotFoundError: No module named 'kernels' (the folder" in err, err


def test_concurrent_calls_from_threads(tier):
    # Triton's interpreter patches triton.language during a launch: launches from several threads take turns
    import concurrent.futures

    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(37, 50, generator=gen), torch.randint(0, 50, (37,), generator=gen)) for _ in range(4)]
    expected = [fusedloss.cross_entropy(x, t, label_smoothing=0.1) for x, t in inputs]

    def run(index):
        x, t = inputs[index % 4]
        return fusedloss.cross_entropy(x.to(tier.device), t.to(tier.device), label_smoothing=0.1)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(16)))
    for index, got in enumerate(results):
        assert torch.equal(got.cpu(), expected[index % 4]), index
