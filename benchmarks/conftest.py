"""The benchmarks' smoke tests set torch's thread count as their scripts do: each test gets it back after."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
