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


@pytest.fixture
def assert_fifo_euler_update():
    """Check shared by the flow-matching FIFO families: with one partition and no lookahead, the
    queue's update of every level k is the Euler step that plain sampling
    (FlowMatchEulerDiscreteScheduler) makes from sigma_{k+1} to sigma_k with the model's velocity."""

    def check(fifo, st, lv, emb):
        from diffusers import FlowMatchEulerDiscreteScheduler

        sig = lv.sigma
        with torch.no_grad():
            new = fifo.step(st, lv, emb, None, 1.0).queue
            v = fifo._model(st.queue, lv.t_model[1:], emb, None, 1.0)
        for k in range(fifo.L):
            sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
            sched.set_timesteps(sigmas=[float(sig[k + 1]), float(sig[k])] if k > 0 else [float(sig[1])])
            ref = sched.step(v[:, :, k], sched.timesteps[0], st.queue[:, :, k], return_dict=False)[0]
            torch.testing.assert_close(new[:, :, k], ref, atol=1e-5, rtol=1e-5)

    return check
