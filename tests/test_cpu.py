"""specdec.cpu: MKL's reproducibility mode is set on AMD CPUs only, never over the user's own value."""

import os

import pytest
import torch

from specdec.cpu import cpu_vendor, tune_cpu_blas


def cpuinfo(tmp_path, vendor: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 25\nmodel name\t: some CPU\n")
    return path


@pytest.fixture
def unset(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)


def test_amd_gets_auto(tmp_path, unset):
    assert cpu_vendor(cpuinfo(tmp_path, "AuthenticAMD")) == "AuthenticAMD"
    assert tune_cpu_blas(cpuinfo(tmp_path, "AuthenticAMD")) == "AUTO"
    assert os.environ["MKL_CBWR"] == "AUTO"


def test_intel_and_unknown_are_left_alone(tmp_path, unset):
    assert tune_cpu_blas(cpuinfo(tmp_path, "GenuineIntel")) is None
    assert cpu_vendor(tmp_path / "missing") is None
    assert tune_cpu_blas(tmp_path / "missing") is None
    assert "MKL_CBWR" not in os.environ


def test_users_value_and_builds_without_mkl_are_kept(tmp_path, unset, monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert tune_cpu_blas(cpuinfo(tmp_path, "AuthenticAMD")) is None
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
    monkeypatch.delenv("MKL_CBWR")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    assert tune_cpu_blas(cpuinfo(tmp_path, "AuthenticAMD")) is None
    assert "MKL_CBWR" not in os.environ
