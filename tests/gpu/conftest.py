"""tests/gpu: the CUDA ops against their torch twins; every test here is skipped without a CUDA device."""

import pytest
import torch


def pytest_runtest_setup(item):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
