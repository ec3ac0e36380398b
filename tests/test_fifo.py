"""FIFO-Diffusion on the tiny Wan pipeline: per-frame updates, queue bookkeeping, resume, CLI."""
import numpy as np
import pytest
import torch

from longvideo.methods.fifo import FIFODiffusion, QueueState
from longvideo.models.wan import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _state(fifo, gen):
    C, h, w = 4, 4, 4
    return QueueState(queue=torch.randn(1, C, fifo.L, h, w, generator=gen),
                      context=torch.randn(1, C, fifo.f // 2, h, w, generator=gen), prev_latent=None,
                      iteration=0, frames_out=0, rng_state=gen.get_state())


@pytest.mark.parametrize("lookahead,n,f", [(False, 1, 4), (False, 2, 4), (True, 2, 4), (True, 3, 6)])
def test_every_slot_moves_exactly_one_level(pipe, lookahead, n, f):
    """With a constant velocity v = 1 each slot k must move by exactly sigma_k - sigma_{k+1}, once."""
    fifo = FIFODiffusion(pipe, num_partitions=n, frames_per_window=f, lookahead=lookahead)
    calls = []
    fifo._velocity = lambda x, sig, *a: calls.append(sig.clone()) or torch.ones_like(x)
    sig = fifo.sigmas("cpu")
    assert sig[0] == 0 and torch.all(sig[1:] > sig[:-1]) and sig.numel() == n * f + 1
    st = _state(fifo, torch.Generator().manual_seed(0))
    new = fifo.step(st, sig, None, None, 1.0)
    expected = st.queue + (sig[:-1] - sig[1:]).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(new, expected, atol=1e-6, rtol=0)
    assert len(calls) == (2 * n if lookahead else n)
    if lookahead:  # every window sees f/2 cleaner frames before the ones it writes
        for c in calls:
            assert torch.all(c[: f // 2] <= c[f // 2:].min())


def test_per_frame_update_matches_plain_sampling_step(pipe):
    """n = 1, no lookahead, a clip of exactly f frames: each frame's update is the Euler step that
    plain flow-matching sampling (FlowMatchEulerDiscreteScheduler) makes from its level to the next."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fifo = FIFODiffusion(pipe, num_partitions=1, frames_per_window=4, lookahead=False)
    gen = torch.Generator().manual_seed(1)
    st = _state(fifo, gen)
    emb = torch.randn(1, 16, pipe.transformer.config.text_dim, generator=gen)
    sig = fifo.sigmas("cpu")
    new = fifo.step(st, sig, emb, None, 1.0)
    v = fifo._velocity(st.queue, sig[1:], emb, None, 1.0)
    for k in range(fifo.L):
        sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
        sched.set_timesteps(sigmas=[float(sig[k + 1]), float(sig[k])] if k > 0 else [float(sig[1])])
        t = sched.timesteps[0]
        ref = sched.step(v[:, :, k], t, st.queue[:, :, k], return_dict=False)[0]
        torch.testing.assert_close(new[:, :, k], ref, atol=1e-5, rtol=1e-5)


def test_generate_streams_requested_frames(pipe):
    fifo = FIFODiffusion(pipe, num_partitions=2, frames_per_window=4)
    frames = list(fifo.generate("a cat", 9, guidance_scale=3.0, seed=0))
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3) and frames[0].dtype == np.uint8
    again = list(fifo.generate("a cat", 9, guidance_scale=3.0, seed=0))
    assert all(np.array_equal(a, b) for a, b in zip(frames, again))


def test_resume_equals_uninterrupted(pipe, tmp_path):
    fifo = FIFODiffusion(pipe, num_partitions=2, frames_per_window=4)
    full = list(fifo.generate("a dog", 14, guidance_scale=3.0, seed=3))
    first = list(fifo.generate("a dog", 14, guidance_scale=3.0, seed=3, checkpoint_dir=tmp_path,
                               checkpoint_every=2, stop_after_iterations=3))
    saved = torch.load(tmp_path / "fifo_state.pt", weights_only=True)
    assert saved["iteration"] == 2 and 0 < saved["frames_out"] < len(first)
    rest = list(fifo.generate("a dog", 14, guidance_scale=3.0, seed=3, checkpoint_dir=tmp_path, resume=True))
    resumed = first[: saved["frames_out"]] + rest
    assert len(resumed) == len(full)
    for a, b in zip(resumed, full):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments(pipe, tmp_path):
    with pytest.raises(ValueError, match="frames_per_window"):
        FIFODiffusion(pipe, frames_per_window=5)
    with pytest.raises(ValueError, match="num_partitions"):
        FIFODiffusion(pipe, num_partitions=0)
    fifo = FIFODiffusion(pipe, num_partitions=1, frames_per_window=4)
    with pytest.raises(ValueError, match="num_frames"):
        next(fifo.generate("x", 0))
    with pytest.raises(FileNotFoundError, match="resume"):
        next(fifo.generate("x", 4, checkpoint_dir=tmp_path, resume=True))


def test_cli_writes_video(tmp_path):
    from longvideo.cli import main
    from longvideo.video import read_video

    out = tmp_path / "fifo.mp4"
    assert main(["generate", "--method", "fifo", "--num-frames", "6", "--fifo-partitions", "1", "--fifo-window", "4",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert read_video(out).shape[0] == 6


def test_coherent_tail_is_lowfreq_mix_of_second_to_last(pipe):
    """Ouroboros part (a): the new tail is lowfreq_mix(second-to-last latent after the shift, fresh
    noise); everything else equals FIFO, whose tail is that fresh noise itself."""
    from longvideo.reference.lowfreq_mix import lowfreq_mix_reference

    states = {}
    for on in (False, True):
        fifo = FIFODiffusion(pipe, num_partitions=1, frames_per_window=4, coherent_tail=on)
        gen = fifo.generate("a cat", 8, guidance_scale=3.0, seed=5)
        next(gen)  # first frame out: one iteration done
        states[on] = gen.gi_frame.f_locals["state"]
    off, on = states[False].queue, states[True].queue
    torch.testing.assert_close(on[:, :, :-1], off[:, :, :-1], atol=0, rtol=0)
    eta = off[:, :, -1:]
    expected = lowfreq_mix_reference(on[:, :, -2:-1], eta, "gaussian", 0.25, 1.0, 4)
    torch.testing.assert_close(on[:, :, -1:], expected, atol=1e-5, rtol=1e-5)
    assert (on[:, :, -1:] - eta).abs().max() > 1e-3


def test_bench_quick_cases_run():
    import torch

    from longvideo.benchmarking import load_suite

    for case in load_suite("fifo").cases(torch.device("cpu"), quick=True):
        out = case.fn()
        assert out.shape[2] == case.params["f"] * case.params["n"] and torch.isfinite(out).all()


def _rank_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fifo = FIFODiffusion(tiny_pipeline(), num_partitions=2, frames_per_window=4)
        assert fifo._rank_world() == (rank, world)  # the windows really are split
        frames = list(fifo.generate("a dog", 6, guidance_scale=3.0, seed=7))
        np.save(f"{out_dir}/rank{rank}.npy", np.stack(frames))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(pipe, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free loopback port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = np.stack(list(FIFODiffusion(pipe, num_partitions=2, frames_per_window=4)
                           .generate("a dog", 6, guidance_scale=3.0, seed=7)))
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), single)


def test_multi_prompt_switches_at_the_start_frame(pipe):
    from longvideo.methods.fifo import PromptSchedule

    sched = PromptSchedule.parse([("a cat", 0), ("a dog", 9), ("a bird", 12)], 4)
    assert sched.latent_starts == [0, 3, 3]  # video frames 9 and 12 both fall in latent frame 3
    sched.embeds = ["cat", "dog", "bird"]
    assert [sched.at(i) for i in (0, 2, 3, 10)] == ["cat", "cat", "bird", "bird"]
    with pytest.raises(ValueError, match="start frames"):
        PromptSchedule.parse([("a", 1)])
    with pytest.raises(ValueError, match="pairs"):
        PromptSchedule.parse([])
    fifo = FIFODiffusion(pipe, num_partitions=2, frames_per_window=4)
    single = list(fifo.generate("a cat", 8, guidance_scale=3.0, seed=2))
    same = list(fifo.generate([("a cat", 0), ("a cat", 20)], 8, guidance_scale=3.0, seed=2))
    other = list(fifo.generate([("a cat", 0), ("a dog", 4)], 8, guidance_scale=3.0, seed=2))
    assert all(np.array_equal(a, b) for a, b in zip(single, same))
    assert any(not np.array_equal(a, b) for a, b in zip(single, other))
