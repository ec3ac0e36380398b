"""FreeLOC ``semantics="official"`` against a dense emulator of the released code's self-attention
(Wan2.1 fork, commit af7daa8), written for this test from reading that code (docs/fidelity.md):

- VRPR layers: one flash-attention call with window (W1 - 1) T on plain RoPE, and four FlexAttention
  calls whose masks cut the token distance q - kv at round_to_multiple(W1 T) and
  round_to_multiple(W2 T) (the next multiple of 128), each with its own RoPE copies of q and k
  (positions computed as the code does, in floating point then truncated), merged by their
  log-sum-exp;
- TSA layers: three FlexAttention calls (plain RoPE for the window / first-frame columns / stripe,
  re-encoded first-frame columns beyond the stripe, re-encoded keys past frame 78), merged the
  same way.

The emulator runs in float64 at the real geometry (1560 tokens per frame, 41 and 81 latent frames)
on sampled query rows with one small head; the package's side is the op's reference backend called
with the arguments FreeLOC hands the op. Deliberately wrong layouts (frame-granular edges, no
128-rounding, the paper's semantics, a missing late-key tier, the integer sink shift) must fail.
"""
from __future__ import annotations

import math

import pytest
import torch

from longvideo.methods import freeloc as FL
from longvideo.reference.tiered_sparse_attention import tiered_sparse_attention_reference

T = 1560
D = 16                      # Wan's split at D = 16: 8 temporal channels (4 pairs), then spatial ones
R = 4
FREQS = 1.0 / 10000.0 ** (torch.arange(0, 2 * R, 2, dtype=torch.float64) / (2 * R))
ATOL = 5e-6                 # float32 reference vs float64 emulator, outputs of mean size ~0.03 (measured <= 1.5e-6)


def _round_to_multiple(x):
    return math.ceil(x / 128) * 128


def _rotate(x, pos):
    """The released rope_apply_custom_fp on the temporal pairs: complex multiply by e^{i pos w}."""
    xc = torch.view_as_complex(x[..., :2 * R].reshape(*x.shape[:-1], R, 2).contiguous())
    ang = pos.double()[..., None] * FREQS
    rot = torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).flatten(-2)
    return torch.cat([rot, x[..., 2 * R:]], -1)


def _call(q, k, v, rows, pos_q, pos_k, mask):
    """One attention call of the released code on the sampled rows: (out, lse), empty rows -> (0, -inf)."""
    qr = _rotate(q[rows], pos_q[rows])
    kr = _rotate(k, pos_k)
    logits = (qr @ kr.T) / math.sqrt(D)
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    p = torch.where(mask, torch.exp(logits - lse.nan_to_num(0.0)[:, None]), torch.zeros(()))
    return p @ v, lse


def _merge(calls):
    outs = torch.stack([o for o, _ in calls])
    lses = torch.stack([lse for _, lse in calls])
    weights = torch.exp(lses - lses.max(0).values)
    weights = weights / weights.sum(0)
    return (outs * weights[..., None]).sum(0)


def emulate_vrpr_layer(q, k, v, rows, F):
    w1, w2, g1, g2 = {41: (12, 20, 2, 8), 81: (10, 14, 2, 8)}[F]   # runtime config frame_settings
    clip = 20                                                          # vrpr_clip_max
    f = torch.arange(F * T) // T
    wt1, wt2 = _round_to_multiple(T * w1), _round_to_multiple(T * w2)
    diag = (w1 - 1) * T                        # diag_size_token_per_frame (1560) * (W1 - 1)
    shift1 = (f // g1 + w1 - w1 / g1).long()   # float arithmetic, truncated by .to(long)
    far = torch.clip(f // g2 + w2 - w2 // g2 - (w2 - w1) // g1, max=clip).long()
    t = rows[:, None] - torch.arange(F * T)[None, :]
    return _merge([
        _call(q, k, v, rows, f, f, t.abs() <= diag),                             # flash window [diag, diag]
        _call(q, k, v, rows, shift1, f // g1, (t >= wt1) & (t < wt2)),          # mask_mod_2
        _call(q, k, v, rows, f // g1, shift1, (t > -wt2) & (t <= -wt1)),        # mask_mod_3
        _call(q, k, v, rows, far, f // g2, t >= wt2),                           # mask_mod_1
        _call(q, k, v, rows, f // g2, far, t <= -wt2),                          # mask_mod_4
    ])


def emulate_tsa_layer(q, k, v, rows, F):
    ws, ws2 = 8, 24                                   # radial_attention window_size_1 / _2
    group, window = 8, 12                             # rope_shift
    band = (ws2 - ws) // (ws / 2)
    width = band / (ws2 - ws)
    mask_width = (width * T) // 2
    wt1, wt2 = _round_to_multiple(T * ws), _round_to_multiple(T * ws2)
    first = _round_to_multiple(T * 1)
    late = _round_to_multiple(T * 78)
    S = F * T
    f = torch.arange(S) // T
    shifted = (f // group + window - window / group).long()
    j = torch.arange(S)[None, :]
    i = rows[:, None]
    t = i - j
    window_mask = t.abs() <= wt1
    first_columns = (j < first) & (t.abs() <= wt2)
    stripe = (t.abs() > wt1) & (t.abs() <= wt2) & ((i % T - j % T).abs() < mask_width)
    return _merge([
        _call(q, k, v, rows, f, f, window_mask | first_columns | stripe),      # mask_mod_3, plain RoPE
        _call(q, k, v, rows, shifted, f // group, (j < first) & (t > wt2)),    # mask_mod_1
        _call(q, k, v, rows, f // group, shifted, (j > late) & (t < -wt2)),    # mask_mod_2
    ])


_EMULATED: dict = {}


def _inputs(F):
    gen = torch.Generator().manual_seed(F)
    S = F * T
    q, k, v = (torch.randn(S, D, generator=gen, dtype=torch.float64) for _ in range(3))
    q = q * 2.0  # sharper attention: band and tier edges weigh more in the output
    picks = torch.randint(0, S, (4,), generator=gen)
    # rows near the edges: the first and last tokens, a query 24 frames in, one before the late keys
    edges = torch.tensor([5, S - 1, 24 * T + 700, 78 * T - 40 if F > 78 else 12 * T + 97])
    return q, k, v, torch.cat([edges, picks]).clamp(0, S - 1)


def _emulated(F, mode):
    if (F, mode) not in _EMULATED:
        q, k, v, rows = _inputs(F)
        emu = emulate_vrpr_layer if mode == "vrpr" else emulate_tsa_layer
        _EMULATED[(F, mode)] = emu(q, k, v, rows, F)
    return _EMULATED[(F, mode)]


def _ours(F, mode, **change):
    """The reference op on the arguments FreeLOC gives a layer in `mode`, on the sampled rows."""
    q, k, v, rows = _inputs(F)
    params = FL.derive_params(F, 21, semantics=change.pop("semantics", "official"))
    kw = params.settings(mode, T).op_kwargs()
    kw.update(change)
    local = kw.pop("local_frames")
    out = tiered_sparse_attention_reference(q.float()[None, None], k.float()[None, None], v.float()[None, None],
                                            T, local, scale=None, rope_t_freqs=FREQS.float(),
                                            query_rows=rows, **kw)
    return out[0, 0].double()


@pytest.mark.parametrize("F", [41, 81])
@pytest.mark.parametrize("mode", ["vrpr", "tsa"])
def test_official_semantics_equal_the_emulated_released_code(F, mode):
    want = _emulated(F, mode)
    got = _ours(F, mode)
    assert (got - want).abs().max().item() < ATOL


def _wrong_layouts(F):
    """Layouts that differ from the released code in one respect each (name -> (mode, change)),
    split over the two lengths to keep the test short (each call is a real-geometry reference run)."""
    p = FL.derive_params(F, 21)
    w1, w2 = p.w1, p.w2
    tiers = list(p.official_token_tiers(T))
    if F == 41:
        return {
            # frame-granular band edges (the exact band ends and the shifted bands start at frame edges)
            "vrpr_frame_granular_edges": ("vrpr", dict(token_bands=[w1 * T - 1, w1 * T, w2 * T])),
            # frame-granular local window (8 frames) instead of the 128-rounded token window
            "tsa_frame_granular_window": ("tsa", dict(token_tiers=[8 * T - 1] + tiers[1:])),
        }
    return {
        # token bands without the 128-token rounding of the shifted bands' start
        "vrpr_no_rounding": ("vrpr", dict(token_bands=[(w1 - 1) * T, w1 * T, w2 * T])),
        "vrpr_paper": ("vrpr", dict(semantics="paper")),
        # the sink shift in integer arithmetic: 12 - 12 // 8 = 11 instead of the code's 10
        "tsa_integer_sink_shift": ("tsa", dict(sink_rope=[8, 11])),
        "tsa_no_late_keys": ("tsa", dict(token_tiers=tiers[:3] + [F * T - 1])),
    }


@pytest.mark.parametrize("F", [41, 81])
def test_wrong_layouts_fail_the_emulator(F):
    for name, (mode, change) in _wrong_layouts(F).items():
        err = (_ours(F, mode, **change) - _emulated(F, mode)).abs().max().item()
        assert err > 20 * ATOL, f"{name} at F={F} passed the emulator (max abs {err:.2e})"


def test_official_layout_values_at_the_released_geometry():
    """The token edges at 1560 tokens per frame, derived by hand from the released code."""
    p41, p81 = FL.derive_params(41, 21), FL.derive_params(81, 21)
    assert p41.official_token_bands(T) == (11 * 1560, 147 * 128, 244 * 128)    # 17160, 18816, 31232
    assert p81.official_token_bands(T) == (9 * 1560, 122 * 128, 171 * 128)     # 14040, 15616, 21888
    assert p81.official_token_tiers(T) == (12544, 37504, 1664, 121728)
    assert p41.official_token_tiers(T) == (12544, 37504, 1664, 41 * T - 1)     # no late keys at 41
    assert p81.official_stripe_tokens(T) == 195 and p81.official_sink_rope() == (8, 10)
    assert p81.settings("vrpr", T).vrpr[5] == 5 and p41.settings("vrpr", T).vrpr[5] == 6
    # the generalisation: the last 3 frames from 4 L - 3 = 81 latent frames on, none below
    assert FL.derive_params(80, 21).official_late_frame() is None
    assert FL.derive_params(121, 21).official_late_frame() == 118


def test_recorded_densities_are_current():
    """docs/fidelity.md's densities come from benchmarks/results/freeloc_semantics_cpu.json
    (tools/freeloc_semantics.py); recomputed here from the current layouts, they must not drift."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("freeloc_semantics_tool", root / "tools" / "freeloc_semantics.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    record = json.loads((root / "benchmarks" / "results" / "freeloc_semantics_cpu.json").read_text())
    for r in record["results"]:
        F, mode = r["latent_frames"], r["layer"]
        assert tool.density(F, mode, "official") == pytest.approx(r["density_official"], abs=1e-12)
        assert tool.density(F, mode, "paper") == pytest.approx(r["density_paper"], abs=1e-12)
    by = {(r["latent_frames"], r["layer"]): r for r in record["results"]}
    assert by[(81, "tsa")]["density_official"] > by[(81, "tsa")]["density_paper"]  # the late keys and wider sink
    assert by[(41, "vrpr")]["density_official"] < 1.0                            # the band gap
