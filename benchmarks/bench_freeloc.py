"""Benchmark suite ``freeloc``: one denoising step (one transformer forward, one CFG branch) of a
Wan2.1-T2V-1.3B-shaped transformer (random weights, 30 layers, 12 heads of 128, dim 1536, ffn
8960, text_dim 4096, 512 text tokens; bf16) at 832x480 (1560 tokens per latent frame) for 81, 161
and 321 video frames (21, 41, 81 latent frames; 21 is the trained length, where FreeLOC is a no-op):

- ``dense_sdpa``: the plain diffusers model (WanAttnProcessor -> SDPA, flash on H100);
- ``freeloc[longvideo]``: FreeLOC with the published layer list (17 TSA+VRPR layers, 13 VRPR
  layers), every layer one ``tiered_sparse_attention`` call (backend "auto");
- ``freeloc[official_flex]``: the same FreeLOC computed the official way: per layer one
  compiled FlexAttention call per VRPR band with that band's RoPE copies of q and k, restricted
  to the band (and, in TSA layers, to the tiers) by a block mask, merged by log-sum-exp. The
  mid and far bands are split by the sign of the frame distance (query later / key later), so
  this computes exactly our ``semantics="paper"`` (5 calls instead of the official 3, with the
  same blocks visited; block masks are built once, ``setup_ms``), which ``freeloc[longvideo]``
  runs here.

``flops``: linear layers (2 * params * tokens) + attention on the pairs actually attended
(4 * D per pair per head). quick=True: a 2-layer tiny transformer on CPU (reference op, eager
FlexAttention), checked for agreement in tests/test_freeloc.py.
"""
from __future__ import annotations

import time
import types

import torch

from longvideo.benchmarking import Case

SUITE = "freeloc"
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=32,
            freq_dim=32, ffn_dim=128, num_layers=2)


# ---------------------------------------------------------------------------------------------
# FreeLOC the official way (FlexAttention per band + LSE merge)
def _combo_positions(f, vrpr):
    """Temporal positions (q, k) per token for the five (band, sign) combos."""
    w1, w2, g1, g2, clip = (int(x) for x in vrpr)
    c1, c2 = w1 - w1 // g1, w2 - w2 // g2 - (w2 - w1) // g1
    return [(f, f), (f // g1 + c1, f // g1), (f // g1, f // g1 + c1),
            (torch.clamp(f // g2 + c2, max=clip), f // g2), (f // g2, torch.clamp(f // g2 + c2, max=clip))]


def _combo_mask_mod(T, combo, vrpr, tiers):
    w1, w2 = int(vrpr[0]), int(vrpr[1])
    local, stripe, width, sink = tiers

    def mask_mod(b, h, qi, kj):
        fi, fj = qi // T, kj // T
        d = fi - fj
        a = d.abs()
        band = [a < w1, (a >= w1) & (a < w2) & (d > 0), (a >= w1) & (a < w2) & (d < 0),
                (a >= w2) & (d > 0), (a >= w2) & (d < 0)][combo]
        if local is None:
            return band
        keep = (a < local) | ((a < stripe) & ((qi % T - kj % T).abs() < width)) | (fj < sink)
        return band & keep

    return mask_mod


def _flex_with_lse(flex, q, k, v, block_mask):
    """FlexAttention output and log-sum-exp (return_aux on new torch, return_lse on older)."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return flex(q, k, v, block_mask=block_mask, return_lse=True)
    out, aux = flex(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True))
    return out, aux.lse


class OfficialFlexProcessor:
    """FreeLOC's official computation of one Wan self-attention layer (see the module doc)."""

    def __init__(self, grid, mode, params_fn, flex, mask_cache):
        self.grid, self.mode, self.params_fn, self.flex, self.masks = grid, mode, params_fn, flex, mask_cache

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        from torch.nn.attention.flex_attention import create_block_mask

        from longvideo.benchmarks._flex import block_mask
        from longvideo.processors.wan import apply_rope_channels, project_qkv

        frames, T = self.grid.get(hidden_states.shape[1])
        p = self.params_fn(frames)
        q, k, v = project_qkv(attn, hidden_states)
        cos, sin = rotary_emb
        t_dim = self.grid.rope.t_dim
        S = q.shape[1]
        f = torch.arange(S, device=q.device) // T
        tiers = ((p.local_frames, p.stripe_frames, p.stripe_tokens(T), p.sink_frames) if self.mode == "tsa"
                 else (None, None, None, None))
        outs, lses = [], []
        rope = self.grid.rope
        for combo, (pq, pk) in enumerate(_combo_positions(f, p.vrpr)):
            key = (S, T, combo, p.vrpr, tiers, str(q.device))
            if key not in self.masks:
                mask_mod = _combo_mask_mod(T, combo, p.vrpr, tiers)
                self.masks[key] = (block_mask(mask_mod, S, q.device) if q.device.type == "cuda" else
                                   create_block_mask(mask_mod, None, None, S, S, device=q.device))
            # this band's RoPE copies: temporal rows at the band's positions, spatial rows as usual
            cq = torch.cat([rope.freqs_cos[pq, :t_dim][None, :, None].to(cos.dtype), cos[..., t_dim:]], -1)
            sq = torch.cat([rope.freqs_sin[pq, :t_dim][None, :, None].to(sin.dtype), sin[..., t_dim:]], -1)
            ck = torch.cat([rope.freqs_cos[pk, :t_dim][None, :, None].to(cos.dtype), cos[..., t_dim:]], -1)
            sk = torch.cat([rope.freqs_sin[pk, :t_dim][None, :, None].to(sin.dtype), sin[..., t_dim:]], -1)
            qc = apply_rope_channels(q, cq, sq, 0).transpose(1, 2)
            kc = apply_rope_channels(k, ck, sk, 0).transpose(1, 2)
            o, lse = _flex_with_lse(self.flex, qc, kc, v.transpose(1, 2), self.masks[key])
            outs.append(o.float())
            lses.append(lse.float())
        weights = torch.softmax(torch.stack(lses), dim=0)  # exact merge; empty bands have lse = -inf
        out = sum(o * torch.nan_to_num(w)[..., None] for o, w in zip(outs, weights))
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _install_official(transformer, modes, params_fn, flex, mask_cache):
    from longvideo.processors.wan import WanTokenGrid, self_attention_modules

    layers = self_attention_modules(transformer)
    grid = WanTokenGrid(transformer)
    originals = [a.processor for a in layers]
    for attn, mode in zip(layers, modes):
        if mode != "dense":
            attn.set_processor(OfficialFlexProcessor(grid, mode, params_fn, flex, mask_cache))

    def restore():
        for attn, proc in zip(layers, originals):
            attn.set_processor(proc)
        grid.remove()

    return restore


# ---------------------------------------------------------------------------------------------
def _flops(config, S, text_len, F, T, modes, params):
    from longvideo.ops.tiered_sparse_attention import schedule_density

    H, D = config["num_attention_heads"], config["attention_head_dim"]
    dim = H * D
    per_block = 4 * dim * dim + 2 * dim * dim + 2 * dim * config["ffn_dim"]  # self q,k,v,o; cross q,o; ffn
    linear = 2.0 * S * per_block * config["num_layers"] + 2.0 * text_len * 2 * dim * dim * config["num_layers"]
    cross = 4.0 * D * H * S * text_len * config["num_layers"]
    pairs = 0.0
    for mode in modes:
        if params is None or mode != "tsa":
            pairs += float(S) * S
        else:
            dens = schedule_density(F, T, params.local_frames, params.stripe_frames, params.stripe_tokens(T),
                                    params.sink_frames)
            pairs += dens["pair_density"] * S * S
    return linear + cross + 4.0 * D * H * pairs


def _cases_for(device, dtype, transformer, config, video_frames, height, width, text_len, trained, modes, impls):
    from longvideo.methods.freeloc import FreeLOC, derive_params

    F = (video_frames - 1) // 4 + 1
    lh, lw = height // 8, width // 8
    T = (lh // 2) * (lw // 2)
    S = F * T
    gen = torch.Generator(device=device).manual_seed(0)
    cin = config["in_channels"]
    latents = torch.randn(1, cin, F, lh, lw, device=device, dtype=dtype, generator=gen)
    text = torch.randn(1, text_len, config["text_dim"], device=device, dtype=dtype, generator=gen)
    timestep = torch.tensor([500.0], device=device)
    params = derive_params(F, trained)
    pipe = types.SimpleNamespace(transformer=transformer, longvideo_trained_latent_frames=trained,
                                 vae_scale_factor_temporal=4)
    label = f"{height}x{width}_{video_frames}f"
    base = dict(video_frames=video_frames, latent_frames=F, frame_tokens=T, seq_len=S, height=height, width=width,
                layers=config["num_layers"], heads=config["num_attention_heads"],
                head_dim=config["attention_head_dim"], dtype=str(dtype).replace("torch.", ""),
                tsa_layers=modes.count("tsa"), vrpr=None if params is None else list(params.vrpr))
    extra = {} if params is None else {"params": params.to_dict()}

    def forward():
        with torch.inference_mode():
            return transformer(latents, timestep, text, return_dict=False)[0]

    if "dense" in impls:
        yield (Case(SUITE, label, "dense_sdpa", forward, dict(base),
                          flops=_flops(config, S, text_len, F, T, modes, None), extra={"note": "plain diffusers"}))

    if "ours" in impls:
        def ours():
            # the paper's semantics: the ones the flex path below computes (docs/fidelity.md)
            method = FreeLOC(pipe, layer_config=modes, trained_frames=trained, semantics="paper")
            try:
                return forward()
            finally:
                method.remove()

        t0 = time.perf_counter()
        ours()  # builds and caches the block schedules (and compiles the kernels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield (Case(SUITE, label, "freeloc[longvideo]", ours, dict(base), kernel_profile=True,
                          flops=_flops(config, S, text_len, F, T, modes, params),
                          setup_ms=(time.perf_counter() - t0) * 1e3, extra=dict(extra)))

    if "official" in impls and params is not None:
        from torch.nn.attention.flex_attention import flex_attention

        from longvideo.benchmarks._flex import compiled_flex_attention

        flex = compiled_flex_attention() if device.type == "cuda" else flex_attention
        masks: dict = {}

        def official():
            restore = _install_official(transformer, modes, lambda n: derive_params(n, trained), flex, masks)
            try:
                return forward()
            finally:
                restore()

        t0 = time.perf_counter()
        official()  # builds the block masks, compiles FlexAttention
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield (Case(SUITE, label, "freeloc[official_flex]", official, dict(base),
                          flops=_flops(config, S, text_len, F, T, modes, params),
                          setup_ms=(time.perf_counter() - t0) * 1e3, extra=dict(extra)))


def _transformer(config, device, dtype):
    from diffusers import WanTransformer3DModel

    from longvideo.models.wan import _cast_transformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(device):
            tr = WanTransformer3DModel(**config)
    tr.eval()
    if dtype != torch.float32:
        _cast_transformer(tr, dtype)
    return tr


def cases(device: torch.device, quick: bool, profile: str = "full"):
    """A list (quick) or a generator of cases (full sizes; see _full_cases). ``budget``: 161 video
    frames only (41 latent: the first length where FreeLOC acts; at 81, the trained length, FreeLOC
    is a no-op)."""
    from longvideo.methods.freeloc import published_layer_config

    if quick:
        tr = _transformer(TINY, device, torch.float32)
        modes = ["tsa", "vrpr"]
        # 9 latent frames of 4x4 tokens, trained length 3 latent frames
        return list(_cases_for(device, torch.float32, tr, TINY, 33, 64, 64, 8, 3, modes, {"dense", "ours", "official"}))
    return _full_cases(device, published_layer_config(30), (161,) if profile == "budget" else (81, 161, 321))


def _full_cases(device, modes, frame_counts=(81, 161, 321)):
    """Lazily, one frame count at a time: each size's setup (first runs, FlexAttention compile) is
    done when the harness reaches it, so a run stopped by a time limit has recorded the sizes before."""
    dtype = torch.bfloat16
    tr = _transformer(WAN_1_3B, device, dtype)
    for frames in frame_counts:
        yield from _cases_for(device, dtype, tr, WAN_1_3B, frames, 480, 832, 512, 21, modes,
                              {"dense", "ours", "official"})

