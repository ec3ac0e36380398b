"""FIFO-Diffusion against the official sampler: the timestep grid (``timestep_grid``) and the
lookahead context (``lookahead_context``), on a toy denoiser, and their place in resume's settings.

Oracle: ``official_fifo`` below, written from the paper (diagonal denoising with lookahead, Kim et
al. 2024, Sec. 3) and from reading the official VideoCrafter2 sampler (scripts/evaluation/funcs.py
``prepare_latents`` / ``fifo_ddim_sampling`` / ``shift_latents`` and lvdm's ``make_ddim_timesteps``
/ ``ddim_step``): a latent buffer [f/2 context | L slots] with timesteps [t_0 x f/2 | t_0 .. t_{L-1}],
t = linspace(0, 999, L).round(); windows of f frames every f/2 positions, processed from the LAST
window to the first, each writing its second half IN PLACE; per-frame DDIM steps with
alphas = abar[t_i], alphas_prev = abar[t_{i-1}] (abar[0] for i = 0); the head (position f/2) is
emitted, the buffer shifts, a fresh tail enters; the first L - f frames are dropped. Nothing of
the implementation is used but the pipeline's alphas_cumprod and the order of the random draws
(slot noise, context noise, per iteration: the DDIM z of every slot, then the tail).
"""
import numpy as np
import pytest
import torch

from longvideo.methods.fifo import FIFODiffusion, OuroborosDiffusion
from longvideo.models import animatediff, skyreels, wan

C, HW = 4, (5, 3)        # toy latents: 4 channels, 5 x 3 (a size no other test uses)
N_PART, F_WIN = 3, 4     # n = 3 partitions of f = 4 frames: L = 12, context c = 2


@pytest.fixture(scope="module")
def ad_pipe():
    return animatediff.tiny_pipeline()


def toy_eps(x, t):
    """A frame-coupled, timestep-dependent toy noise prediction: x (1, C, F, h, w), t (F,)."""
    s = (t.float() / 1000.0).view(1, 1, -1, 1, 1)
    mean = x.mean(dim=2, keepdim=True)
    return torch.tanh(0.7 * x + 0.4 * mean) * (0.6 + s) + 0.15 * torch.roll(x, 1, dims=2)


def official_fifo(clip, alphas_cumprod, n, f, eta, num_frames, seed, context_noise=True):
    """The official VideoCrafter2 FIFO sampler with lookahead (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    L, half = n * f, f // 2
    ac = alphas_cumprod.double()
    ts = np.linspace(0, 999, L).round().astype(np.int64)
    alphas = ac[torch.from_numpy(ts)]
    alphas_prev = torch.cat([ac[:1], ac[torch.from_numpy(ts[:-1])]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    shape = (1, clip.shape[1], 1, *clip.shape[3:])
    eps = torch.randn(1, clip.shape[1], L, *clip.shape[3:], generator=gen).double()
    slots = [alphas[i].sqrt() * clip[:, :, [max(0, i - (L - f))]].double() + (1 - alphas[i]).sqrt() * eps[:, :, [i]]
             for i in range(L)]
    first = clip[:, :, [0]].double()
    if context_noise:
        ceps = torch.randn(1, clip.shape[1], half, *clip.shape[3:], generator=gen).double()
        context = [alphas[0].sqrt() * first + (1 - alphas[0]).sqrt() * ceps[:, :, [j]] for j in range(half)]
    else:
        context = [first] * half
    latents = torch.cat(context + slots, dim=2)
    timesteps = np.concatenate([np.full(half, ts[0]), ts])
    indices = np.concatenate([np.zeros(half, dtype=np.int64), np.arange(L)])
    frames = []
    for _ in range(L - f + num_frames):
        z = torch.randn(1, clip.shape[1], L, *clip.shape[3:], generator=gen).double() if eta else None
        for rank in reversed(range(2 * n)):
            start = rank * half
            mid, end = start + half, start + f
            x = latents[:, :, start:end].clone()
            e = toy_eps(x.float(), torch.from_numpy(timesteps[start:end])).double()
            outs = []
            for i in range(f):
                j = indices[start + i]
                a, ap, sg = alphas[j], alphas_prev[j], sigmas[j]
                x0 = (x[:, :, [i]] - (1 - a).sqrt() * e[:, :, [i]]) / a.sqrt()
                xp = ap.sqrt() * x0 + (1 - ap - sg ** 2).clamp_min(0).sqrt() * e[:, :, [i]]
                if eta:
                    pos = start + i - half  # queue slot of this position (the context has none)
                    xp = xp + sg * (z[:, :, [pos]] if pos >= 0 else 0)
                outs.append(xp)
            latents[:, :, mid:end] = torch.cat(outs, dim=2)[:, :, half:]
        frames.append(latents[0, :, half].clone())
        latents[:, :, :-1] = latents[:, :, 1:].clone()
        latents[:, :, -1:] = torch.randn(shape, generator=gen).double()
    return torch.stack(frames[L - f:])


def _toy(fifo, clip):
    """The method with the toy denoiser, the given initial clip and latents as the 'decoded' frames."""
    fifo.family.sample_clip = lambda *a, **k: clip.clone()
    fifo.family.model_output = lambda x, t, *a, **k: toy_eps(x, t)
    fifo.family.decode = lambda latent, cache: ([latent[0, :, 0].clone()], None)
    return fifo


def _ours(pipe, clip, num_frames, seed, **options):
    """Emitted latents of FIFODiffusion with the toy denoiser."""
    fifo = _toy(FIFODiffusion(pipe, num_partitions=N_PART, frames_per_window=F_WIN, **options), clip)
    return fifo, torch.stack(list(fifo.generate("a toy", num_frames, guidance_scale=1.0, seed=seed)))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_emitted_frames_equal_the_official_sampler(ad_pipe, eta):
    """Default options (official grid, noised lookahead context) = the official sampler, frame by
    frame; the clean context and the scheduler's "leading" grid are measurably different."""
    from diffusers import DDIMScheduler

    clip = torch.randn(1, C, F_WIN, *HW, generator=torch.Generator().manual_seed(21))
    ac = ad_pipe.scheduler.alphas_cumprod
    ref = official_fifo(clip, ac, N_PART, F_WIN, eta, 6, seed=4)
    fifo, ours = _ours(ad_pipe, clip, 6, 4, eta=eta)
    assert fifo.L == 12 and fifo.context_len == 2 and ours.shape == (6, C, *HW)
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=2e-5)

    # clean context: equal to the oracle built with a clean context, not to the official one
    _, clean = _ours(ad_pipe, clip, 6, 4, eta=eta, lookahead_context="clean")
    torch.testing.assert_close(clean.double(), official_fifo(clip, ac, N_PART, F_WIN, eta, 6, seed=4,
                                                             context_noise=False), atol=2e-5, rtol=2e-5)
    assert _rel(clean, ref) > 1e-3

    # a "leading" scheduler: "official" ignores its spacing, "scheduler" follows it
    old = ad_pipe.scheduler
    ad_pipe.scheduler = DDIMScheduler.from_config(old.config, timestep_spacing="leading", set_alpha_to_one=True)
    try:
        _, still = _ours(ad_pipe, clip, 6, 4, eta=eta)
        _, sched = _ours(ad_pipe, clip, 6, 4, eta=eta, timestep_grid="scheduler")
    finally:
        ad_pipe.scheduler = old
    torch.testing.assert_close(still.double(), ref, atol=2e-5, rtol=2e-5)
    assert _rel(sched, ref) > 1e-3


def test_official_grid_levels(ad_pipe):
    """AnimateDiff: t_k = round(linspace(0, 999, L))[k - 1], level 0 at alphas_cumprod[0], for any
    scheduler spacing; "scheduler" = the scheduler's own timesteps and final alpha."""
    from diffusers import DDIMScheduler

    old = ad_pipe.scheduler
    ad_pipe.scheduler = DDIMScheduler.from_config(old.config, timestep_spacing="leading", set_alpha_to_one=True)
    try:
        L = 20  # lookahead, n = 5, f = 4
        official = FIFODiffusion(ad_pipe, num_partitions=5, frames_per_window=4)
        scheduler = FIFODiffusion(ad_pipe, num_partitions=5, frames_per_window=4, timestep_grid="scheduler")
        lo, ls = official.levels("cpu"), scheduler.levels("cpu")
        grid = [round(999 * i / (L - 1)) for i in range(L)]  # no exact halves at L = 20
        assert lo.t_model.tolist() == [0.0] + [float(t) for t in grid]
        ac = ad_pipe.scheduler.alphas_cumprod
        torch.testing.assert_close(lo.abar, torch.cat([ac[:1], ac[torch.tensor(grid)]]))
        ref = DDIMScheduler.from_config(old.config, timestep_spacing="leading", set_alpha_to_one=True)
        ref.set_timesteps(L)
        assert ls.t_model[1:].tolist() == ref.timesteps.flip(0).float().tolist()
        assert float(ls.abar[0]) == 1.0 and ls.t_model[1:].tolist() != lo.t_model[1:].tolist()
        with pytest.raises(ValueError, match="timestep_grid"):
            FIFODiffusion(ad_pipe, timestep_grid="linspace")
        with pytest.raises(ValueError, match="lookahead_context"):
            FIFODiffusion(ad_pipe, lookahead_context="noisy")
    finally:
        ad_pipe.scheduler = old


@pytest.mark.parametrize("family", ["wan", "skyreels"])
def test_flow_matching_official_grid_is_the_scheduler_and_context_is_noised_to_level_one(family):
    """Wan / SkyReels-V2: no DDPM linspace exists, "official" = the scheduler's sigmas (identical
    levels); the official context: the clip's first frame at sigma_1 = (1 - s) x0 + s eps (eps
    drawn after the slots' noise), told level 1's timestep; "clean": x0, told level 0's."""
    pipe = wan.tiny_pipeline() if family == "wan" else skyreels.tiny_pipeline()
    n, f = 2, 6  # L = 12, c = 3
    official = FIFODiffusion(pipe, num_partitions=n, frames_per_window=f)
    clean = FIFODiffusion(pipe, num_partitions=n, frames_per_window=f, timestep_grid="scheduler",
                          lookahead_context="clean")
    assert official.timestep_grid == clean.timestep_grid == "scheduler"
    lo, lc = official.levels("cpu"), clean.levels("cpu")
    assert torch.equal(lo.sigma, lc.sigma) and torch.equal(lo.t_model, lc.t_model)
    clip = torch.randn(1, C, f, 2, 4, generator=torch.Generator().manual_seed(8))
    states = {}
    for name, fifo in (("official", official), ("clean", clean)):
        fifo.family.sample_clip = lambda *a, **k: clip.clone()
        states[name] = fifo._initial_state(lo, None, None, 16, 32, 1.0, torch.Generator().manual_seed(3), 12)
    g = torch.Generator().manual_seed(3)
    torch.randn(1, C, 12, 2, 4, generator=g)                      # the slots' noise
    ceps = torch.randn(1, C, 3, 2, 4, generator=g)                # then the context's
    s1 = lo.sigma[1]
    torch.testing.assert_close(states["official"].context, (1 - s1) * clip[:, :, :1] + s1 * ceps)
    torch.testing.assert_close(states["clean"].context, clip[:, :, :1].repeat(1, 1, 3, 1, 1))
    torch.testing.assert_close(states["official"].queue, states["clean"].queue)
    for name, fifo, level in (("official", official, 1), ("clean", clean, 0)):
        told = []
        fifo._model = lambda x, t, *a: told.append(t.clone()) or torch.zeros_like(x)
        fifo.step(states[name], lo, None, None, 1.0)
        first = told[0]  # window 0: c context frames, then slots 1 .. f - c
        assert first[:3].tolist() == [float(lo.t_model[level])] * 3
        torch.testing.assert_close(first[3:], lo.t_model[1:4])


def test_resume_checks_grid_and_context_and_accepts_old_checkpoints(ad_pipe, tmp_path):
    """The options are part of the run's settings: resuming with another grid or context is refused;
    a checkpoint from before the options existed counts as the scheduler grid with a clean context."""
    from diffusers import DDIMScheduler

    old = ad_pipe.scheduler
    ad_pipe.scheduler = DDIMScheduler.from_config(old.config, timestep_spacing="trailing")
    try:
        kw = dict(num_partitions=1, frames_per_window=4)
        run = dict(guidance_scale=1.0, seed=6, checkpoint_dir=tmp_path, checkpoint_every=1)
        clip = torch.randn(1, C, 4, *HW, generator=torch.Generator().manual_seed(2))
        legacy = _toy(FIFODiffusion(ad_pipe, timestep_grid="scheduler", lookahead_context="clean", **kw), clip)
        full = torch.stack(list(legacy.generate("a cat", 4, guidance_scale=1.0, seed=6)))
        first = list(legacy.generate("a cat", 4, stop_after_iterations=3, **run))
        ckpt = tmp_path / "fifo_state.pt"
        saved = torch.load(ckpt, weights_only=True)
        assert saved["settings"]["timestep_grid"] == "scheduler"
        assert saved["settings"]["lookahead_context"] == "clean"
        for opts, key in (({}, "timestep_grid"), ({"timestep_grid": "scheduler"}, "lookahead_context")):
            with pytest.raises(ValueError, match=key):
                next(_toy(FIFODiffusion(ad_pipe, **opts, **kw), clip).generate("a cat", 4, resume=True, **run))
        # the same checkpoint without the new keys (written before the options existed)
        for k in ("timestep_grid", "lookahead_context"):
            del saved["settings"][k]
        torch.save(saved, ckpt)
        with pytest.raises(ValueError, match="timestep_grid"):
            next(_toy(FIFODiffusion(ad_pipe, **kw), clip).generate("a cat", 4, resume=True, **run))
        rest = list(legacy.generate("a cat", 4, resume=True, **run))
        torch.testing.assert_close(torch.stack(first[:saved["frames_out"]] + rest), full, atol=0, rtol=0)
        # an old Ouroboros checkpoint has no sacfa_tokens: it counts as the paper's
        from longvideo.methods.fifo import _check_run_settings

        o = OuroborosDiffusion(ad_pipe, timestep_grid="scheduler", lookahead_context="clean", **kw)
        now = o._run_settings(types_schedule(), 32, 32, 1.0, "", 6, None)
        older = dict(now, ouroboros=now["ouroboros"].replace("'sacfa_tokens': 'paper', ", ""))
        assert older["ouroboros"] != now["ouroboros"]
        _check_run_settings(older, now, ckpt)
        demo = OuroborosDiffusion(ad_pipe, timestep_grid="scheduler", lookahead_context="clean",
                                  sacfa_tokens="official_demo", **kw)
        with pytest.raises(ValueError, match="ouroboros"):
            _check_run_settings(older, demo._run_settings(types_schedule(), 32, 32, 1.0, "", 6, None), ckpt)
    finally:
        ad_pipe.scheduler = old


def types_schedule():
    from longvideo.methods.fifo import PromptSchedule

    return PromptSchedule(["a cat"], [0])


def test_cli_options_reach_the_method():
    import argparse

    from longvideo.cli.generate_fifo import add_arguments as add_generate_arguments
    from longvideo.cli.generate_fifo import build_from_args

    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    args = parser.parse_args(["--fifo-timestep-grid", "scheduler", "--fifo-lookahead-context", "clean",
                              "--ouroboros-sacfa-tokens", "official_demo", "--fifo-partitions", "1",
                              "--fifo-window", "4"])
    pipe = animatediff.tiny_pipeline()
    args.method = "ouroboros"
    o = build_from_args(args, pipe)
    assert (o.timestep_grid, o.lookahead_context, o.ouro.sacfa_tokens) == ("scheduler", "clean", "official_demo")
    defaults = parser.parse_args([])
    defaults.method = "fifo"
    f = build_from_args(defaults, pipe)
    assert (f.timestep_grid, f.lookahead_context) == ("official", "official")
