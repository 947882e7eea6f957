"""Reset seed and default dtype after each loss test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _reset_state():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
