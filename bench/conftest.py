import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import skip_gpu_tests_without_cuda  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests_without_cuda(items)
