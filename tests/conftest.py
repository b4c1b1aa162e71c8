"""Shared test set-up: Triton's interpreter without a GPU; interpreter tests skipped without it."""

import os
from collections.abc import Iterator

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is first imported: lets the kernels run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import interpreted  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interpreter = pytest.mark.skip(
        reason="runs Triton kernels on CPU tensors under TRITON_INTERPRET=1: on a CUDA machine "
        "the gpu tests run them compiled (CUDA_VISIBLE_DEVICES= runs these)"
    )
    interpreter = interpreted()
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        # a gpu case of a test whose triton case is marked runs on CUDA tensors: compiled
        elif "interpreter" in item.keywords and "gpu" not in item.keywords and not interpreter:
            item.add_marker(skip_interpreter)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Compile from empty dynamo caches and leave none behind: graphs cached by earlier tests
    would not be counted (or compiled), and a test's graphs would reach later tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
