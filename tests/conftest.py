import os

# The Triton kernels run on CPU through the interpreter; the flag must be set before any
# kernel module is imported (Triton reads it when the kernels are decorated). On a machine with
# a GPU, LONGVIDEO_TEST_GPU=1 runs the kernels compiled instead.
if not os.environ.get("LONGVIDEO_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
