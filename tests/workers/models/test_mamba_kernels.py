"""Which implementation Mamba runs: recorded at load, chosen like transformers does.

No CUDA here, so the CUDA branch is exercised by monkeypatching transformers'
availability checks and the device, never by running a kernel.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.utils import import_utils

from workers.models import mamba
from workers.models.mamba import MambaFamily, bound_kernels, kernel_availability, select_kernels

BOTH = {"mamba_ssm": True, "causal_conv1d": True}
BOUND = {"mamba_ssm": True, "causal_conv1d": True}


def test_this_machine_runs_the_pytorch_path(tiny_loaded):
    loaded = tiny_loaded("mamba")
    assert loaded.info["mamba_kernels"] == {"selective_scan": "pytorch",
                                            "causal_conv1d": "pytorch"}
    assert loaded.info["mamba_cuda_kernels"] is False
    assert "mamba_kernel_warning" not in loaded.info
    # transformers agrees: the packages are unavailable and it bound its PyTorch code.
    assert kernel_availability() == {"mamba_ssm": False, "causal_conv1d": False}
    assert bound_kernels() == {"mamba_ssm": False, "causal_conv1d": False}


@pytest.mark.parametrize("device,available,bound,expected", [
    ("cuda", BOTH, BOUND, ("mamba_ssm", "causal_conv1d")),
    ("cpu", BOTH, BOUND, ("pytorch", "pytorch")),  # CUDA kernels never run on the CPU
    ("cuda", {"mamba_ssm": True, "causal_conv1d": False}, BOUND, ("mamba_ssm", "pytorch")),
    ("cuda", {"mamba_ssm": False, "causal_conv1d": True}, BOUND, ("pytorch", "causal_conv1d")),
    ("cuda", BOTH, {"mamba_ssm": False, "causal_conv1d": True}, ("pytorch", "causal_conv1d")),
    ("cuda", BOTH, {"mamba_ssm": None, "causal_conv1d": None}, ("mamba_ssm", "causal_conv1d")),
    ("cuda", {"mamba_ssm": False, "causal_conv1d": False}, BOUND, ("pytorch", "pytorch")),
])
def test_select_kernels(device, available, bound, expected):
    kernels = select_kernels(device, available, bound)
    assert (kernels["selective_scan"], kernels["causal_conv1d"]) == expected


def fake_model(device: str) -> SimpleNamespace:
    """Just enough of a model for runtime_info: one parameter on ``device``."""
    return SimpleNamespace(parameters=lambda: iter([SimpleNamespace(
        device=torch.device(device))]))


def test_cuda_branch_uses_transformers_availability_checks(monkeypatch):
    monkeypatch.setattr(import_utils, "is_mamba_ssm_available", lambda: True)
    monkeypatch.setattr(import_utils, "is_causal_conv1d_available", lambda: True)
    monkeypatch.setattr(mamba, "bound_kernels", lambda: dict(BOUND))
    info = MambaFamily().runtime_info(fake_model("cuda"))
    assert info["mamba_kernels"] == {"selective_scan": "mamba_ssm",
                                     "causal_conv1d": "causal_conv1d"}
    assert info["mamba_cuda_kernels"] is True
    assert "mamba_kernel_warning" not in info

    monkeypatch.setattr(import_utils, "is_causal_conv1d_available", lambda: False)
    info = MambaFamily().runtime_info(fake_model("cuda"))
    assert info["mamba_kernels"]["causal_conv1d"] == "pytorch"
    assert info["mamba_cuda_kernels"] is False


def test_kernels_bound_but_model_on_cpu_is_flagged(monkeypatch):
    monkeypatch.setattr(import_utils, "is_mamba_ssm_available", lambda: False)
    monkeypatch.setattr(import_utils, "is_causal_conv1d_available", lambda: False)
    monkeypatch.setattr(mamba, "bound_kernels",
                        lambda: {"mamba_ssm": True, "causal_conv1d": False})
    info = MambaFamily().runtime_info(fake_model("cpu"))
    assert info["mamba_kernels"] == {"selective_scan": "pytorch", "causal_conv1d": "pytorch"}
    assert "mamba_ssm" in info["mamba_kernel_warning"]
    assert "cpu" in info["mamba_kernel_warning"]
