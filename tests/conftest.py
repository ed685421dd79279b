import os

import pytest
import torch

# Triton kernels run on CPU tensors in Triton's interpreter, which must be on when triton is
# first imported (its library functions are jitted then). On CUDA machines the kernels are
# compiled instead and the `gpu` tests cover them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import skip_gpu_tests_without_cuda


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests_without_cuda(items)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
