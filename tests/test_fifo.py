"""FIFO-Diffusion on the tiny Wan and AnimateDiff pipelines: per-frame updates vs the schedulers,
per-frame model calls vs the models' own calls, queue bookkeeping, streaming, resume, 2 ranks, CLI."""
import numpy as np
import pytest
import torch

from longvideo.methods.fifo import FIFODiffusion, PromptSchedule, QueueState
from longvideo.models import animatediff, wan


@pytest.fixture(scope="module")
def wan_pipe():
    return wan.tiny_pipeline()


@pytest.fixture(scope="module")
def ad_pipe():
    return animatediff.tiny_pipeline()


@pytest.fixture(params=["wan", "animatediff"])
def pipe(request, wan_pipe, ad_pipe):
    return wan_pipe if request.param == "wan" else ad_pipe


def _state(fifo, gen, hw=(4, 4)):
    C = 4
    return QueueState(queue=torch.randn(1, C, fifo.L, *hw, generator=gen),
                      context=torch.randn(1, C, fifo.context_len, *hw, generator=gen), decoder_state=None,
                      iteration=0, frames_out=0, rng_state=gen.get_state())


@pytest.mark.parametrize("lookahead,n,f", [(False, 1, 4), (False, 2, 3), (True, 2, 4), (True, 2, 3)])
def test_every_slot_moves_exactly_one_level(wan_pipe, lookahead, n, f):
    """With a constant velocity v = 1 each slot k must move by exactly sigma_k - sigma_{k+1}, once;
    with lookahead every window sees c cleaner frames before the frames it writes."""
    fifo = FIFODiffusion(wan_pipe, num_partitions=n, frames_per_window=f, lookahead=lookahead)
    calls = []
    fifo._model = lambda x, t, *a: calls.append(t.clone()) or torch.ones_like(x)
    sig = fifo.sigmas("cpu")
    assert sig[0] == 0 and torch.all(sig[1:] > sig[:-1]) and sig.numel() == fifo.L + 1
    st = _state(fifo, torch.Generator().manual_seed(0))
    new = fifo.step(st, fifo.levels("cpu"), None, None, 1.0).queue
    expected = st.queue + (sig[:-1] - sig[1:]).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(new, expected, atol=1e-6, rtol=0)
    assert len(calls) == (2 * n if lookahead else n) and all(c.numel() == f for c in calls)
    c = fifo.context_len
    for t in calls:
        assert torch.all(t[:c] <= t[c:].min()) if lookahead else True
        assert torch.all(t[1:] >= t[:-1])  # head cleanest within a window


def test_per_frame_update_matches_plain_sampling_wan(wan_pipe, assert_fifo_euler_update):
    """n = 1, no lookahead, a clip of exactly f frames: each frame's update is the Euler step that
    plain flow-matching sampling (FlowMatchEulerDiscreteScheduler) makes from its level to the
    next, with the velocity of the per-token-timestep model call."""
    fifo = FIFODiffusion(wan_pipe, num_partitions=1, frames_per_window=4, lookahead=False)
    gen = torch.Generator().manual_seed(1)
    st = _state(fifo, gen)
    emb = torch.randn(1, 16, wan_pipe.transformer.config.text_dim, generator=gen)
    assert_fifo_euler_update(fifo, st, fifo.levels("cpu"), emb)


def test_wan_per_token_timestep_equals_scalar_timestep(wan_pipe):
    """A 2-D timestep that is the same for every token is the model's ordinary 1-D call."""
    fifo = FIFODiffusion(wan_pipe, num_partitions=1, frames_per_window=3, lookahead=False)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 3, 4, 4, generator=gen)
    emb = torch.randn(1, 16, wan_pipe.transformer.config.text_dim, generator=gen)
    t = torch.full((3,), 700.0)
    with torch.no_grad():
        mine = fifo._model(x, t, emb, None, 1.0)
        ref = wan_pipe.transformer(hidden_states=x, timestep=t[:1], encoder_hidden_states=emb, return_dict=False)[0]
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


def test_animatediff_per_frame_time_embedding(ad_pipe):
    """UNetMotionModel with per-frame time embeddings: equal timesteps reproduce the UNet's own call;
    different timesteps change every frame (the motion modules mix frames), and CFG is one call."""
    from longvideo.methods.families import AnimateDiffFamily

    fam = AnimateDiffFamily(ad_pipe)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 4, 8, 8, generator=gen)
    emb = torch.randn(1, 77, 32, generator=gen)
    neg = torch.randn(1, 77, 32, generator=gen)
    t = torch.full((4,), 501.0)
    with torch.no_grad():
        mine = fam.model_output(x, t, emb, None, 1.0)
        ref = ad_pipe.unet(x, t[0], encoder_hidden_states=emb.repeat_interleave(4, 0)).sample
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
        mixed = fam.model_output(x, torch.tensor([1.0, 301.0, 601.0, 901.0]), emb, None, 1.0)
        assert (mixed - mine).abs().amax(dim=(0, 1, 3, 4)).min() > 0
        calls = []
        h = ad_pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
        try:
            cfg = fam.model_output(x, t, emb, neg, 7.5)
        finally:
            h.remove()
        assert calls == [2]  # both CFG halves in one call
        u = ad_pipe.unet(x, t[0], encoder_hidden_states=neg.repeat_interleave(4, 0)).sample
        torch.testing.assert_close(cfg, u + 7.5 * (ref - u), atol=1e-4, rtol=1e-4)


def test_per_frame_update_matches_plain_sampling_ddim(ad_pipe):
    """AnimateDiff: n = 1, no lookahead, a clip of exactly f frames; on a schedule whose DDIM step
    lands on the next timestep ("leading" spacing), every frame's FIFO update is DDIMScheduler.step
    from its own timestep with the noise prediction of the per-frame model call."""
    from diffusers import DDIMScheduler

    old = ad_pipe.scheduler
    ad_pipe.scheduler = DDIMScheduler.from_config(old.config, timestep_spacing="leading")
    try:
        # the scheduler's own grid (the official linspace grid: tests/test_fifo_fidelity.py)
        fifo = FIFODiffusion(ad_pipe, num_partitions=1, frames_per_window=4, lookahead=False,
                             timestep_grid="scheduler")
        gen = torch.Generator().manual_seed(4)
        st = _state(fifo, gen, (8, 8))
        emb = torch.randn(1, 77, 32, generator=gen)
        lv = fifo.levels("cpu")
        with torch.no_grad():
            new = fifo.step(st, lv, emb, None, 1.0).queue
            eps = fifo._model(st.queue, lv.t_model[1:], emb, None, 1.0)
        sched = DDIMScheduler.from_config(old.config, timestep_spacing="leading")
        sched.set_timesteps(fifo.L)
        asc = sched.timesteps.flip(0)
        torch.testing.assert_close(lv.t_model[1:], asc.float())
        for k in range(fifo.L):
            ref = sched.step(eps[:, :, k], asc[k], st.queue[:, :, k], eta=0.0, return_dict=False)[0]
            torch.testing.assert_close(new[:, :, k], ref, atol=1e-5, rtol=1e-5)
        # eta = 1 (the official FIFO setting): the same with DDIM's sigma_t z, z given per slot
        stochastic = FIFODiffusion(ad_pipe, num_partitions=1, frames_per_window=4, lookahead=False, eta=1.0,
                                   timestep_grid="scheduler")
        z = torch.randn(st.queue.shape, generator=gen)
        with torch.no_grad():
            new = stochastic.step(st, lv, emb, None, 1.0, noise=z).queue
        for k in range(fifo.L):
            ref = sched.step(eps[:, :, k], asc[k], st.queue[:, :, k], eta=1.0, variance_noise=z[:, :, k],
                             return_dict=False)[0]
            torch.testing.assert_close(new[:, :, k], ref, atol=1e-5, rtol=1e-5)
        assert (new - fifo.step(st, lv, emb, None, 1.0).queue).abs().max() > 1e-3  # the noise matters
        with pytest.raises(ValueError, match="eta"):
            FIFODiffusion(ad_pipe, eta=1.5)
    finally:
        ad_pipe.scheduler = old


def test_generate_streams_requested_frames(pipe):
    fifo = FIFODiffusion(pipe, num_partitions=1, frames_per_window=4)
    seen = []

    class Writer:
        def write(self, frame):
            seen.append(frame)

    frames = list(fifo.generate("a cat", 5, guidance_scale=3.0, seed=0, writer=Writer()))
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3) and frames[0].dtype == np.uint8
    assert len(seen) == 5 and all(a is b for a, b in zip(seen, frames))
    again = fifo("a cat", 5, guidance_scale=3.0, seed=0).frames[0]  # "np": the uint8 frames / 255 in float32
    assert np.array_equal(np.stack(frames) / np.float32(255), again)


def test_resume_equals_uninterrupted(wan_pipe, tmp_path):
    """n = 2, f = 4 (L = 8): 4 warm-up iterations emit nothing, then 1, 4, 4, ... video frames."""
    fifo = FIFODiffusion(wan_pipe, num_partitions=2, frames_per_window=4)
    assert fifo.warmup == 4
    full = list(fifo.generate("a dog", 20, guidance_scale=3.0, seed=3))
    first = list(fifo.generate("a dog", 14, guidance_scale=3.0, seed=3, checkpoint_dir=tmp_path,
                               checkpoint_every=3, stop_after_iterations=7))
    saved = torch.load(tmp_path / "fifo_state.pt", weights_only=True)
    assert saved["iteration"] == 6 and saved["frames_out"] == 5 and len(first) == 9
    rest = list(fifo.generate("a dog", 14, guidance_scale=3.0, seed=3, checkpoint_dir=tmp_path, resume=True,
                              checkpoint_every=3))
    resumed = first[: saved["frames_out"]] + rest
    assert len(resumed) == 14
    for a, b in zip(resumed, full):
        np.testing.assert_array_equal(a, b)
    # The 14-frame run ended inside an iteration (13 + 1 of its 4 frames): its final checkpoint is
    # the state before that iteration, so extending to 20 frames continues the same video.
    assert torch.load(tmp_path / "fifo_state.pt", weights_only=True)["frames_out"] == 13
    more = list(fifo.generate("a dog", 20, guidance_scale=3.0, seed=3, checkpoint_dir=tmp_path, resume=True))
    assert len(more) == 7
    for a, b in zip(more, full[13:]):
        np.testing.assert_array_equal(a, b)


def test_resume_with_ddim_eta_equals_uninterrupted(ad_pipe, tmp_path):
    """eta = 1 draws noise for every slot every iteration: the generator state in the checkpoint
    keeps the draws of a resumed run equal to an uninterrupted run's."""
    fifo = FIFODiffusion(ad_pipe, num_partitions=1, frames_per_window=4, eta=1.0)
    full = list(fifo.generate("a dog", 7, guidance_scale=3.0, seed=2))
    first = list(fifo.generate("a dog", 7, guidance_scale=3.0, seed=2, checkpoint_dir=tmp_path, checkpoint_every=2,
                               stop_after_iterations=3))
    rest = list(fifo.generate("a dog", 7, guidance_scale=3.0, seed=2, checkpoint_dir=tmp_path, resume=True))
    assert len(first) == 3 and len(rest) == 5
    np.testing.assert_array_equal(np.stack(first[:2] + rest), np.stack(full))
    deterministic = np.stack(list(FIFODiffusion(ad_pipe, num_partitions=1, frames_per_window=4).generate(
        "a dog", 7, guidance_scale=3.0, seed=2)))
    assert np.abs(deterministic.astype(int) - np.stack(full).astype(int)).max() > 0


def test_wan_streamed_decode_equals_whole_video_decode(wan_pipe):
    """Popped latents decoded one by one (the causal VAE's cache carried in the queue state) give
    exactly the VAE's decode of all of them at once: no seams every 4 frames."""
    from longvideo.methods.families import family_for

    fam = family_for(wan_pipe)
    latents = torch.randn(1, 4, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    frames, cache = [], None
    for i in range(latents.shape[2]):
        out, cache = fam.decode(latents[:, :, i: i + 1], cache)
        frames.extend(out)
    vae = wan_pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        whole = vae.decode(latents * std + mean, return_dict=False)[0]
    from longvideo.methods.families import to_uint8

    expected = to_uint8(whole[0].permute(1, 0, 2, 3))
    assert len(frames) == 1 + 4 * 4 == expected.shape[0]
    np.testing.assert_array_equal(np.stack(frames), expected)


def test_initial_queue_is_the_official_construction(ad_pipe):
    """Last f slots: the clip in order at their levels; the slots before: its first frame; the
    lookahead context: its first frame re-noised to level 1 (t_0) with noise drawn after the
    slots' (official), or clean."""
    fifo = FIFODiffusion(ad_pipe, num_partitions=2, frames_per_window=4)  # L = 8, c = 2
    clip = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    fifo.family.sample_clip = lambda *a, **k: clip
    lv = fifo.levels("cpu")
    gen = torch.Generator().manual_seed(2)
    st = fifo._initial_state(lv, None, None, 64, 64, 1.0, gen, 4)
    ref_gen = torch.Generator().manual_seed(2)
    eps = torch.randn(1, 4, 8, 8, 8, generator=ref_gen)
    ctx_eps = torch.randn(1, 4, 2, 8, 8, generator=ref_gen)
    idx = [0, 0, 0, 0, 0, 1, 2, 3]
    for i, j in enumerate(idx):
        a = lv.abar[i + 1]
        torch.testing.assert_close(st.queue[:, :, i], a.sqrt() * clip[:, :, j] + (1 - a).sqrt() * eps[:, :, i])
    a1 = lv.abar[1]
    torch.testing.assert_close(st.context, a1.sqrt() * clip[:, :, :1] + (1 - a1).sqrt() * ctx_eps)
    clean = FIFODiffusion(ad_pipe, num_partitions=2, frames_per_window=4, lookahead_context="clean")
    clean.family.sample_clip = lambda *a, **k: clip
    st = clean._initial_state(lv, None, None, 64, 64, 1.0, torch.Generator().manual_seed(2), 4)
    torch.testing.assert_close(st.context, clip[:, :, :1].repeat(1, 1, 2, 1, 1))
    assert fifo.warmup == 4 and FIFODiffusion(ad_pipe, num_partitions=2, frames_per_window=4,
                                               skip_warmup=False).warmup == 0


def test_bad_arguments(wan_pipe, tmp_path):
    with pytest.raises(ValueError, match="frames_per_window"):
        FIFODiffusion(wan_pipe, frames_per_window=1)
    with pytest.raises(ValueError, match="num_partitions"):
        FIFODiffusion(wan_pipe, num_partitions=0)
    with pytest.raises(ValueError, match="pipe"):
        FIFODiffusion(object())
    with pytest.raises(ValueError, match="eta"):  # DDIM's eta has no meaning for flow matching
        FIFODiffusion(wan_pipe, eta=1.0)
    fifo = FIFODiffusion(wan_pipe, num_partitions=1, frames_per_window=4)
    with pytest.raises(ValueError, match="num_frames"):
        next(fifo.generate("x", 0))
    with pytest.raises(ValueError, match="num_inference_steps"):
        next(fifo.generate("x", 4, num_inference_steps=fifo.L + 1))
    with pytest.raises(FileNotFoundError, match="resume"):
        next(fifo.generate("x", 4, checkpoint_dir=tmp_path, resume=True))


def _png_frames(folder):
    from PIL import Image

    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("frame_*.png"))])


def test_cli_interrupt_then_resume_equals_uninterrupted(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of a run (simulated in the video writer): the CLI saves the state of the
    last fully emitted iteration, --resume continues, and the PNGs (lossless) equal an
    uninterrupted run's; the mp4 is one complete video again (the old frames kept as coded and
    the new ones appended, docs/outputs.md)."""
    from longvideo.cli import main
    from longvideo.video import VideoWriter, read_video

    common = ["generate", "--method", "fifo", "--fifo-family", "animatediff", "--num-frames", "9",
              "--fifo-partitions", "1", "--fifo-window", "4", "--device", "cpu", "--seed", "5"]
    ref_dir = tmp_path / "ref"
    assert main(common + ["--out", str(ref_dir / "v.mp4"), "--fifo-png-dir", str(ref_dir / "png")]) == 0
    assert "frames/s" in capsys.readouterr().out
    reference = _png_frames(ref_dir / "png")
    assert reference.shape[0] == 9 and read_video(ref_dir / "v.mp4").shape[0] == 9

    run = tmp_path / "run"
    args = common + ["--out", str(run / "v.mp4"), "--fifo-png-dir", str(run / "png"), "--fifo-checkpoint-every", "3"]
    write = VideoWriter.write

    def interrupting_write(self, frames):
        if self.frames_written == 5:
            raise KeyboardInterrupt
        write(self, frames)

    monkeypatch.setattr(VideoWriter, "write", interrupting_write)
    assert main(args) == 130
    assert "--resume" in capsys.readouterr().out
    saved = torch.load(run / "v.fifo_state" / "fifo_state.pt", weights_only=True)
    # saved at the interruption: the last iteration whose frames were all written, not the periodic one
    assert saved["frames_out"] == 5 and saved["iteration"] == 5
    before = read_video(run / "v.mp4")  # the interrupted run's frames, joined into OUT at the interrupt
    assert before.shape[0] == 5
    monkeypatch.setattr(VideoWriter, "write", write)

    assert main(args + ["--resume"]) == 0
    np.testing.assert_array_equal(_png_frames(run / "png"), reference)
    video, ref_video = read_video(run / "v.mp4"), read_video(ref_dir / "v.mp4")
    assert video.shape == ref_video.shape
    # lossy H.264 on both sides (the resumed video restarts the encoder at the checkpoint): close
    assert np.abs(video.astype(int) - ref_video.astype(int)).mean() < 8
    np.testing.assert_array_equal(video[:5], before)  # kept as coded: not encoded a second time
    assert not list(run.glob("*.resuming.mp4")) and not list(run.glob("*.from*.mp4"))

    # extending the finished run: the end state was saved, more frames continue the same video
    assert main([a if a != "9" else "12" for a in args] + ["--resume"]) == 0
    longer_ref = tmp_path / "ref12"
    assert main([a if a != "9" else "12" for a in common] + ["--out", str(longer_ref / "v.mp4"),
                                                           "--fifo-png-dir", str(longer_ref / "png")]) == 0
    np.testing.assert_array_equal(_png_frames(run / "png"), _png_frames(longer_ref / "png"))

    # resuming with another seed is refused: one line, exit status 2
    assert main([a if a != "5" else "6" for a in args] + ["--num-frames", "20", "--resume"]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("longvideo: error:")]
    assert "other settings" in line and "Traceback" not in err


def test_cli_sigterm_saves_the_queue_state(tmp_path):
    """A real signal: SIGTERM (a scheduler, `timeout`) closes the video (every frame written so far
    joined into OUT) and saves the state; exit status 143 (128 + SIGTERM)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "longvideo", "generate", "--method", "fifo", "--fifo-family", "animatediff",
           "--num-frames", "400", "--fifo-partitions", "1", "--fifo-window", "4", "--device", "cpu",
           "--fifo-checkpoint-every", "1000", "--out", str(out), "--fifo-png-dir", str(tmp_path / "png")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list((tmp_path / "png").glob("frame_*.png")):  # frames are being written
            break
        time.sleep(0.5)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, text
    assert "interrupted by SIGTERM" in text and "Traceback" not in text
    saved = torch.load(tmp_path / "v.fifo_state" / "fifo_state.pt", weights_only=True)
    from longvideo.video import read_video

    assert read_video(out).shape[0] >= saved["frames_out"] > 0


def test_coherent_tail_is_lowfreq_mix_of_second_to_last(wan_pipe):
    """Ouroboros part (a) on Wan: the new tail is lowfreq_mix(second-to-last latent after the shift,
    fresh noise); everything else equals FIFO, whose tail is that fresh noise itself."""
    from longvideo.reference.lowfreq_mix import lowfreq_mix_reference

    states = {}
    for on in (False, True):
        fifo = FIFODiffusion(wan_pipe, num_partitions=1, frames_per_window=4, coherent_tail=on)
        gen = fifo.generate("a cat", 8, guidance_scale=3.0, seed=5)
        next(gen)  # first frame out: one iteration done
        states[on] = gen.gi_frame.f_locals["state"]
        gen.close()
    off, on = states[False].queue, states[True].queue
    torch.testing.assert_close(on[:, :, :-1], off[:, :, :-1], atol=0, rtol=0)
    eta = off[:, :, -1:]
    expected = lowfreq_mix_reference(on[:, :, -2:-1], eta, "gaussian", 0.25, 1.0, 4)
    torch.testing.assert_close(on[:, :, -1:], expected, atol=1e-5, rtol=1e-5)
    assert (on[:, :, -1:] - eta).abs().max() > 1e-3


def test_bench_quick_cases_run():
    from longvideo.benchmarking import load_suite

    cases = load_suite("fifo").cases(torch.device("cpu"), quick=True)
    assert {c.impl for c in cases} >= {"fifo", "ouroboros:tail", "ouroboros:sacfa", "ouroboros:guidance"}
    for case in cases:
        out = case.fn()
        assert torch.isfinite(out).all()


def _rank_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from longvideo.methods.fifo import OuroborosDiffusion

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fifo = FIFODiffusion(wan.tiny_pipeline(), num_partitions=2, frames_per_window=4)
        assert fifo._rank_world() == (rank, world)  # the windows really are split
        np.save(f"{out_dir}/wan{rank}.npy", fifo("a dog", 6, guidance_scale=3.0, seed=7).frames[0])
        ouro = OuroborosDiffusion(animatediff.tiny_pipeline(), num_partitions=1, frames_per_window=4,
                                  guided_windows=(1,), guidance_scale=5.0, eta=1.0)
        np.save(f"{out_dir}/ouro{rank}.npy", ouro("a red cat runs", 5, guidance_scale=3.0, seed=7).frames[0])
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(wan_pipe, ad_pipe, tmp_path):
    """FIFO (Wan) and Ouroboros with every part on and DDIM eta = 1 (AnimateDiff: guidance window on
    rank 1, bank window on rank 0, per-slot noise drawn on both): 2 gloo ranks give the very frames
    of one process."""
    import socket

    import torch.multiprocessing as mp

    from longvideo.methods.fifo import OuroborosDiffusion

    with socket.socket() as s:  # a free loopback port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: CPU kernels' reduction order depends on the thread count
    try:
        single = FIFODiffusion(wan_pipe, num_partitions=2, frames_per_window=4)("a dog", 6, guidance_scale=3.0, seed=7).frames[0]
        ouro = OuroborosDiffusion(ad_pipe, num_partitions=1, frames_per_window=4, guided_windows=(1,),
                                  guidance_scale=5.0, eta=1.0)("a red cat runs", 5, guidance_scale=3.0, seed=7).frames[0]
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"wan{rank}.npy"), single)
        np.testing.assert_array_equal(np.load(tmp_path / f"ouro{rank}.npy"), ouro)


def test_multi_prompt_switches_at_the_start_frame(wan_pipe):
    sched = PromptSchedule.parse([("a cat", 0), ("a dog", 9), ("a bird", 12)], 4)
    assert sched.latent_starts == [0, 3, 3]  # video frames 9 and 12 both fall in latent frame 3
    sched.embeds = ["cat", "dog", "bird"]
    assert [sched.at(i) for i in (0, 2, 3, 10)] == ["cat", "cat", "bird", "bird"]
    with pytest.raises(ValueError, match="start frames"):
        PromptSchedule.parse([("a", 1)])
    with pytest.raises(ValueError, match="pairs"):
        PromptSchedule.parse([])
    fifo = FIFODiffusion(wan_pipe, num_partitions=2, frames_per_window=4)
    single = fifo("a cat", 8, guidance_scale=3.0, seed=2).frames[0]
    same = fifo([("a cat", 0), ("a cat", 20)], 8, guidance_scale=3.0, seed=2).frames[0]
    other = fifo([("a cat", 0), ("a dog", 4)], 8, guidance_scale=3.0, seed=2).frames[0]
    assert np.array_equal(single, same)
    assert not np.array_equal(single, other)
