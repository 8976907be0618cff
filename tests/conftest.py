"""Shared test configuration: devices, dtypes, tolerances, and small input factories.

CPU tests always run. The ``gpu`` mark is set only by tests/test_cuda_parity.py, and only where a
GPU is visible (without one the same suite runs on the CPU emulator), so that tests/gpu_check.sh
selects the GPU suite with ``-m gpu``.
"""

import warnings

import pytest
import torch

#: Tolerances of the reference engine against independent float64 implementations.
FP64_TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test: on shared cores, more threads spin and run many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_inputs(B, C, D, *, dtype=torch.float64, norm_range=(20.0, 90.0), ignored=(), seed=0):
    """Random embeddings with magnitudes in ``norm_range``, a unit-row-norm-free weight
    (rows of varied norm, to exercise r_j), and labels with the given rows ignored (-1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    lo, hi = norm_range
    mags = lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * mags.unsqueeze(1)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * (0.5 + torch.rand(C, 1, generator=g, dtype=torch.float64))
    y = torch.randint(0, C, (B,), generator=g)
    for i in ignored:
        y[i] = -1
    return x.to(dtype), w.to(dtype), y


def quiet_magface(**kw):
    """Build a MagFace-family module without the lambda_g warning (tests that lower lambda_g on purpose)."""
    import magloss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return magloss.MagFaceLoss(**kw)
