import os


def gpu_tier_requested() -> bool:
    """LONGVIDEO_TEST_GPU set (and not "0"): run the GPU tier with the kernels compiled."""
    return os.environ.get("LONGVIDEO_TEST_GPU", "") not in ("", "0")


# The Triton kernels run on CPU through the interpreter; the flag must be set before any
# kernel module is imported (Triton reads it when the kernels are decorated). On a machine with
# a GPU, LONGVIDEO_TEST_GPU=1 runs the kernels compiled instead.
if not gpu_tier_requested():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

NO_CUDA_REASON = "needs a CUDA device"
GPU_TIER_UNSET_REASON = ("set LONGVIDEO_TEST_GPU=1 to run the GPU tier compiled "
                         "(without it TRITON_INTERPRET=1 is set)")


def gpu_skip_reason():
    """Why the `gpu`-marked tests are skipped in this process, or None when they run.

    Without CUDA: skipped. With CUDA but without LONGVIDEO_TEST_GPU: also skipped, with a reason that
    says so, since this conftest then set TRITON_INTERPRET=1 and the "GPU" tests would run the Triton
    interpreter at real shapes (hours) instead of the compiled kernels."""
    if not torch.cuda.is_available():
        return NO_CUDA_REASON
    if not gpu_tier_requested():
        return GPU_TIER_UNSET_REASON
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    if gpu_skip_reason() == GPU_TIER_UNSET_REASON:
        return [f"WARNING: CUDA is available but LONGVIDEO_TEST_GPU is unset: gpu-marked tests are skipped; "
                f"{GPU_TIER_UNSET_REASON}"]
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if gpu_skip_reason() == GPU_TIER_UNSET_REASON:
        terminalreporter.write_sep("=", "GPU tier not run", yellow=True)
        terminalreporter.write_line(f"CUDA is available but gpu-marked tests were skipped: {GPU_TIER_UNSET_REASON}")


@pytest.fixture
def require_backend():
    """require_backend(op, name): the backend must be available. In the GPU tier
    (LONGVIDEO_TEST_GPU=1) an unavailable backend (e.g. the CUDA extension did not build) is a
    FAILURE, never a skip; elsewhere it skips with the reason."""
    from longvideo.ops import get_backend

    def check(op, name):
        be = get_backend(op, name)
        ok, why = be.is_available()
        if not ok:
            msg = f"{op}: backend {name!r} unavailable: {why}"
            if gpu_tier_requested():
                pytest.fail(msg + " (LONGVIDEO_TEST_GPU=1: every backend must be available)", pytrace=False)
            pytest.skip(msg)
        return be

    return check


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
