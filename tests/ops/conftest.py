"""Fixtures of the per-op tests: the backend under test, and how Triton runs for it."""

import importlib.util

import pytest

from flgengine.ops import native
from flgengine.ops.triton import _common


@pytest.fixture
def interpreter(monkeypatch):
    """Triton kernels on CPU tensors, in Triton's interpreter. TRITON_INTERPRET=1 only for the
    test: the backend decides compiled vs interpreted per call (flgengine/ops/triton/_common.py),
    so nothing depends on when the kernel modules were first imported."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FLG_BACKEND", raising=False)
    if importlib.util.find_spec("triton") is not None and _common.import_error() is None and _common.interpreter_reason():
        # tests/conftest.py turns the interpreter on for the test run only on machines without
        # CUDA; where CUDA is present triton is imported compiled and the gpu tests run the kernels
        pytest.skip("triton runs compiled in this test run (CUDA machine): the gpu tests cover the kernels")


@pytest.fixture
def compiled(monkeypatch):
    """Triton kernels compiled (CUDA tensors)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FLG_BACKEND", raising=False)


@pytest.fixture
def backend(request):
    """The backend under test on CPU tensors (indirect parametrisation): "cpu" (the C++ ops)
    or "triton" (under the interpreter, as the `interpreter` fixture)."""
    if request.param == "triton":
        request.getfixturevalue("interpreter")
    return request.param


@pytest.fixture
def gpu_backend(request):
    """The backend under test on CUDA tensors (indirect parametrisation): "cuda" (the CUDA ops
    in flgengine._C) or "triton" (compiled, as the `compiled` fixture)."""
    if request.param == "triton":
        request.getfixturevalue("compiled")
    elif not native.build_info()["cuda"]:
        pytest.skip("flgengine._C built without CUDA")
    return request.param
