"""longvideo's Wan forward (longvideo/processors/wan_modulation.py) against diffusers' own
forward, per-token timesteps included: the same outputs and gradients for FIFO's per-frame timesteps, TI2V's image frame,
a slice that cuts frames (context parallelism), bf16 and the I2V transformer; a fraction of the
live memory; and a deliberately wrong run table fails the comparison."""
import numpy as np
import pytest
import torch

from longvideo.processors import wan_modulation as WM

torch.set_num_threads(1)


def _transformer(dtype=torch.float32, image_dim=None, layers=2, seed=0):
    from diffusers import WanTransformer3DModel

    from longvideo.models.wan import _cast_transformer

    torch.manual_seed(seed)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                               out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=layers,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                               image_dim=image_dim, added_kv_proj_dim=32 if image_dim else None).eval()
    # random tables: the constructor's are random too, but make sure every entry matters
    with torch.no_grad():
        for p in [tr.scale_shift_table] + [b.scale_shift_table for b in tr.blocks]:
            p.normal_()
    _cast_transformer(tr, dtype)
    return tr


def _inputs(frames=4, hw=(8, 6), batch=2, seed=1, image=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, *hw, generator=g)
    text = torch.randn(batch, 7, 24, generator=g)
    img = torch.randn(batch, 5, 16, generator=g) if image else None
    return x, text, img


def _per_frame(levels, tokens, batch):
    return torch.as_tensor(levels, dtype=torch.float32).repeat_interleave(tokens)[None].expand(batch, -1)


def _call(tr, x, t, text, img=None):
    return tr(hidden_states=x.to(tr.dtype), timestep=t, encoder_hidden_states=text.to(tr.dtype),
              encoder_hidden_states_image=None if img is None else img.to(tr.dtype), return_dict=False)[0]


def _both(tr, x, t, text, img=None, grad=False):
    """diffusers' output and the patched one; grad: with autograd on (the patch's out-of-place
    path), else under no_grad (its in-place path without float32 temporaries)."""
    with torch.set_grad_enabled(grad):
        plain = _call(tr, x, t, text, img)
        with WM.apply_lean_wan_forward(tr):
            patched = _call(tr, x, t, text, img)
    return plain, patched


TOKENS = 4 * 3  # (8 / 2) x (6 / 2)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("case", ["fifo", "ti2v_image_frame", "uneven", "one_run", "scalar"])
def test_equals_diffusers(case, grad):
    """fp32, without and with autograd: diffusers' output to 1e-5 (the same elementwise
    operations on the same values; only the time embedder's matmul runs over R rows instead of
    S, and a kernel chosen for another row count may round differently: 6e-7 for one run),
    exactly for FIFO's runs and a 1-D timestep."""
    tr = _transformer()
    x, text, _ = _inputs()
    if case == "fifo":
        t = _per_frame([900.0, 700.0, 450.0, 120.0], TOKENS, 2)
    elif case == "ti2v_image_frame":
        t = _per_frame([0.0, 640.0, 640.0, 640.0], TOKENS, 2)
    elif case == "uneven":   # a boundary inside a frame (a rank's slice under context parallelism)
        t = _per_frame([900.0, 700.0, 450.0, 120.0], TOKENS, 2).clone()
        t[:, 5:9] = 333.0
    elif case == "one_run":
        t = torch.full((2, 4 * TOKENS), 500.0)
    else:                    # a 1-D timestep (FreeLOC, direct runs): diffusers' embedding itself
        t = torch.tensor([500.0, 500.0])
    if case != "scalar":
        runs = WM.timestep_runs(t)
        assert runs is not None and sum(runs.lengths) == t.shape[1]
    plain, patched = _both(tr, x, t, text, grad=grad)
    if case in ("fifo", "scalar"):
        assert torch.equal(plain, patched)   # measured: every element equal
    torch.testing.assert_close(patched, plain, rtol=1e-5, atol=1e-5)


def test_bf16_and_i2v_transformer():
    """bf16 weights (fp32 norms / tables, as our loaders cast) and Wan 2.1 I2V's image branch:
    equal outputs (to one bf16 rounding, for the time embedder's rows)."""
    tr = _transformer(torch.bfloat16, image_dim=16)
    x, text, img = _inputs(image=True)
    t = _per_frame([999.0, 500.0, 250.0, 1.0], TOKENS, 2)
    for grad in (False, True):
        plain, patched = _both(tr, x, t, text, img, grad=grad)
        torch.testing.assert_close(patched.float(), plain.float(), rtol=8e-3, atol=8e-3)


def test_gradients_equal():
    """Ouroboros' self-recurrent guidance differentiates through the transformer: the input's
    gradient is the same with the patch (fp32, to 1e-6 relative: the graph's backward kernels
    reduce over broadcast dimensions in another order)."""
    tr = _transformer()
    for p in tr.parameters():
        p.requires_grad_(False)
    x, text, _ = _inputs()
    t = _per_frame([900.0, 700.0, 450.0, 120.0], TOKENS, 2)
    grads = []
    for patch in (False, True):
        xi = x.clone().requires_grad_(True)
        handle = WM.apply_lean_wan_forward(tr) if patch else None
        out = _call(tr, xi, t, text)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append(xi.grad)
        if handle:
            handle.remove()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)


def test_wrong_run_table_fails(monkeypatch):
    """The comparison can fail: runs shifted by one token give another output."""
    tr = _transformer()
    x, text, _ = _inputs()
    t = _per_frame([900.0, 700.0, 450.0, 120.0], TOKENS, 2)
    real = WM.timestep_runs

    def shifted(timestep, max_runs=None):
        runs = real(timestep, max_runs)
        lengths = list(runs.lengths)
        lengths[0] += 1
        lengths[1] -= 1
        return WM.TimestepRuns(runs.values, lengths)

    monkeypatch.setattr(WM, "timestep_runs", shifted)
    plain, patched = _both(tr, x, t, text)
    assert (plain - patched).abs().max() > 1e-2


def test_memory_of_a_call_drops():
    """Live bytes of one FIFO-like call (8 frames of 16x16 tokens, CFG batch, no autograd): the
    per-token modulation (6 x dim float32 per token and block) is gone. The patched peak is below
    60% of the unpatched one here (measured 4,222,784 vs 11,290,368 bytes: 0.37)."""
    from longvideo.planner import LiveTensorTracker

    tr = _transformer(layers=2)
    x = torch.randn(2, 4, 8, 32, 32)
    text = torch.randn(2, 7, 24)
    t = _per_frame(torch.linspace(950, 50, 8).tolist(), 256, 2)
    peaks = []
    for patch in (False, True):
        handle = WM.apply_lean_wan_forward(tr) if patch else None
        with torch.no_grad(), LiveTensorTracker() as tracker:
            _call(tr, x, t, text)
        peaks.append(tracker.peak)
        if handle:
            handle.remove()
    assert peaks[1] < 0.6 * peaks[0], peaks


def test_falls_back_and_restores():
    """A 1-D timestep and a per-token timestep with no runs go to diffusers' forward; remove()
    restores the model's forwards; a second patch is refused; a wrapped forward is refused."""
    tr = _transformer()
    x, text, _ = _inputs()
    handle = WM.apply_lean_wan_forward(tr)
    assert "forward" in tr.__dict__ and all("forward" in b.__dict__ for b in tr.blocks)
    with pytest.raises(ValueError, match="already patched"):
        WM.apply_lean_wan_forward(tr)
    one = _call(tr, x, torch.tensor([500.0, 500.0]), text)
    noisy = torch.rand(2, 4 * TOKENS) * 1000      # every token its own timestep: no runs
    assert WM.timestep_runs(noisy) is None
    many = _call(tr, x, noisy, text)
    handle.remove()
    assert "forward" not in tr.__dict__ and not any("forward" in b.__dict__ for b in tr.blocks)
    assert torch.equal(one, _call(tr, x, torch.tensor([500.0, 500.0]), text))
    assert torch.equal(many, _call(tr, x, noisy, text))
    tr.forward = tr.forward      # what an offloading hook's wrapper looks like to the patch
    with pytest.raises(ValueError, match="before enabling offloading"):
        WM.apply_lean_wan_forward(tr)


def test_refuses_other_models():
    with pytest.raises(TypeError, match=r"no\) Wan transformer"):
        WM.apply_lean_wan_forward(torch.nn.Linear(2, 2))


def _video(method_cls, pipe, framewise, **kw):
    m = method_cls(pipe, num_partitions=1, frames_per_window=4, **kw)
    m.lean_wan_forward = framewise
    seen = []

    def spy(*args, **kwargs):   # the transformer's forward at call time: patched during the run?
        seen.append("forward" in pipe.transformer.__dict__)

    handle = pipe.transformer.register_forward_pre_hook(spy)
    try:
        frames = np.stack(list(m.generate("a cat runs", 6, guidance_scale=3.0, seed=0)))
    finally:
        handle.remove()
    return frames, seen


@pytest.mark.parametrize("method", ["fifo", "ouroboros", "fifo_wan22"])
def test_fifo_and_ouroboros_videos_unchanged(method):
    """Whole FIFO / Ouroboros runs (every Ouroboros part on: tail, SACFA, self-recurrent guidance
    with its backward) and two-expert Wan 2.2 FIFO: the frames with the patch equal those without
    within one uint8 level (measured: identical); the patch is on during the run and gone after."""
    from longvideo.methods.fifo import FIFODiffusion, OuroborosDiffusion
    from longvideo.models import wan, wan22

    pipe = wan22.tiny_pipeline() if method == "fifo_wan22" else wan.tiny_pipeline()
    cls = OuroborosDiffusion if method == "ouroboros" else FIFODiffusion
    kw = dict(guided_windows=(0, 1), guidance_scale=2.0) if method == "ouroboros" else {}
    off, seen_off = _video(cls, pipe, False, **kw)
    on, seen_on = _video(cls, pipe, True, **kw)
    assert seen_on and all(seen_on) and not any(seen_off)
    assert not any("forward" in m.__dict__ for m in [pipe.transformer, *pipe.transformer.blocks])
    assert np.abs(on.astype(int) - off.astype(int)).max() <= 1


@pytest.mark.gpu
def test_cuda_same_output_and_less_memory():
    """CUDA, bf16, Wan2.1-1.3B widths (2 blocks) on a 21-frame 480x832 window with CFG: the
    patched output equals diffusers' per-token path (bf16 tolerance) and the call's peak
    (torch.cuda.max_memory_allocated beyond the inputs) is below half of it."""
    from diffusers import WanTransformer3DModel

    from longvideo.models.wan import _cast_transformer

    dev = torch.device("cuda")
    torch.manual_seed(0)
    with dev:
        tr = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                                   text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=2).eval()
    _cast_transformer(tr, torch.bfloat16)
    x = torch.randn(2, 16, 21, 60, 104, device=dev, dtype=torch.bfloat16)
    text = torch.randn(2, 512, 4096, device=dev, dtype=torch.bfloat16)
    t = _per_frame(torch.linspace(999, 20, 21).tolist(), 30 * 52, 2).to(dev)
    outs, peaks = [], []
    for patch in (False, True):
        handle = WM.apply_lean_wan_forward(tr) if patch else None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            outs.append(_call(tr, x, t, text).float())
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        if handle:
            handle.remove()
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
    assert peaks[1] < 0.5 * peaks[0], peaks


@pytest.mark.parametrize("mode", ["model", "group"])
def test_applied_before_offloading_runs_under_the_hooks(mode):
    """What the CLI does: the patch first, then --fit's offloading (accelerate's hook wraps the
    patched forward under "model", diffusers' group hooks wrap the patched blocks under "group"):
    a FIFO run goes through both the hooks and the per-run path, and gives the frames of a plain
    resident run without the patch (host as both devices: every hook runs)."""
    from longvideo.methods.fifo import FIFODiffusion
    from longvideo.models import wan
    from longvideo.offload import enable_offload, offload_mode

    ref, _ = _video(FIFODiffusion, wan.tiny_pipeline(), False)
    pipe = wan.tiny_pipeline()
    handle = WM.apply_lean_wan_forward(pipe)
    enable_offload(pipe, mode, "cpu")
    assert offload_mode(pipe) == mode
    used = []
    real = WM.per_run
    try:
        WM.per_run = lambda *a, **k: used.append(1) or real(*a, **k)
        got, _ = _video(FIFODiffusion, pipe, True)
    finally:
        WM.per_run = real
    assert used and handle.active
    assert np.array_equal(got, ref)


def test_freeloc_handle_carries_the_lean_forward():
    """FreeLOC from Python gets longvideo's Wan forward with its handle (what the planner assumes),
    with the same video as without it (tiny Wan, FreeLOC active: 9 latent frames > the trained 3),
    and remove() takes both away."""
    from longvideo.methods.freeloc import FreeLOC
    from longvideo.models import wan

    pipe = wan.tiny_pipeline()
    videos = []
    for lean in (False, True):
        with FreeLOC(pipe, lean_wan_forward=lean) as handle:
            assert ("forward" in pipe.transformer.__dict__) == lean
            videos.append(handle("a cat", num_frames=33, height=32, width=32, num_inference_steps=2,
                                 generator=torch.Generator().manual_seed(0), output_type="latent").frames)
        assert "forward" not in pipe.transformer.__dict__
    assert torch.equal(videos[0], videos[1])


def test_exported_at_the_top_level():
    import longvideo

    assert longvideo.apply_lean_wan_forward is WM.apply_lean_wan_forward
