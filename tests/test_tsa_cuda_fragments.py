"""CPU emulation of the pipelined CUDA tiered_sparse_attention kernel's index math (issue 14 item 4).

No GPU runs here, so the lane / fragment mapping of `tsa_fwd_pipelined_kernel`
(csrc/tiered_sparse_attention_kernels.cu) is checked by emulating, in NumPy, the PTX semantics of
the instructions it uses -- `ldmatrix.x4` (plain and `.trans`) and `mma.m16n8k16` (fragment layouts
of the PTX ISA) -- with the kernel's address formulas (`pl_q_frag`, `pl_k_frag`, `pl_v_frag`), its
row ownership (warp w, row tile mt: rows 32 w + 16 mt + lane / 4 (+ 8)), its 32-key sub-tiles, the
reuse of the S accumulators as P's A fragments, and its epilogue. One attention tile computed that
way must equal softmax(Q K^T) V computed directly. The formulas below are copied from the kernel;
a change there must be mirrored here. A deliberately wrong mapping (the K fragment's matrices in
the wrong order) must fail. A partial entry's element mask and the NaN rule's path (V fragments
with non-finite values zeroed, then pl_nonfinite_v_rule's per-key formulas) must reproduce the
reference's where-selection; the legacy kernel's plain P V must not. (Checked by hand once: the
rule reading channel 2 t4 instead of 8 dt + 2 t4 fails test_emulated_mask_and_nan_rule.)

At the tile level, emulate_pipelined_op runs the kernel's algorithm (entry order, rotation variants
of K and Q with the re-rotations of band-edge entries, 32-key sub-tiles, element mask, combo
selection, online softmax, NaN rule) on the host inputs the op builds for it (the 128 x 64 block
schedule, the RoPE tables, the layout code and token edges) and must equal the reference op on every
layout, FreeLOC's official ones included, with NaN in v rows; K rotated with the q variant must fail.

The cp.async chunk ownership (thread t: key row t / 2, chunks 2 it + t % 2) must cover every
16-byte chunk of a 64-key tile exactly once, and give every thread the same number of chunks of
the rotated channels [0, 2R) (the in-place RoPE rotation needs no barrier and no idle threads).
"""
import numpy as np
import pytest

BN, BKH, NWARPS, MT = 64, 32, 4, 2


def ldmatrix_x4(smem, addr, trans=False):
    """regs[lane, i] = the two 16-bit elements lane receives of matrix i; matrix i's eight row
    addresses come from lanes 8 i .. 8 i + 7 (addr(lane) = (row, col) of an 8-element row)."""
    regs = np.zeros((32, 4, 2))
    for i in range(4):
        mat = np.stack([smem[r, c:c + 8] for r, c in (addr(8 * i + j) for j in range(8))])
        if trans:
            mat = mat.T
        for lane in range(32):
            regs[lane, i] = mat[lane // 4, 2 * (lane % 4):2 * (lane % 4) + 2]
    return regs


def mma16816(c, a, b):
    """c[lane, 4] += A(16 x 16) B(16 x 8) from the per-lane fragments (PTX ISA, m16n8k16 .f16/.bf16):
    a[lane, 4, 2]: a0 (row g, k 2t..2t+1), a1 (row g+8, same k), a2 (row g, k 8+2t..), a3 (row g+8, k 8+2t..);
    b[lane, 2, 2]: b0 (k 2t..2t+1, n g), b1 (k 8+2t.., n g); c: (row g, n 2t..2t+1), (row g+8, n 2t..2t+1)."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a[lane, 0], a[lane, 1]
        A[g, 8 + 2 * t:10 + 2 * t], A[g + 8, 8 + 2 * t:10 + 2 * t] = a[lane, 2], a[lane, 3]
        B[2 * t:2 * t + 2, g], B[8 + 2 * t:10 + 2 * t, g] = b[lane, 0], b[lane, 1]
    with np.errstate(invalid="ignore"):  # 0 * inf in the legacy variant's P V
        C = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        c[lane] += np.array([C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]])


def q_addr(row0, kk):  # pl_q_frag
    return lambda lane: (row0 + lane % 16, kk * 16 + (lane // 16) * 8)


def k_addr(n16, kk, wrong=False):  # pl_k_frag
    def addr(lane):
        mi = lane // 8
        if wrong:  # the deliberately wrong variant: matrices 1 and 2 swapped
            return n16 * 16 + (mi % 2) * 8 + lane % 8, kk * 16 + (mi // 2) * 8
        return n16 * 16 + (mi // 2) * 8 + lane % 8, kk * 16 + (mi % 2) * 8
    return addr


def v_addr(kk, dn):  # pl_v_frag (.trans)
    return lambda lane: (kk * 16 + ((lane // 8) % 2) * 8 + lane % 8, dn * 16 + (lane // 8 // 2) * 8)


def nonfinite_pairs(b):
    """nonfinite_halves per element: True where a 16-bit value is inf or NaN."""
    return ~np.isfinite(b)


def emulate_tile(Q, K, V, wrong_k=False, mask=None, nan_rule=True):
    """One CTA tile of the pipelined kernel: Q (128, D) staged rows, K / V (64, D) one key block
    (two 32-key sub-tiles), online softmax in log2 units as the kernel does (scale 1). mask (128, 64)
    bool: a partial entry's element mask (query row, key), applied by the kernel's formula; with
    nan_rule (and a V tile holding inf/NaN) P V runs on fragments with those values zeroed and
    pl_nonfinite_v_rule's formulas set the NaNs. Returns (128, D) outputs placed by the epilogue."""
    D = Q.shape[1]
    out = np.full((NWARPS * 16 * MT, D), np.nan)
    for warp in range(NWARPS):
        wrow = warp * 16 * MT
        o = np.zeros((MT, D // 8, 32, 4))
        m = np.full((MT, 32, 2), -1e30)
        l = np.zeros((MT, 32, 2))
        for half in range(BN // BKH):
            Kh, Vh = K[half * BKH:(half + 1) * BKH], V[half * BKH:(half + 1) * BKH]
            s = np.zeros((MT, BKH // 8, 32, 4))
            for kk in range(D // 16):  # pl_qk
                a = [ldmatrix_x4(Q, q_addr(wrow + mt * 16, kk)) for mt in range(MT)]
                for n16 in range(BKH // 16):
                    b = ldmatrix_x4(Kh, k_addr(n16, kk, wrong_k))
                    for mt in range(MT):
                        mma16816(s[mt, 2 * n16], a[mt], b[:, 0:2])
                        mma16816(s[mt, 2 * n16 + 1], a[mt], b[:, 2:4])
            s *= np.log2(np.e)
            if mask is not None:  # s[mt][j][x] <-> (row wrow + 16 mt + g + 8 (x >> 1), key 8 j + 2 t4 + (x & 1))
                for mt in range(MT):
                    for j in range(BKH // 8):
                        for lane in range(32):
                            g, t4 = lane // 4, lane % 4
                            for x in range(4):
                                row, col = wrow + mt * 16 + g + 8 * (x >> 1), half * BKH + j * 8 + 2 * t4 + (x & 1)
                                if not mask[row, col]:
                                    s[mt, j, lane, x] = -np.inf
            for mt in range(MT):  # online softmax: rows g -> x 0, 1; g + 8 -> x 2, 3; max over the quad
                for hh in range(2):
                    blk = s[mt][:, :, 2 * hh:2 * hh + 2]  # (NT, 32, 2)
                    mx = np.maximum(m[mt][:, hh], blk.max(axis=(0, 2)))
                    mx = np.array([mx[(ln // 4) * 4:(ln // 4) * 4 + 4].max() for ln in range(32)])
                    alpha = np.exp2(m[mt][:, hh] - mx)
                    m[mt][:, hh] = mx
                    pe = np.exp2(blk - mx[None, :, None])
                    s[mt][:, :, 2 * hh:2 * hh + 2] = pe
                    l[mt][:, hh] = l[mt][:, hh] * alpha + pe.sum(axis=(0, 2))
                    o[mt][:, :, 2 * hh:2 * hh + 2] *= alpha[None, :, None]
            flagged = nan_rule and mask is not None and not np.isfinite(V).all()
            for kk in range(BKH // 16):  # O += P V
                a = np.zeros((MT, 32, 4, 2))
                for mt in range(MT):
                    a[mt, :, 0] = s[mt, 2 * kk][:, 0:2]
                    a[mt, :, 1] = s[mt, 2 * kk][:, 2:4]
                    a[mt, :, 2] = s[mt, 2 * kk + 1][:, 0:2]
                    a[mt, :, 3] = s[mt, 2 * kk + 1][:, 2:4]
                for dn in range(D // 16):
                    b = ldmatrix_x4(Vh, v_addr(kk, dn), trans=True)
                    if flagged:
                        b = np.where(nonfinite_pairs(b), 0.0, b)
                    for mt in range(MT):
                        mma16816(o[mt, 2 * dn], a[mt], b[:, 0:2])
                        mma16816(o[mt, 2 * dn + 1], a[mt], b[:, 2:4])
            if flagged:  # pl_nonfinite_v_rule: key j of the sub-tile, the thread's channel pair 8 dt + 2 t4 (+1)
                for j in range(BKH):
                    for lane in range(32):
                        g, t4 = lane // 4, lane % 4
                        for dt in range(D // 8):
                            bad = nonfinite_pairs(Vh[j, dt * 8 + 2 * t4:dt * 8 + 2 * t4 + 2])
                            for mt in range(MT):
                                for hh in range(2):
                                    if mask[wrow + mt * 16 + g + 8 * hh, half * BKH + j]:
                                        for e in range(2):
                                            if bad[e]:
                                                o[mt, dt, lane, 2 * hh + e] = np.nan
        for mt in range(MT):  # epilogue: quad sums, rows wrow + 16 mt + g + 8 hh, channels 8 j + 2 t4 (+1)
            for hh in range(2):
                for lane in range(32):
                    g, t4 = lane // 4, lane % 4
                    tot = l[mt][(lane // 4) * 4:(lane // 4) * 4 + 4, hh].sum()
                    row = wrow + mt * 16 + g + 8 * hh
                    for j in range(D // 8):
                        out[row, j * 8 + 2 * t4:j * 8 + 2 * t4 + 2] = o[mt, j, lane, 2 * hh:2 * hh + 2] / tot
    return out


@pytest.mark.parametrize("D", [64, 128])
def test_emulated_fragments_compute_attention(D):
    rng = np.random.default_rng(D)
    Q, K, V = (rng.standard_normal((n, D)) / D ** 0.25 for n in (NWARPS * 16 * MT, BN, BN))
    got = emulate_tile(Q, K, V)
    logits = Q @ K.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    want = (p / p.sum(1, keepdims=True)) @ V
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # the deliberately wrong K fragment mapping (matrices 1 and 2 swapped) is caught
    bad = emulate_tile(Q, K, V, wrong_k=True)
    assert not np.allclose(bad, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("D,rope_pairs", [(64, 10), (128, 22), (128, 64), (64, 1)])
def test_cp_async_chunk_ownership(D, rope_pairs):
    """pl_load_kv / pl_rotate_k / pl_own_v_nonfinite: thread t owns row t / 2, chunks 2 it + t % 2."""
    nthreads = 2 * BN
    seen = np.zeros((BN, D // 8), dtype=int)
    rope_chunks = np.zeros(nthreads, dtype=int)
    for t in range(nthreads):
        for it in range(D // 16):
            c = 2 * it + t % 2
            seen[t // 2, c] += 1
            rope_chunks[t] += c * 8 < 2 * rope_pairs
    assert (seen == 1).all()
    # the rotated chunks [0, 2R) are spread over the threads: at most one chunk of difference
    assert rope_chunks.max() - rope_chunks.min() <= 1
    assert rope_chunks.sum() == BN * -(-2 * rope_pairs // 8)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_emulated_mask_and_nan_rule(value):
    """A partial entry: element mask by the kernel's formula, and non-finite v values in keys that
    some rows attend and others do not. The emulated kernel must give the reference's result (masked
    keys never reach a row: where-selection) with non-finite outputs exactly where the rule puts them;
    without the rule (the legacy kernel's P V) the masked rows catch them (0 * NaN) and it fails."""
    D = 64
    rng = np.random.default_rng(7)
    Q, K, V = (rng.standard_normal((n, D)) / D ** 0.25 for n in (NWARPS * 16 * MT, BN, BN))
    rows, cols = np.arange(NWARPS * 16 * MT)[:, None], np.arange(BN)[None, :]
    mask = (np.abs(rows % 50 - cols) < 6) | (rng.random((rows.size, BN)) < 0.2)
    mask[np.arange(BN) * 2, np.arange(BN)] = True  # every key attended by some row
    V[5] = value              # key 5: a whole row (sub-tile 0)
    V[40, 9] = value          # key 40, channel 9 (sub-tile 1, the second half of a pair)
    V[33, 16] = value         # channel 16 (the first half of a pair)
    got = emulate_tile(Q, K, V, mask=mask)
    logits = np.where(mask, Q @ K.T, -np.inf)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.einsum("ij,jc->ic", p, np.where(np.isfinite(V), V, 0.0))
    bad = (mask[:, :, None] & ~np.isfinite(V)[None]).any(1)      # the rule: attended non-finite v[., c]
    want[bad] = np.nan
    assert bad.any() and not bad.all()
    np.testing.assert_array_equal(~np.isfinite(got), bad)
    np.testing.assert_allclose(got[~bad], want[~bad], rtol=1e-10, atol=1e-12)
    legacy = emulate_tile(Q, K, V, mask=mask, nan_rule=False)
    assert (~np.isfinite(legacy) & ~bad).any()


def test_combo_selection_bits_match_the_logit_layout():
    """pl_qk_combo: bit i of sel[mt] is found for (row wrow + 16 mt + g + 8 ((i >> 1) & 1), key
    8 (i >> 2) + 2 t4 + (i & 1)) and read back for s[mt][j][x] as bit 4 j + x: the same element as
    the C fragment layout (row g + 8 (x >> 1), key 8 j + 2 t4 + (x & 1)) for every lane."""
    for lane in range(32):
        g, t4 = lane // 4, lane % 4
        found = {}
        for i in range(BKH // 2):
            found[i] = (g + 8 * ((i >> 1) & 1), (i >> 2) * 8 + 2 * t4 + (i & 1))
        for j in range(BKH // 8):
            for x in range(4):
                assert found[4 * j + x] == (g + 8 * (x >> 1), 8 * j + 2 * t4 + (x & 1))
    assert BKH // 2 <= 32  # one 32-bit word per row tile


# ----------------------------------------------------------------------------------------------
# the pipelined kernel's algorithm, tile by tile (the lane level is checked above), on the host
# inputs _cuda_impl builds: the 128 x 64 schedule, the RoPE tables, the layout code and edges
def _k_variant(c):
    return 0 if c == 0 else (c + 1 if c & 1 else c - 1)


def emulate_pipelined_op(q, k, v, T, L, SF, SW, SK, scale, freqs, vrpr, token_bands=None, token_tiers=None,
                         sink_rope=None, wrong=None):
    """tsa_fwd_pipelined_kernel for one (b, h): q, k, v (S, D) float64. Mirrors the kernel's entry
    loop (full then partial), the rotation variants (K by k_variant(c0) after the copy, Q re-rotated
    when the entry's first combo changes, both again per further combo and per sub-tile), the 32-key
    sub-tiles, the element mask (attended_at, unclamped frames), combo_at (clamped frames), the
    online softmax in log2 units and the NaN rule. wrong="k_variant": K rotated with the q variant."""
    import torch

    from longvideo.ops.plan import tiered as plan

    S, D = q.shape
    F, rope = S // T, freqs is not None
    sched = plan.build_schedule(S, T, L, SF, SW, SK, 128, 64, "cpu", vrpr, token_bands=token_bands,
                                token_tiers=token_tiers,
                                plain_positions=not (rope and (vrpr is not None or sink_rope is not None)))
    if rope:
        cos_t, sin_t = (t.double() for t in plan.rope_tables(F, freqs, vrpr, "cpu", sink_rope=sink_rope))
        R = freqs.numel()
    w1, w2 = plan.band_edges(vrpr)
    layout = plan.layout_code(token_bands, token_tiers)
    te0, te1, te2, te3 = plan.token_edges(token_bands, token_tiers)

    def rotated(x, toks, variant):  # rotate_chunk on rows `toks` (< S) of x
        out = x.clone()
        if not rope:
            return out
        fr = toks // T
        co, si = cos_t[variant, fr, 0:2 * R:2], sin_t[variant, fr, 1:2 * R:2]  # cs[ch], sn[ch + 1]
        x0, x1 = x[:, 0:2 * R:2], x[:, 1:2 * R:2]
        out[:, 0:2 * R:2], out[:, 1:2 * R:2] = x0 * co - x1 * si, x0 * si + x1 * co
        return out

    def attended_at(row, col):  # (n, 1) x (1, m) grids of token indices
        fq, pq, fk, pk = row // T, row % T, col // T, col % T
        dp, t = (pq - pk).abs(), row - col
        at = t.abs()
        if layout == 2:
            return (at <= te0) | ((at <= te1) & ((dp < SW) | (col < te2))) | ((col < te2) & (t > te1)) | \
                ((col > te3) & (-t > te1))
        dist = (fq - fk).abs()
        keep = (dist < L) | (fk < SK) | ((dist < SF) & (dp < SW))
        return keep & ((at <= te0) | (at >= te1)) if layout == 1 else keep

    def combo_at(row, col):
        fq, fk = torch.clamp(row // T, max=F - 1), torch.clamp(col // T, max=F - 1)
        t = row - col
        at = t.abs()
        if layout == 0:
            d = fq - fk
            ad = d.abs()
            return torch.where(ad < w1, 0, torch.where(ad < w2, torch.where(d > 0, 1, 2), torch.where(d > 0, 3, 4)))
        if layout == 1:
            return torch.where(at <= te0, 0, torch.where(at < te2, torch.where(t > 0, 1, 2), torch.where(t > 0, 3, 4)))
        return torch.where((col < te2) & (t > te1), 1, torch.where((col > te3) & (-t > te1), 2, 0))

    out = torch.zeros(S, D, dtype=torch.float64)
    log2e = 1.4426950408889634
    for qb in range(sched.num_q_blocks):
        q0 = qb * 128
        rows = torch.arange(q0, q0 + 128)
        qraw = torch.zeros(128, D, dtype=torch.float64)
        qraw[:max(0, min(128, S - q0))] = q[q0:q0 + 128]
        qtok = torch.clamp(rows, max=S - 1)
        Qs, cur_qv = rotated(qraw, qtok, 0), 0
        o = torch.zeros(128, D, dtype=torch.float64)
        m = torch.full((128,), -1e30, dtype=torch.float64)
        l = torch.zeros(128, dtype=torch.float64)
        nf = int(sched.full_cnt[qb])
        entries = [(int(sched.full_idx[qb, e]), int(sched.full_combo[qb, e]), False) for e in range(nf)]
        entries += [(int(sched.part_idx[qb, e]), int(sched.part_combo[qb, e]), True)
                    for e in range(int(sched.part_cnt[qb]))]
        for kb, bits, partial in entries:
            bits = bits or 1
            k0 = kb * 64
            n_in = max(0, min(64, S - k0))
            kraw, vt = torch.zeros(64, D, dtype=torch.float64), torch.zeros(64, D, dtype=torch.float64)
            kraw[:n_in], vt[:n_in] = k[k0:k0 + n_in], v[k0:k0 + n_in]
            ktok = torch.clamp(torch.arange(k0, k0 + 64), max=S - 1)
            c0 = (bits & -bits).bit_length() - 1
            kvar = (lambda c: c) if wrong == "k_variant" else _k_variant
            Kst = rotated(kraw, ktok, kvar(c0))
            if rope and c0 != cur_qv:
                Qs, cur_qv = rotated(qraw, qtok, c0), c0
            vbad = partial and not torch.isfinite(vt).all()
            multi = bits != (1 << c0)
            for half in range(2):
                cols = torch.arange(k0 + 32 * half, k0 + 32 * half + 32)
                if multi and half > 0:
                    Kst = rotated(kraw, ktok, kvar(c0))
                    if c0 != cur_qv:
                        Qs, cur_qv = rotated(qraw, qtok, c0), c0
                s = Qs @ Kst[32 * half:32 * half + 32].T
                if multi:
                    for c in range(c0 + 1, 5):
                        if not (bits >> c) & 1:
                            continue
                        Kst = rotated(kraw, ktok, kvar(c))
                        if c != cur_qv:
                            Qs, cur_qv = rotated(qraw, qtok, c), c
                        t = Qs @ Kst[32 * half:32 * half + 32].T
                        s = torch.where(combo_at(rows[:, None], cols[None, :]) == c, t, s)
                s = s * (scale * log2e)
                if partial:
                    att = (cols[None, :] < S) & attended_at(rows[:, None], cols[None, :])
                    s = torch.where(att, s, torch.tensor(-float("inf"), dtype=s.dtype))
                mx = torch.maximum(m, s.max(1).values)
                alpha = torch.exp2(m - mx)
                pe = torch.exp2(s - mx[:, None])
                l, m = l * alpha + pe.sum(1), mx
                vh = vt[32 * half:32 * half + 32]
                o = o * alpha[:, None] + pe @ (torch.where(torch.isfinite(vh), vh, 0.0) if vbad else vh)
                if vbad:
                    hit = (att.double() @ (~torch.isfinite(vh)).double()) > 0
                    o = torch.where(hit, torch.tensor(float("nan"), dtype=o.dtype), o)
        res = o * torch.where(l > 0, 1.0 / l, 0.0)[:, None]
        n_rows = max(0, min(128, S - q0))
        out[q0:q0 + n_rows] = res[:n_rows]
    return out


def _layout_case(layout, T, F, D):
    import torch

    freqs = 1.0 / (10000.0 ** (torch.arange(min(22, D // 4), dtype=torch.float64) / min(22, D // 4))).float()
    if layout == "plain":
        return (T, 2, 4, 3, 1, None, None, None), {}
    if layout == "rope":
        return (T, 2, 4, 3, 1, None, freqs, None), {}
    if layout == "vrpr":
        return (T, 2, 4, 3, 1, None, freqs, [2.0, 4.0, 2.0, 2.0, 5.0]), {}
    from longvideo.methods.freeloc import derive_params

    kw = derive_params(F, 21).settings(layout.split("_")[1], T).op_kwargs()
    vrpr = kw.pop("vrpr")
    return (T, kw.pop("local_frames"), kw.pop("stripe_frames"), kw.pop("stripe_width"), kw.pop("sink_frames"), None,
            freqs, vrpr), kw


@pytest.mark.parametrize("layout", ["plain", "rope", "vrpr", "official_vrpr", "official_tsa"])
def test_emulated_pipelined_algorithm_matches_reference(layout):
    """The kernel's algorithm on the real host inputs (S = 410: a partial last query tile) against the
    reference op, with NaN in v rows (the rule) and, for the VRPR layouts, a wrong K variant that fails."""
    import math

    import torch

    from longvideo.reference.tiered_sparse_attention import tiered_sparse_attention_reference as reference

    T, F, D = 10, 41, 64
    args, kw = _layout_case(layout, T, F, D)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 1, F * T, D, generator=g, dtype=torch.float64) for _ in range(3))
    v[0, 0, 133] = float("nan")
    v[0, 0, 257, 3] = float("nan")
    scale = 1 / math.sqrt(D)
    ref = reference(q, k, v, *args, **kw)[0, 0]
    T_, L, SF, SW, SK, _, freqs, vrpr = args
    got = emulate_pipelined_op(q[0, 0], k[0, 0], v[0, 0], T_, L, SF, SW, SK, scale, freqs, vrpr, **kw)
    np.testing.assert_array_equal(got.isnan().numpy(), ref.isnan().numpy())
    fin = ~ref.isnan()
    assert ref.isnan().any() and fin.any()
    torch.testing.assert_close(got[fin], ref[fin].double(), atol=2e-5, rtol=2e-5)  # the reference is float32
    if vrpr is not None or kw.get("sink_rope") is not None:
        bad = emulate_pipelined_op(q[0, 0], k[0, 0], v[0, 0], T_, L, SF, SW, SK, scale, freqs, vrpr, wrong="k_variant",
                                   **kw)
        assert not torch.allclose(bad[fin], ref[fin].double(), atol=1e-3, rtol=1e-3)
