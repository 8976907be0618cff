"""Shared test fixtures (seed, one thread). The cases, factories and tolerances are tests/cases.py's.

CPU tests always run. The ``gpu`` mark is set only by tests/test_cuda_parity.py, and only where a
GPU is visible (without one the same suite runs on the CPU emulator), so that tests/gpu_check.sh
selects the GPU suite with ``-m gpu``.
"""

import pytest
import torch


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
