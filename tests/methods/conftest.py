"""Fixtures of the methods' tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One thread: the methods' results do not depend on it, and the tests run side by side with others."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
