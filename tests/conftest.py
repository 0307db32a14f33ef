"""Shared test settings."""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """Tiny models run faster on one thread (and far faster on a shared, busy CPU); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
