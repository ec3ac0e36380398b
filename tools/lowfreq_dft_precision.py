"""Error of lowfreq_mix's single pass (T = 1) and plane path (T > 1) under each tensor-core matmul
precision, emulated.

The Triton single pass computes the 2-D DFT, filter and inverse as eight real matmul stages
(triton_kernels/lowfreq_mix.py). This script replays those stages, on the kernel's own DFT
matrices, in float32 on the CPU with the
operands of every matmul rounded as the GPU would ("tf32": mantissa truncated to 10 bits;
"tf32x3": the hi/lo split of Triton's 3xTF32; "ieee": plain float32) and reports, per filter and
shape, the max error vs a float64 reference and, for float16/bfloat16 inputs, the worst margin
|err| - (atol + rtol |ref|) against the backend's tolerance (negative = within). It informs the
choice in ``_dot_precision``; the GPU tests check the real kernels.

The plane path (passes A, B, C: 2 + 16 + 2 matmuls of the same kind) is replayed likewise on the
FreeInit shapes (``--planes``).

    python tools/lowfreq_dft_precision.py            # single pass
    python tools/lowfreq_dft_precision.py --planes   # plane path
"""
import sys

import torch

from longvideo.ops.lowfreq_mix import _TOLS
from longvideo.ops.plan.lowfreq import dft_matrices, dft_t_matrices
from longvideo.reference.lowfreq_mix import lowfreq_mix_reference


def tf32(t):
    return (t.contiguous().view(torch.int32) & ~((1 << 13) - 1)).view(torch.float32)


MATMULS = {
    "ieee": lambda a, b: a @ b,
    "tf32": lambda a, b: tf32(a) @ tf32(b),
    "tf32x3": lambda a, b: tf32(a) @ tf32(b) + (tf32(a) @ tf32(b - tf32(b)) + tf32(a - tf32(a)) @ tf32(b)),
}


def half_spectrum_filter(H, W, filt, d_s, d_t):
    """The filter on the half spectrum, from the reference's response to an impulse."""
    x = torch.zeros(1, 1, 1, H, W, dtype=torch.float64)
    x[..., 0, 0, 0] = 1
    return torch.fft.rfft2(lowfreq_mix_reference(x, torch.zeros_like(x), filt, d_s, d_t)[0, 0, 0]).real.float()


def single_pass(x, noise, lpf, mm):
    """The kernel's eight matmul stages on its own zero-padded DFT matrices (the plan layer's
    ``dft_matrices``)."""
    H, W = x.shape[-2:]
    cw, sw, ch, sh, icw, isw = dft_matrices(H, W, torch.device("cpu"))
    HP, WP = ch.shape[0], cw.shape[0]
    d = torch.nn.functional.pad(x.float() - noise.float(), (0, WP - W, 0, HP - H))
    lpf = torch.nn.functional.pad(lpf, (0, cw.shape[1] - lpf.shape[1], 0, HP - H))
    ar, ai = mm(d, cw), -mm(d, sw)
    br, bi = mm(ch, ar) + mm(sh, ai), mm(ch, ai) - mm(sh, ar)
    br, bi = br * lpf, bi * lpf
    er, ei = mm(ch, br) - mm(sh, bi), mm(ch, bi) + mm(sh, br)
    return noise.float() + (mm(er, icw) - mm(ei, isw))[..., :H, :W]


def spectrum_filter_3d(T, H, W, filt, d_s, d_t, order=4.0):
    """The symmetrised filter Ms on the (T, H, W//2+1) half spectrum, from the reference's impulse response."""
    x = torch.zeros(1, T, H, W, dtype=torch.float64)
    x[0, 0, 0, 0] = 1
    return torch.fft.rfftn(lowfreq_mix_reference(x, torch.zeros_like(x), filt, d_s, d_t, order)[0]).real.float()


def planes(x, noise, lpf, mm):
    """The plane path's matmul stages (triton_kernels/lowfreq_mix.py, passes A, B, C) on its own
    zero-padded DFT matrices; x, noise (L, T, H, W), lpf (T, H, W//2+1)."""
    L, T, H, W = x.shape
    cw, sw, ch, sh, icw, isw = dft_matrices(H, W, torch.device("cpu"))
    ct, st = dft_t_matrices(T, torch.device("cpu"))
    HP, WP, WHP, TP = ch.shape[0], cw.shape[0], cw.shape[1], ct.shape[0]
    F = torch.nn.functional
    d = F.pad(x.float() - noise.float(), (0, WP - W, 0, HP - H))
    ar, ai = mm(d, cw), -mm(d, sw)                                     # A: (L, T, HP, WHP)
    zr, zi = (F.pad(a.permute(0, 3, 2, 1), (0, TP - T)) for a in (ar, ai))  # (L, WHP, HP, TP)
    br, bi = mm(ch, zr) + mm(sh, zi), mm(ch, zi) - mm(sh, zr)          # B
    yr, yi = mm(br, ct) + mm(bi, st), mm(bi, ct) - mm(br, st)
    m = F.pad(lpf.permute(2, 1, 0), (0, TP - T, 0, HP - H, 0, WHP - lpf.shape[2])) / T
    yr, yi = yr * m, yi * m
    er, ei = mm(yr, ct) - mm(yi, st), mm(yi, ct) + mm(yr, st)
    gr, gi = mm(ch, er) - mm(sh, ei), mm(ch, ei) + mm(sh, er)
    gr, gi = (g.permute(0, 3, 2, 1)[:, :T] for g in (gr, gi))         # C: (L, T, HP, WHP)
    return noise.float() + (mm(gr, icw) - mm(gi, isw))[..., :H, :W]


def main_planes():
    torch.manual_seed(0)
    for shape, cases in (((4, 16, 64, 64), (("butterworth", 0.25, 0.25), ("gaussian", 0.25, 0.25), ("ideal", 0.25, 0.25))),
                         ((8, 21, 60, 104), (("butterworth", 0.25, 0.25), ("gaussian", 0.5, 0.5), ("ideal", 0.25, 0.25))),
                         ((2, 5, 33, 47), (("butterworth", 0.25, 0.25), ("gaussian", 0.4, 0.3)))):
        x, noise = torch.randn(shape), torch.randn(shape)
        for filt, d_s, d_t in cases:
            lpf = spectrum_filter_3d(*shape[-3:], filt, d_s, d_t)
            ref64 = lowfreq_mix_reference(x.double(), noise.double(), filt, d_s, d_t)
            for prec, mm in MATMULS.items():
                err = (planes(x, noise, lpf, mm).double() - ref64).abs().max()
                line = f"d_s={d_s} d_t={d_t} {shape} {filt:11s} {prec:6s} float32 max err {err:.2e}"
                for dt in (torch.float16, torch.bfloat16):
                    atol, rtol = _TOLS[dt]
                    xd, nd = x.to(dt), noise.to(dt)
                    ref = lowfreq_mix_reference(xd.float(), nd.float(), filt, d_s, d_t).to(dt).float()
                    got = planes(xd, nd, lpf, mm).to(dt).float()
                    margin = ((got - ref).abs() - (atol + rtol * ref.abs())).max()
                    line += f"  {str(dt)[6:]} margin {margin:+.1e}"
                print(line, flush=True)


def main():
    torch.manual_seed(0)
    for d_s, d_t in ((0.25, 1.0), (0.5, 1.0)):
        for shape in ((1, 4, 1, 40, 64), (1, 16, 1, 60, 104), (2, 3, 1, 33, 47)):
            x, noise = torch.randn(shape), torch.randn(shape)
            for filt in ("gaussian", "butterworth", "ideal"):
                lpf = half_spectrum_filter(*shape[-2:], filt, d_s, d_t)
                ref64 = lowfreq_mix_reference(x.double(), noise.double(), filt, d_s, d_t)[..., 0, :, :]
                for prec, mm in MATMULS.items():
                    err = (single_pass(x[..., 0, :, :], noise[..., 0, :, :], lpf, mm).double() - ref64).abs().max()
                    line = f"d_s={d_s} d_t={d_t} {shape} {filt:11s} {prec:6s} float32 max err {err:.2e}"
                    for dt in (torch.float16, torch.bfloat16):
                        atol, rtol = _TOLS[dt]
                        xd, nd = x.to(dt), noise.to(dt)
                        ref = lowfreq_mix_reference(xd.float(), nd.float(), filt, d_s, d_t).to(dt)[..., 0, :, :].float()
                        got = single_pass(xd[..., 0, :, :], nd[..., 0, :, :], lpf, mm).to(dt).float()
                        margin = ((got - ref).abs() - (atol + rtol * ref.abs())).max()
                        line += f"  {str(dt)[6:]} margin {margin:+.1e}"
                    print(line)


if __name__ == "__main__":
    main_planes() if "--planes" in sys.argv[1:] else main()
