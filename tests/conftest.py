"""Fixtures shared by the whole suite."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny matmuls: one thread is faster, and 2 OpenMP threads on a busy 2-core machine are ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
