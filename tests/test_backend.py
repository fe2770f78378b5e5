"""Backend choice: per call, from the device and the environment."""

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
