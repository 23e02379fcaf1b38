"""A CPU setting that decides whether speculation pays on AMD processors.

Verifying a tree multiplies a few rows (2-32 tokens) by every weight matrix. torch's CPU BLAS, Intel's MKL,
runs such small-row fp32 matmuls on AMD processors through a code path that does not use the second core:
on a 2-core AMD EPYC (AVX2) an `F.linear` of 2 rows by the 49152 x 576 LM head takes twice one row, and a
forward of the real target over 8 tokens cost 2.4x one token (measured: 1/2/4/8/16/32 tokens = 91/121/161/
220/257/347 ms, fp32, 300 cached tokens, median of 5). With MKL's conditional numerical reproducibility mode on
(`MKL_CBWR=AUTO`: MKL picks the code path for this CPU's instruction set) the same forwards take 85/86/111/
130/164/241 ms: one token costs the same, a tree far less. MKL reads the variable at its first call, so it
has to be set before the process multiplies anything. bf16 matmuls go through oneDNN and are not affected.

`tune_cpu_blas()` sets it on AMD processors when the user has not set it; the harness and the demo call it
at startup. Library users on AMD CPUs: `export MKL_CBWR=AUTO`, or call it first thing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's vendor id (`AuthenticAMD`, `GenuineIntel`), or None where Linux's cpuinfo is not readable."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def tune_cpu_blas(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """Set `MKL_CBWR=AUTO` on an AMD CPU when torch uses MKL and the variable is unset.

    Returns the value set, or None when nothing changed (another vendor, no MKL, the user's own value).
    Takes effect only if MKL has not run yet in this process.
    """
    if "MKL_CBWR" in os.environ or not torch.backends.mkl.is_available():
        return None
    if cpu_vendor(cpuinfo) != "AuthenticAMD":
        return None
    os.environ["MKL_CBWR"] = "AUTO"
    return "AUTO"
