"""Reference consistent self-attention (StoryDiffusion; Ouroboros' SACFA): explicit concatenation.

Row (image or frame) ``b`` of a batch of ``B`` images with ``N`` tokens each attends, with ONE
softmax, over the keys/values

    K_b = concat( k[b],                                   # its own N tokens
                  { k_flat[t] : t in sample_idx, src(t) != b, group(src(t)) == group(b),
                                (window < 0 or |src(t) - b| <= window) },
                  bank_k  or  bank_k[group(b)] )          # optional bank rows

with ``k_flat[t] = k[t // N, :, t % N]``, ``src(t) = t // N`` and ``group(i) = i // group_size``:

    out[b] = softmax(q[b] K_b^T * scale) V_b             (StoryDiffusion Alg. 1; SACFA Eq. 4)

i.e. exactly SDPA over the explicitly concatenated keys. NaN/inf rule (shared by every backend):
only the keys/values of K_b, V_b reach row b; a NaN in q[b, :, i] or in a key of K_b makes the whole
output row NaN, a NaN in channel c of a value of V_b makes channel c of every query of row b NaN. This module builds that concatenation
per row (readable, slow, memory-hungry): it is the ground truth of the fused kernels. Scores,
softmax and products are in float32; the result is returned in q's dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def _extras(sample_idx: torch.Tensor, N: int, b: int, group_size: int, window: int):
    """(src, pos) of the sampled tokens that row ``b`` sees, in ``sample_idx`` order."""
    idx = sample_idx.long()
    src = torch.div(idx, N, rounding_mode="floor")
    pos = idx - src * N
    sel = (src != b) & (torch.div(src, group_size, rounding_mode="floor") == b // group_size)
    if window >= 0:
        sel &= (src - b).abs() <= window
    return src[sel], pos[sel]


def _bank_rows(bank: Optional[torch.Tensor], b: int, group_size: int):
    if bank is None:
        return None
    return bank if bank.dim() == 3 else bank[b // group_size]  # shared (H,E,D) or per group


def _row_kv(k, v, b, src, pos, bank_k, bank_v, group_size):
    """The explicitly concatenated (H, L, D) keys and values of row ``b``."""
    keys = [k[b], k[src, :, pos].transpose(0, 1)]  # advanced indices first: (m, H, D) -> (H, m, D)
    vals = [v[b], v[src, :, pos].transpose(0, 1)]
    bk, bv = _bank_rows(bank_k, b, group_size), _bank_rows(bank_v, b, group_size)
    if bk is not None:
        keys.append(bk)
        vals.append(bv)
    return torch.cat(keys, dim=1).float(), torch.cat(vals, dim=1).float()


def consistent_attention_reference_with_lse(q, k, v, sample_idx, group_size: int, window: int = -1,
                                            bank_k=None, bank_v=None, scale: Optional[float] = None):
    """As :func:`consistent_attention_reference`, also returning the float32 log-sum-exp
    ``lse[b, h, i] = log(sum_j exp(q_i . K_b[j] * scale))`` of shape (B, H, N)."""
    B, H, N, D = q.shape
    if q.numel() == 0:  # empty input, empty result (D == 0 included: out has q's shape)
        return q.new_empty(q.shape), torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    outs, lses = [], []
    for b in range(B):
        src, pos = _extras(sample_idx, N, b, group_size, window)
        K, V = _row_kv(k, v, b, src, pos, bank_k, bank_v, group_size)
        scores = torch.matmul(q[b].float(), K.transpose(-1, -2)) * scale  # (H, N, L)
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse[..., None]), V))
        lses.append(lse)
    return torch.stack(outs).to(q.dtype), torch.stack(lses)


def consistent_attention_reference(q, k, v, sample_idx, group_size: int, window: int = -1,
                                   bank_k=None, bank_v=None, scale: Optional[float] = None):
    """Consistent self-attention by explicit per-row concatenation (see the module docstring).

    q, k, v: (B, H, N, D); sample_idx: sorted unique int indices into [0, B*N); bank_k/bank_v:
    (H, E, D) or (B // group_size, H, E, D). Differentiable by autograd in q, k, v and the bank.
    """
    return consistent_attention_reference_with_lse(q, k, v, sample_idx, group_size, window,
                                                   bank_k, bank_v, scale)[0]


def consistent_attention_backward_reference(grad_out, q, k, v, sample_idx, group_size: int, window: int = -1,
                                            bank_k=None, bank_v=None, scale: Optional[float] = None):
    """Gradients (dq, dk, dv, dbank_k, dbank_v) of the reference, in closed form, float32 inside.

    Per row, with P = softmax(S), S = q K^T * scale, O = P V and dO the incoming gradient:
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dq = scale dS K, dK = scale dS^T q.
    The rows of dK/dV that belong to sampled tokens are scatter-added back to their source image;
    the bank rows are summed over every row that reads them. dbank_* are None without a bank.
    """
    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dq = torch.empty(B, H, N, D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, N, H, D, dtype=torch.float32, device=q.device)  # token-major for index_put_
    dv = torch.zeros_like(dk)
    dbk = None if bank_k is None else torch.zeros(bank_k.shape, dtype=torch.float32, device=q.device)
    dbv = None if bank_v is None else torch.zeros_like(dbk)
    for b in range(B):
        src, pos = _extras(sample_idx, N, b, group_size, window)
        K, V = _row_kv(k, v, b, src, pos, bank_k, bank_v, group_size)
        qb, dO = q[b].float(), grad_out[b].float()
        S = torch.matmul(qb, K.transpose(-1, -2)) * scale
        P = torch.softmax(S, dim=-1)
        O = torch.matmul(P, V)
        dV = torch.matmul(P.transpose(-1, -2), dO)                 # (H, L, D)
        dP = torch.matmul(dO, V.transpose(-1, -2))
        dS = P * (dP - (dO * O).sum(-1, keepdim=True))
        dq[b] = torch.matmul(dS, K) * scale
        dK = torch.matmul(dS.transpose(-1, -2), qb) * scale          # (H, L, D)
        m = src.numel()
        dk[b] += dK[:, :N].transpose(0, 1)
        dv[b] += dV[:, :N].transpose(0, 1)
        dk.index_put_((src, pos), dK[:, N:N + m].transpose(0, 1), accumulate=True)
        dv.index_put_((src, pos), dV[:, N:N + m].transpose(0, 1), accumulate=True)
        if dbk is not None:
            tgt_k = dbk if dbk.dim() == 3 else dbk[b // group_size]
            tgt_v = dbv if dbv.dim() == 3 else dbv[b // group_size]
            tgt_k += dK[:, N + m:]
            tgt_v += dV[:, N + m:]
    return (dq.to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype),
            None if dbk is None else dbk.to(bank_k.dtype), None if dbv is None else dbv.to(bank_v.dtype))
