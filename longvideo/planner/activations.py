"""Activation models: one model call (transformer, UNet, VAE, text encoder) walked op by op.

Each function here mirrors the forward pass of a diffusers / transformers model as the installed
versions run it (diffusers 0.42: ``WanTransformer3DModel``, ``SkyReelsV2Transformer3DModel``,
``UNet2DConditionModel``, ``UNetMotionModel``, ``AutoencoderKLWan``, ``AutoencoderKL``; the
longvideo attention processors), at the granularity of the tensors whose size grows with the
tokens: every tensor of (batch x tokens x channels) size or larger is created and dropped in the
order the code does it, through :class:`~longvideo.planner.sim.Sim`, which keeps the running
total and the peak. Tensors that do not grow with the tokens (time embeddings of a scalar
timestep, norm statistics (B, S, 1), log-sum-exps, index tensors) are left out.

Granularity per model: the Wan-family transformer (``wan_call``), the UNets (``unet_call``: the
module tree of a real or meta-device model is walked: resnets, Transformer2DModel blocks, motion
modules, skip connections), the Wan causal VAE decoder (``wan_vae_decode``: per latent frame,
with its feature cache and the growing output), its encoder (``wan_vae_encode``: the first frame,
then 4 frames per call, with its feature cache; plain and tiled; Wan 2.2's residual down blocks),
the KL VAE decoder (``kl_vae_decode``), and image-to-video's image path (the CLIP image encoder:
``clip_vision_call``; ``WanImageToVideoPipeline.prepare_latents``: ``wan_i2v_prepare_latents``;
FIFO's streamed condition: ``wan_vae_encode_stream_step``) are mirrored op by op; text encoders
(``text_encoder_peak``) are a formula (coarse).

What the kernels allocate (``Device``):

* ``cuda``: ``torch.nn.RMSNorm`` runs the fused kernel (one output; saves its input and the
  float32 rstd for backward); SDPA is a flash-style kernel (output and a float32 log-sum-exp,
  no S x S buffer; output in the query's (B, S, H, D) layout, so Wan's ``flatten`` is a view);
  the longvideo ops' Triton backends: ``tiered_sparse_attention`` allocates pre-rotated copies
  of q's and k's temporal channels (2 x variants x B*H*S*RP, RP = next power of two >= the
  temporal channels; 5 variants with VRPR, 3 for FreeLOC's official TSA layers, 1 without) -- device workspace that
  :class:`~longvideo.planner.tracker.LiveTensorTracker` cannot see on a CPU, reported as the
  component ``attention workspace``; ``consistent_attention`` reads the sampled tokens in place
  (output and lse only).
* ``cpu``: ``RMSNorm`` is torch's composite (float32 upcast, ``pow``, ``mean``, ``rsqrt``, two
  ``mul``: three float32 temporaries; saves the upcast and the normalised tensor for backward);
  SDPA's CPU flash kernel (same outputs as on CUDA); the longvideo ops' reference backends
  (their internal S x S work is inside one dispatch: invisible to the tracker and not modelled).

Autograd (``Sim(grad=True)``): every op saves what its derivative formula needs (``linear``: its
input; ``mul``: each operand whose partner requires grad; ``layer_norm``: its input; ``gelu``:
its input; SDPA / the longvideo ops: q, k, v, output, lse). By default all parameters require
grad (diffusers models do unless frozen), so products with modulation tensors save both sides:
the whole-call guidance Ouroboros used before its guidance pass (the planner's
``guidance_impl="whole_call"``). ``Sim(grad=True, frozen=True)``: the parameters do not require
grad, only the input does (Ouroboros' guidance pass, ``FIFODiffusion._guidance_gradient``): what
is saved only for a parameter's gradient is not (``Sim.save_w``: a linear layer's input, the
norm side of a product with a modulation, the time and text embeddings' graph), while a
convolution still saves its input (one derivative formula for input and weight) and the norms,
activations and attention save theirs. The guidance pass also stops part-way
(``WanCall.stop_after``, ``UNetCall.stop_after``; :func:`wan_guidance_pass`,
:func:`unet_guidance_pass`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .sim import Sim

F32 = 4


@dataclass(frozen=True)
class Device:
    """Which kernels run: see the module docstring. ``kind`` "cuda" or "cpu"."""

    kind: str = "cuda"
    tsa_backend: str = "triton"          # tiered_sparse_attention on cuda: triton | cuda | reference
    consistent_backend: str = "triton"   # consistent_attention on cuda: triton | cuda | reference

    @property
    def fused_rms_norm(self) -> bool:
        return self.kind == "cuda"


CUDA = Device("cuda")
CPU = Device("cpu", tsa_backend="reference", consistent_backend="reference")


# ---------------------------------------------------------------------------------------------
# Wan-family transformers
@dataclass(frozen=True)
class WanArch:
    """The sizes of a WanTransformer3DModel / SkyReelsV2Transformer3DModel config."""

    num_layers: int
    heads: int
    head_dim: int
    ffn_dim: int
    in_channels: int = 16
    out_channels: int = 16
    patch: tuple = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    cross_attn_norm: bool = True
    skyreels: bool = False
    num_frame_per_block: int = 1
    image_dim: int = 0          # Wan 2.1 I2V: width of the CLIP image features (config image_dim; 0: none)

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def rope_t_channels(self) -> int:
        """Channels of a head given to the temporal RoPE axis (diffusers' WanRotaryPosEmbed)."""
        d = self.head_dim
        return d - 4 * (d // 6)

    def tokens(self, frames: int, h: int, w: int) -> int:
        pt, ph, pw = self.patch
        return (frames // pt) * (h // ph) * (w // pw)

    @classmethod
    def from_config(cls, cfg: dict, skyreels: bool = False) -> "WanArch":
        return cls(num_layers=int(cfg["num_layers"]), heads=int(cfg["num_attention_heads"]),
                   head_dim=int(cfg["attention_head_dim"]), ffn_dim=int(cfg["ffn_dim"]),
                   in_channels=int(cfg.get("in_channels", 16)),
                   out_channels=int(cfg.get("out_channels") or cfg.get("in_channels", 16)),
                   patch=tuple(cfg.get("patch_size", (1, 2, 2))), text_dim=int(cfg.get("text_dim", 4096)),
                   freq_dim=int(cfg.get("freq_dim", 256)), cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
                   skyreels=skyreels, num_frame_per_block=int(cfg.get("num_frame_per_block", 1) or 1),
                   image_dim=int(cfg.get("image_dim") or 0))


@dataclass
class WanCall:
    """One transformer call. ``timestep``: "scalar" (one per sample: the pipelines, FreeLOC),
    "token" (Wan's per-token 2-D timestep as diffusers embeds it: Wan 2.2 TI2V's pipeline), "runs"
    (a per-token timestep constant over each frame under longvideo's frame-wise modulation,
    processors/wan_modulation.py: one embedding per frame, broadcast: FIFO / Ouroboros on Wan) or
    "frame" (SkyReels-V2's per-frame diffusion forcing). ``self_attn``: "sdpa" (diffusers' processor), "freeloc"
    (longvideo's tiered processor; ``freeloc_modes`` per layer: "tsa" / "vrpr" / "dense"),
    "ouroboros" (longvideo's Ouroboros processor; ``use_op``: through consistent_attention, as in
    guided calls; ``feature_layers``: layers whose keys are recorded; ``record_maps``: subject maps
    from the cross-attention)."""

    batch: int
    frames: int                 # latent frames
    height: int                 # latent height
    width: int                  # latent width
    text_len: int = 512
    itemsize: int = 2
    timestep: str = "scalar"
    self_attn: str = "sdpa"
    freeloc_modes: Optional[list] = None
    freeloc_semantics: str = "official"   # FreeLOC's: the TSA layers' token tiers rotate 3 variants, not 5
    use_op: bool = False
    feature_layers: tuple = ()
    record_maps: bool = False
    maps_frames: int = 0        # frames of the conditional half whose maps are recorded (the window)
    stop_after: Optional[int] = None   # the pass ends right after this block's attn1 (guidance pass)
    context_parallel: int = 1   # Ulysses over N ranks (longvideo/parallel.py): one rank's share, see wan_call
    image_len: int = 0          # Wan 2.1 I2V: CLIP image tokens given (257 for ViT-H/14 at 224 px); needs image_dim
    lean: bool = False          # longvideo's Wan forward (processors/wan_modulation.py): without autograd,
    #                             modulation in place and residuals into one float32 buffer


def _rms_norm(sim: Sim, x, e: int, dev: Device, tag: str, input_grad: bool = True):
    """torch.nn.RMSNorm(x) (with weight): returns the output handle; x is not freed.
    input_grad: whether x requires grad (False: the text's keys, whose graph holds parameters only)."""
    save = sim.save if input_grad else sim.save_w
    if dev.fused_rms_norm:
        out = sim.new(x.numel, e, tag)
        save(x)
        return out
    up = sim.cast(x, F32, tag)                       # input.to(float32)
    sq = sim.new(x.numel, F32, tag)                  # pow(2) -> mean
    save(up)
    sim.free(sq)
    r1 = sim.new(x.numel, F32, tag)                  # x * rsqrt(...)
    r2 = sim.new(x.numel, F32, tag)                  # * weight
    sim.save_w(r1)                                   # * weight
    sim.free(r1)
    out = sim.cast(r2, e, tag)                       # .type_as(input)
    sim.free(r2, up)
    return out


def _modulated_norm(sim: Sim, hidden, X: int, e: int, token_mod: bool, tag: str):
    """(norm(hidden.float()) * (1 + scale) + shift).type_as(hidden); FP32LayerNorm without affine."""
    hf = sim.cast(hidden, F32, tag)
    n = sim.new(X, F32, tag)                          # layer_norm
    sim.save(hf)
    sim.free(hf)
    one_plus = sim.new(X, F32, tag) if token_mod else None   # 1 + scale: (B, S, d) per token, else (B, 1, d)
    prod = sim.new(X, F32, tag)
    sim.save_w(n)                                     # mul(n, 1 + scale): each side for the other
    sim.save(one_plus)
    sim.free(n, one_plus)
    summ = sim.new(X, F32, tag)                       # + shift
    sim.free(prod)
    out = sim.cast(summ, e, tag)
    sim.free(summ)
    return out


def _modulated_norm_lean(sim: Sim, hidden, X: int, e: int, tag: str):
    """longvideo's Wan forward without autograd: norm(hidden.float()).mul_(1 + scale).add_(shift),
    cast in the same expression (processors/wan_modulation.py)."""
    hf = sim.cast(hidden, F32, tag)
    n = sim.new(X, F32, tag)                          # layer_norm; then in place
    sim.free(hf)
    out = sim.cast(n, e, tag)
    sim.free(n)
    return out


def _gated_residual_lean(sim: Sim, branch, X: int, e: int, tag: str):
    """longvideo's Wan forward without autograd: mul(branch, gate, out=buf).add_(hidden), cast:
    one float32 buffer instead of diffusers' three (the hidden's copy, the product, the sum)."""
    buf = sim.new(X, F32, "residual (float32)" if e != F32 else tag)
    out = sim.cast(buf, e, tag)
    sim.free(buf)
    return out


def _gated_residual(sim: Sim, hidden, branch, X: int, e: int, branch_float_copy: bool, tag: str):
    """(hidden.float() + branch[.float()] * gate).type_as(hidden): returns the new hidden (tag);
    the float32 temporaries are tagged "residual (float32)"."""
    t32 = "residual (float32)"
    hf = sim.cast(hidden, F32, t32)
    bf = sim.cast(branch, F32, t32) if branch_float_copy else sim.ref(branch)
    prod = sim.new(X, F32, t32)
    sim.save_w(bf)      # mul(branch, gate) saves the branch for the gate (a view of the modulation)
    sim.free(bf)
    s = sim.new(X, F32, t32 if e != F32 else tag)
    sim.free(prod, hf)
    out = sim.cast(s, e, tag)
    sim.free(s)
    return out


def _wan_rope_diffusers(sim: Sim, x, numel: int, e: int, tag: str):
    """diffusers' apply_rotary_emb (and Ouroboros' _wan_rope): out = empty_like(x); out[..., 0::2] =
    x1 cos - x2 sin; out[..., 1::2] = x1 sin + x2 cos, products in the tables' float32."""
    out = sim.new(numel, e, tag)
    half = numel // 2
    for _ in range(2):                                   # even, then odd channels
        a = sim.new(half, F32, tag)
        b = sim.new(half, F32, tag)
        c = sim.new(half, F32, tag)                      # a - b (a + b)
        sim.free(a, b)
        sim.free(c)
    return out


def _rope_channels(sim: Sim, x, B: int, S: int, H: int, D: int, start: int, e: int, tag: str):
    """longvideo.processors.wan.apply_rope_channels: channels [start, D) rotated like diffusers,
    then concatenated back: stack of two float32 halves, type_as, cat."""
    rot = B * S * H * (D - start)
    half = rot // 2
    parts = []
    for _ in range(2):
        a = sim.new(half, F32, tag)
        b = sim.new(half, F32, tag)
        parts.append(sim.new(half, F32, tag))
        sim.free(a, b)
    st = sim.new(rot, F32, tag)                          # torch.stack(...).flatten
    sim.free(*parts)
    cast = sim.cast(st, e, tag)
    sim.free(st)
    out = sim.new(B * S * H * D, e, tag)                 # torch.cat((x[..., :start], rot), -1)
    sim.free(cast)
    return out


def _fp32_layer_norm(sim: Sim, numel: int, e: int, tag: str):
    """diffusers' FP32LayerNorm on a tensor of `numel` elements of itemsize `e`: layer_norm of the
    float32 input, cast back to `e`; returns the output handle (the input is the caller's)."""
    if e == F32:
        return sim.new(numel, e, tag)
    up = sim.new(numel, F32, tag)
    ln = sim.new(numel, F32, tag)
    sim.free(up)
    out = sim.cast(ln, e, tag)
    sim.free(ln)
    return out


def _attention_out(sim: Sim, q, k, v, numel_out: int, e: int, tag: str):
    """A flash-style attention call (SDPA, the longvideo ops): output (and a float32 lse, not
    modelled: B*H*S*4 bytes); saves q, k, v, out for backward."""
    out = sim.new(numel_out, e, tag)
    sim.save(q, k, v, out)
    return out


def _linear(sim: Sim, x, numel_out: int, e: int, tag: str):
    """nn.Linear: the output; saves its input."""
    out = sim.new(numel_out, e, tag)
    sim.save_w(x)
    return out


def wan_call(sim: Sim, a: WanArch, c: WanCall, dev: Device = CUDA) -> Optional[list]:
    """One WanTransformer3DModel / SkyReelsV2Transformer3DModel forward (see the module docstring).

    Tags: "hidden" (the residual stream, patch embedding, output), "timestep" (time embeddings and
    per-token modulation inputs), "modulation" (the float32 per-block shift/scale/gate),
    "norm" (norms and their float32 copies), "attention" (q, k, v, RoPE, attention outputs),
    "attention workspace" (device workspace of the attention kernel), "cross-attention",
    "ffn", "text" (projected text states), "rope" (the RoPE tables), "maps" (Ouroboros' subject
    maps). Handles are freed where the Python code drops its last reference (a block's input
    lives until the block returns: the model's loop holds it).

    ``c.stop_after``: the call ends as block ``stop_after``'s attn1 returns (Ouroboros' guidance
    pass raises there): the locals die, the graph upstream of the recorded keys stays (see
    :func:`wan_guidance_pass`); returns the tensors that block saved (None otherwise).

    ``c.context_parallel`` N > 1: what ONE rank of ``longvideo.parallel.enable_context_parallel``
    over N ranks allocates (Ulysses). The patch embedding and the RoPE tables are whole on every
    rank (the split takes views); a per-token timestep is split before the condition embedder;
    block 0's input is a view of the whole patched sequence (alive until block 0 returns); every
    block holds S/N tokens outside self-attention; self-attention projects S/N tokens, turns q, k, v
    into all S tokens x H/N heads (per tensor: the send copy, the receive buffer and, for a batch
    above 1, the reshape copy), runs the attention (dense: ``UlyssesAttnProcessor``, RoPE of all
    channels through ``apply_rope_channels``; FreeLOC: the op with an H/N-head workspace;
    Ouroboros: :func:`_wan_self_attention_ouroboros_ulysses`, its recorded keys this rank's H/N
    heads), and back (send copy -- none for SDPA's output at batch 1, already in the send layout --,
    receive buffer, reshape copy); cross-attention per token on S/N tokens (Ouroboros' subject map
    of the rank's tokens); ``proj_out``'s output is gathered to the whole sequence. Diffusers' SDPA
    processor, FreeLOC's and Ouroboros' processors; not SkyReels-V2's per-frame timesteps
    (ValueError)."""
    B, e, d, T = c.batch, c.itemsize, a.dim, c.text_len
    S = a.tokens(c.frames, c.height, c.width)
    n_cp = _check_context_parallel(a, c, S)
    S_all, S = S, S // n_cp                          # S: the tokens this rank holds between attentions
    X = B * S * d
    token_mod = c.timestep in ("token", "frame")
    lean = c.lean and not sim.grad      # the patch's in-place path runs without autograd only
    sim.where = "embed"
    # (1, S, 1, D) cos, sin; under context parallelism the SequenceParallel keeps the whole tables
    # (rotary_full) until the next call's replace them: counted here, inside each call, as in a
    # run's steady state (a process's first call, or one stopped part-way, leaves them alive after)
    rope = [sim.new(S_all * a.head_dim, F32, "rope") for _ in range(2)]
    conv = sim.new(B * S_all * d, e, "hidden")                         # patch embedding
    hidden = sim.new(B * S_all * d, e, "hidden")                       # .contiguous() copy
    sim.free(conv)
    whole = None
    if n_cp > 1:      # blocks[0]'s pre-hook passes a view (this rank's slice) of the whole sequence
        whole = hidden
        # float32: block 0's `.float()` of the slice is the slice itself, so what its norm saves
        # (and its residual adds) is the view, which keeps the whole storage: an alias of it here;
        # other dtypes: block 0's float32 copies are the slice's size (an uncounted input)
        hidden = sim.ref(whole) if e == F32 else sim.external(X, e, "hidden")
    mask = None
    if a.skyreels and a.num_frame_per_block > 1 and c.timestep == "frame":
        mask = sim.new(S * S, 1, "attention mask")                     # block-causal (S, S) bool
    # condition embedder: sinusoidal projection, time_embedder (float32), act, time_proj
    if c.timestep == "token":
        N = B * S
    elif c.timestep == "frame":
        N = B * (c.frames // a.patch[0])
    elif c.timestep == "runs":      # a rank's slice may cut one frame more into two runs
        frames = c.frames // a.patch[0]
        N = B * min(frames, -(-frames // n_cp) + (1 if n_cp > 1 else 0))
    else:
        N = B
    tp = sim.new(N * a.freq_dim, F32, "timestep")
    l1 = _linear(sim, tp, N * d, F32, "timestep")
    sim.free(tp)
    act = sim.new(N * d, F32, "timestep")
    sim.save_w(l1)
    sim.free(l1)
    l2 = _linear(sim, act, N * d, F32, "timestep")
    sim.free(act)
    temb = sim.cast(l2, e, "timestep")
    sim.free(l2)
    temb_act = sim.new(N * d, e, "timestep")
    sim.save_w(temb)
    tproj = _linear(sim, temb_act, N * 6 * d, e, "timestep")
    sim.free(temb_act)
    if c.timestep == "frame":
        # SkyReels-V2: repeated over each frame's tokens, then (b, 6, S, d) contiguous; temb too
        rep = sim.new(B * S * 6 * d, e, "timestep")
        sim.free(tproj)
        tproj = sim.new(B * S * 6 * d, e, "timestep")
        sim.free(rep)
        t_rep = sim.new(X, e, "timestep")
        sim.free(temb)
        temb = t_rep
    # text projection (B, T, text_dim) -> (B, T, d): linear, gelu(tanh), linear
    t1 = sim.new(B * T * d, e, "text")
    t2 = sim.new(B * T * d, e, "text")
    sim.save_w(t1)
    sim.free(t1)
    text = _linear(sim, t2, B * T * d, e, "text")
    sim.free(t2)
    image_len = c.image_len if a.image_dim else 0
    if image_len:
        # Wan 2.1 I2V's image embedder (FP32LayerNorm, Linear, GELU, Linear, FP32LayerNorm) on the
        # caller's (B, I, image_dim) features, then concatenated in front of the text states
        I, Di = B * image_len, a.image_dim
        n1 = _fp32_layer_norm(sim, I * Di, e, "text")
        f1 = _linear(sim, n1, I * Di, e, "text")
        sim.free(n1)
        g = sim.new(I * Di, e, "text")
        sim.save(f1)
        sim.free(f1)
        f2 = _linear(sim, g, I * d, e, "text")
        sim.free(g)
        img = _fp32_layer_norm(sim, I * d, e, "text")
        sim.free(f2)
        both = sim.new(I * d + B * T * d, e, "text")
        sim.free(img, text)
        text = both

    modes = c.freeloc_modes if c.self_attn == "freeloc" else None
    for layer in range(a.num_layers):
        sim.where = f"block {layer} modulation"
        mod = None
        if c.timestep == "runs":   # (table + temb.float()) per run: float32 (B, R, 6, d)
            mod = sim.new(6 * N * d, F32, "modulation")
            sim.save(mod)
        elif token_mod:      # (table + temb.float()): float32 (B, S, 6, d), alive for the whole block
            tf = sim.cast(tproj, F32, "modulation")
            mod = sim.new(6 * X, F32, "modulation")
            sim.free(tf)
            sim.save(mod)    # its chunks are saved by the products with (1 + scale) and the gates
        h0 = hidden
        block_mark = sim.mark()
        sim.where = f"block {layer} self-attention"
        nh1 = (_modulated_norm_lean(sim, h0, X, e, "norm") if lean
               else _modulated_norm(sim, h0, X, e, token_mod, "norm"))
        downstream = []
        a1 = _wan_self_attention(sim, a, c, dev, nh1, B, S, layer, modes[layer] if modes else None, downstream,
                                 n_cp)
        if layer == c.stop_after:
            # the forward hook raises as attn1 returns: the graph nodes past the recorded keys (the
            # queries, the attention; this block's modulation, never multiplied by its gate) and
            # every local die; the graph upstream of the keys stays with them
            sim.where = f"block {layer} attn1 (the pass stops)"
            sim.unsave(mod, *downstream)
            sim.unwind()
            return sim.saved_since(block_mark)
        if lean:         # the lean forward drops its norm as attn1 returns
            sim.free(nh1)
            nh1 = None
        h1 = (_gated_residual_lean(sim, a1, X, e, "hidden") if lean
              else _gated_residual(sim, h0, a1, X, e, False, "hidden"))
        sim.where = f"block {layer} cross-attention"
        hf = sim.cast(h1, F32, "norm")
        n2 = sim.new(X, F32, "norm")
        sim.save(hf)
        sim.free(hf)
        nh2 = sim.cast(n2, e, "norm")
        sim.free(n2)
        sim.free(nh1)                                  # norm_hidden_states rebound
        a2 = _wan_cross_attention(sim, a, c, dev, nh2, text, B, S, T)
        sim.free(a1)                                   # attn_output rebound
        if lean:         # its cross-attention input is a temporary of the attn2 call
            sim.free(nh2)
            nh2 = None
        h2 = sim.new(X, e, "hidden")                   # hidden_states + attn_output
        sim.free(h1)
        if lean:         # ... and it drops the cross-attention output once added
            sim.free(a2)
            a2 = None
        sim.where = f"block {layer} ffn"
        nh3 = (_modulated_norm_lean(sim, h2, X, e, "norm") if lean
               else _modulated_norm(sim, h2, X, e, token_mod, "norm"))
        sim.free(nh2)
        proj = _linear(sim, nh3, B * S * a.ffn_dim, e, "ffn")
        g = sim.new(B * S * a.ffn_dim, e, "ffn")       # gelu(tanh)
        sim.save(proj)
        sim.free(proj)
        ff = _linear(sim, g, X, e, "ffn")
        sim.free(g)
        if lean:         # ... and the FFN's input as the FFN returns
            sim.free(nh3)
            nh3 = None
        h3 = (_gated_residual_lean(sim, ff, X, e, "hidden") if lean
              else _gated_residual(sim, h2, ff, X, e, True, "hidden"))
        sim.free(h2, nh3, a2, ff, mod)                 # the block returns
        sim.free(h0)                                   # the model's loop rebinds hidden_states
        if layer == 0 and whole is not None:
            sim.free(whole)                            # the whole patched sequence with it
        hidden = h3
    sim.where = "output"
    ss = sim.new(2 * X, F32, "timestep") if token_mod else None   # (table + temb): float32 (B, S, 2, d)
    out_n = (_modulated_norm_lean(sim, hidden, X, e, "norm") if lean
             else _modulated_norm(sim, hidden, X, e, token_mod, "norm"))
    pt, ph, pw = a.patch
    out = _linear(sim, out_n, B * S * a.out_channels * pt * ph * pw, e, "hidden")
    sim.free(out_n)
    if n_cp > 1:     # proj_out's hook gathers the sequence: movedim(1, 0).contiguous(), the whole output
        moved = sim.new(out.numel, e, "hidden") if B > 1 else None
        gathered = sim.new(out.numel * n_cp, e, "hidden")
        sim.free(moved, out)
        out = gathered
    final = sim.new(out.numel, e, "hidden")            # unpatchify: permute + flatten copy
    sim.free(out, ss, hidden, temb, tproj, text, mask, *rope)
    sim.free(final)


def wan_guidance_pass(sim: Sim, a: WanArch, c: WanCall, dev: Device = CUDA) -> dict:
    """Ouroboros' self-recurrent guidance pass on Wan (``FIFODiffusion._guidance_gradient``): the
    conditional half alone (``c.batch`` 1), parameters frozen (``Sim(grad=True, frozen=True)``),
    the forward stopped right after the last feature layer's attn1 (``c.stop_after``; the keys
    of ``c.feature_layers`` recorded and held), then the loss and ``autograd.grad`` to the input.

    The forward is mirrored op by op (``wan_call``). The backward is coarse, two points: (1) the
    stop block's backward with the whole graph alive and five float32 (B, S, d) gradients in
    flight (the keys', the RMSNorm's, the norm's: CPU's composite RMSNorm backward; under
    ``c.context_parallel`` N, S is this rank's S/N tokens, and before them the keys' gradient
    goes back through the all-to-all: its receive buffer and reshape copy, a send copy for a batch
    above 1); (2) the FFN
    of the block before (when there is one), the stop block's saved tensors freed, with the two
    (B, S, ffn) gradients of its hidden layer and three float32 (B, S, d) ones (the residual
    stream's). On CPU (tiny and mid widths, float32 and bfloat16) both within 5% of the tracker.
    The features' loss (a few (H, D) means) is not modelled; the graph dies at the end.
    Returns {"forward": the forward's peak, "graph": the bytes alive after the stop (the graph
    upstream of the keys, the keys), "backward": the backward's peak} (bytes, as sim.peak)."""
    if c.stop_after is None or not sim.grad:
        raise ValueError("wan_guidance_pass needs WanCall.stop_after and Sim(grad=True)")
    before = (sim.peak, sim.peak_where, sim.peak_tags)
    sim.peak = sim.current
    stop_saved = wan_call(sim, a, c, dev) or []
    fwd, graph = sim.peak, sim.current
    at_fwd = (sim.peak, sim.peak_where, sim.peak_tags)
    sim.peak = sim.current
    B = c.batch
    S = a.tokens(c.frames, c.height, c.width) // max(1, c.context_parallel)   # this rank's tokens
    X = B * S * a.dim
    sim.where = f"backward through block {c.stop_after} attn1"
    if c.context_parallel > 1:
        # the keys' gradient (all S tokens x H/N heads) back through the all-to-all's backward
        # (sequence_to_heads: send copy, receive buffer, reshape copy unless B * S/N is 1)
        gk = sim.new(X, c.itemsize, "gradients")
        gl = _all_to_all(sim, gk, c.itemsize, "gradients", B * S > 1, send_copies=B > 1)
        sim.free(gk, gl)
    g = sim.new(5 * X, F32, "gradients")
    sim.free(g)
    if c.stop_after >= 1:
        sim.where = f"backward through block {c.stop_after - 1} ffn"
        sim.unsave(*stop_saved)
        gs = [sim.new(B * S * a.ffn_dim, c.itemsize, "gradients") for _ in range(2)]
        gs.append(sim.new(3 * X, F32, "gradients"))
        sim.free(*gs)
    return _end_guidance_pass(sim, before, at_fwd, fwd, graph)


def _end_guidance_pass(sim: Sim, before: tuple, at_fwd: tuple, fwd: int, graph: int) -> dict:
    """Close a simulated guidance pass (forward + partial backward): free what the graph saved and
    held, and make the call's peak the largest of `before` (the peak before the pass), the forward
    (`at_fwd`) and the backward that just ran; returns the three phases' bytes."""
    bwd = sim.peak
    sim.where = "guidance pass done"
    sim.release_saved()
    for h in sim.held:
        sim.free(h)
    sim.peak, sim.peak_where, sim.peak_tags = max(before, at_fwd, (sim.peak, sim.peak_where, sim.peak_tags),
                                                  key=lambda t: t[0])
    return {"forward": fwd, "graph": graph, "backward": bwd}


def _check_context_parallel(a: WanArch, c: WanCall, S: int) -> int:
    """The rank count of ``c.context_parallel`` after the checks parallel.py makes (and what the
    walk does not model)."""
    n = c.context_parallel
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"context_parallel must be a positive number of ranks, got {n!r}")
    if n == 1:
        return 1
    if a.heads % n:
        raise ValueError(f"context_parallel={n}: the transformer's {a.heads} attention heads are not divisible by it")
    if S % n:
        raise ValueError(f"context_parallel={n}: a sequence of {S} tokens is not divisible by it "
                         "(choose frames / size so that frames x tokens per frame is)")
    if c.self_attn not in ("sdpa", "freeloc", "ouroboros"):
        raise ValueError(f"context_parallel={n} is modelled for the dense (Ulysses), FreeLOC and Ouroboros "
                         f"processors, not for self_attn={c.self_attn!r}")
    if c.timestep == "frame":
        raise ValueError(f"context_parallel={n} is not modelled for per-frame timesteps (SkyReels-V2)")
    return n


def _all_to_all(sim: Sim, x, e: int, tag: str, reshape_copies: bool, send_copies: bool = True):
    """longvideo.parallel's heads_to_sequence / sequence_to_heads on one rank: the contiguous send
    copy, the receive buffer (both the size of `x`), the send copy dropped as the function returns;
    the result a view of the receive buffer, or a copy of it when the final reshape cannot view
    (``reshape_copies``). ``send_copies`` False: the permuted input is contiguous already, so
    ``.contiguous()`` returns it (sequence_to_heads of an attention output laid out (B, S, H, D)
    in memory, as SDPA and consistent_attention return it, for a batch of 1). Returns the result;
    `x` is not freed."""
    send = sim.new(x.numel, e, tag) if send_copies else None
    recv = sim.new(x.numel, e, tag)
    if reshape_copies:
        out = sim.new(x.numel, e, tag)
        sim.free(send, recv)
        return out
    sim.free(send)
    return recv


def _project_qkv_normed(sim: Sim, nh, X: int, e: int, dev: Device):
    """to_q + RMSNorm, to_k + RMSNorm, to_v on `nh` (X elements each, as Ouroboros' processors
    project them); returns q, k, v and what autograd saved for q (before k exists)."""
    m0 = sim.mark()
    ql = _linear(sim, nh, X, e, "attention")
    q = _rms_norm(sim, ql, e, dev, "attention")
    sim.free(ql)
    q_saved = sim.saved_since(m0)
    kl = _linear(sim, nh, X, e, "attention")
    k = _rms_norm(sim, kl, e, dev, "attention")
    sim.free(kl)
    v = _linear(sim, nh, X, e, "attention")
    return q, k, v, q_saved


def _wan_self_attention(sim: Sim, a: WanArch, c: WanCall, dev: Device, nh, B: int, S: int, layer: int, mode,
                        downstream: Optional[list] = None, n_cp: int = 1):
    """attn1 of one block, processor by processor; returns the to_out output (the processor's
    locals freed as it returns). downstream (Ouroboros' processor): receives the tensors saved
    for backward that the recorded keys do not depend on (the query path, the attention).
    n_cp > 1: one rank of Ulysses over n_cp ranks (S: this rank's tokens; see :func:`wan_call`)."""
    e = c.itemsize
    H, D = a.heads, a.head_dim
    X = B * S * H * D
    proc = c.self_attn
    if proc == "freeloc" and mode in (None, "none"):
        proc = "sdpa"
    if n_cp > 1 and proc == "ouroboros":
        return _wan_self_attention_ouroboros_ulysses(sim, a, c, dev, nh, B, S, layer, downstream, n_cp)
    if n_cp > 1:
        return _wan_self_attention_ulysses(sim, a, c, dev, nh, B, S, mode, proc, n_cp)
    keep = []
    if proc == "ouroboros":
        q, k, v, q_saved = _project_qkv_normed(sim, nh, X, e, dev)
        if f"blocks.{layer}.attn1.processor" in c.feature_layers:
            sim.hold(k)          # the recorded pre-RoPE keys (a view of k) live in the context
            sim.save(k)
        m1 = sim.mark()
        qr = _wan_rope_diffusers(sim, q, X, e, "attention")
        kr = _wan_rope_diffusers(sim, k, X, e, "attention")
        sim.free(q, k)
        out = _attention_out(sim, qr, kr, v, X, e, "attention")   # SDPA or the op: (B, S, H, D) layout
        keep = [qr, kr, v]
        if downstream is not None:
            downstream += q_saved + sim.saved_since(m1)
    elif proc == "freeloc":
        ql = _linear(sim, nh, X, e, "attention")
        kl = _linear(sim, nh, X, e, "attention")
        v = _linear(sim, nh, X, e, "attention")
        q = _rms_norm(sim, ql, e, dev, "attention")
        k = _rms_norm(sim, kl, e, dev, "attention")
        sim.free(ql, kl)
        t = a.rope_t_channels
        qr = _rope_channels(sim, q, B, S, H, D, t, e, "attention")
        kr = _rope_channels(sim, k, B, S, H, D, t, e, "attention")
        ws = _tsa_workspace(sim, c, dev, mode, B * H * S, t, e)
        o = _attention_out(sim, qr, kr, v, X, e, "attention")     # (B, H, S, D) contiguous
        sim.free(ws, qr, kr)                                       # `attend` returns
        out = sim.new(X, e, "attention")                           # transpose + flatten: a copy
        sim.free(o)
        keep = [q, k, v]
    else:                        # diffusers' WanAttnProcessor
        ql = _linear(sim, nh, X, e, "attention")
        kl = _linear(sim, nh, X, e, "attention")
        v = _linear(sim, nh, X, e, "attention")
        q = _rms_norm(sim, ql, e, dev, "attention")
        sim.free(ql)
        k = _rms_norm(sim, kl, e, dev, "attention")
        sim.free(kl)
        qr = _wan_rope_diffusers(sim, q, X, e, "attention")
        sim.free(q)
        kr = _wan_rope_diffusers(sim, k, X, e, "attention")
        sim.free(k)
        out = _attention_out(sim, qr, kr, v, X, e, "attention")
        keep = [qr, kr, v]
    m2 = sim.mark()
    proj = _linear(sim, out, X, e, "attention")                    # to_out[0]
    if downstream is not None:
        downstream += sim.saved_since(m2)
    sim.free(out, *keep)
    return proj


def _tsa_workspace(sim: Sim, c: WanCall, dev: Device, mode, rows: int, rope_channels: int, e: int):
    """The Triton tiered op's rotated (q, k) copies for `rows` = B * heads * tokens (None on other
    backends): 5 variants with VRPR (the VRPR layers; the TSA layers under the paper's semantics),
    3 for the official TSA layers' token tiers (re-encoded sink only), else 1; each padded to
    at least 16 channels, a power of two."""
    if not (dev.kind == "cuda" and dev.tsa_backend == "triton"):
        return None
    rp = max(16, 1 << max(0, (rope_channels - 1).bit_length()))
    nv = 5 if mode == "vrpr" or (mode == "tsa" and c.freeloc_semantics == "paper") else (3 if mode == "tsa" else 1)
    return sim.new(2 * nv * rows * rp, e, "attention workspace")


def _wan_self_attention_ulysses(sim: Sim, a: WanArch, c: WanCall, dev: Device, nh, B: int, S: int, mode,
                                proc: str, n_cp: int):
    """attn1 on one rank of Ulysses over n_cp ranks: ``UlyssesAttnProcessor`` (proc "sdpa") or
    ``WanTieredAttnProcessor`` (proc "freeloc") with the sequence split (longvideo/parallel.py).
    Every attention tensor -- (B, S/N, H, D) before the all-to-all, (B, S, H/N, D) after -- has
    X = B * S/N * H * D elements."""
    e = c.itemsize
    H, D = a.heads, a.head_dim
    X = B * S * H * D                                 # S: this rank's S/N tokens
    S_all, H_here = S * n_cp, H // n_cp
    ql = _linear(sim, nh, X, e, "attention")          # project_qkv: to_q, to_k, to_v, then the norms
    kl = _linear(sim, nh, X, e, "attention")
    vl = _linear(sim, nh, X, e, "attention")
    ql_n = _rms_norm(sim, ql, e, dev, "attention")
    kl_n = _rms_norm(sim, kl, e, dev, "attention")
    sim.free(ql, kl)
    # full_sequence: (B, S/N, H, D) -> (B, S, H/N, D); the final reshape views the receive buffer
    # only for a batch of 1
    q, k, v = (_all_to_all(sim, t, e, "attention", B > 1) for t in (ql_n, kl_n, vl))
    sim.free(ql_n, kl_n, vl)                          # the processor rebinds query, key, value
    if proc == "freeloc":
        t = a.rope_t_channels
        qr = _rope_channels(sim, q, B, S_all, H_here, D, t, e, "attention")
        kr = _rope_channels(sim, k, B, S_all, H_here, D, t, e, "attention")
        ws = _tsa_workspace(sim, c, dev, mode, B * H_here * S_all, t, e)
        o = _attention_out(sim, qr, kr, v, X, e, "attention")     # (B, H/N, S, D) contiguous
        sim.free(ws, qr, kr)                                       # `attend` returns
    else:                  # dense_attention_reference: RoPE on all channels (apply_rope_channels), SDPA
        qr = _rope_channels(sim, q, B, S_all, H_here, D, 0, e, "attention")
        kr = _rope_channels(sim, k, B, S_all, H_here, D, 0, e, "attention")
        o = _attention_out(sim, qr, kr, v, X, e, "attention")
        sim.free(qr, kr)
    # local_sequence: (B, S, H/N, D) -> (B, S/N, H, D); the reshape merging the ranks' heads copies
    # unless B * S/N is 1; SDPA's output is laid out (B, S, H/N, D) in memory, so for a batch of 1
    # the send buffer is the output itself (the op's is (B, H/N, S, D): a send copy)
    out = _all_to_all(sim, o, e, "attention", B * S > 1, send_copies=proc == "freeloc" or B > 1)
    sim.free(o)
    proj = _linear(sim, out, X, e, "attention")                    # to_out[0]
    sim.free(out, q, k, v)
    return proj


def _wan_self_attention_ouroboros_ulysses(sim: Sim, a: WanArch, c: WanCall, dev: Device, nh, B: int, S: int,
                                          layer: int, downstream: Optional[list], n_cp: int):
    """attn1 through ``OuroborosWanProcessor`` on one rank of Ulysses over n_cp ranks
    (longvideo/processors/ouroboros.py with longvideo/parallel.py's split): q, k, v projected and
    normed on this rank's S/N tokens, the three all-to-alls to all S tokens x H/N heads (each:
    send copy, receive buffer, a reshape copy for a batch above 1; under autograd the all-to-all
    is a ``torch.autograd.Function`` that saves nothing, so the local q, k, v die with the
    processor's rebinding), the recorded subject keys of a feature layer = this rank's H/N heads
    of every token (a view of the gathered k, held by the context), Wan's interleaved RoPE on the
    gathered q, k, the attention (SDPA, or ``consistent_attention`` in guided calls) on H/N heads,
    the all-to-all back (reshape copy unless B * S/N is 1) and ``to_out``. downstream: as in
    :func:`_wan_self_attention` (the saved tensors the recorded keys do not depend on)."""
    e = c.itemsize
    H, D = a.heads, a.head_dim
    X = B * S * H * D                                 # S: this rank's S/N tokens; every tensor here has X elements
    q, k, v, q_saved = _project_qkv_normed(sim, nh, X, e, dev)
    # sp.full_sequence: (B, S/N, H, D) -> (B, S, H/N, D), q, k, v in turn; the processor holds the
    # local tensors until all three return
    qa, ka, va = (_all_to_all(sim, t, e, "attention", B > 1) for t in (q, k, v))
    sim.free(q, k, v)
    if f"blocks.{layer}.attn1.processor" in c.feature_layers:
        sim.hold(ka)             # this rank's heads of the pre-RoPE keys (a view of the gathered k)
        sim.save(ka)
    m1 = sim.mark()
    qr = _wan_rope_diffusers(sim, qa, X, e, "attention")
    kr = _wan_rope_diffusers(sim, ka, X, e, "attention")
    sim.free(qa, ka)
    o = _attention_out(sim, qr, kr, va, X, e, "attention")       # (B, H/N, S, D), laid out (B, S, H/N, D)
    # sp.local_sequence: back to (B, S/N, H, D); the send buffer is the output itself for a batch
    # of 1; the reshape merging the ranks' heads copies unless B * S/N is 1
    out = _all_to_all(sim, o, e, "attention", B * S > 1, send_copies=B > 1)
    if downstream is not None:
        downstream += q_saved + sim.saved_since(m1)
    sim.free(o)
    m2 = sim.mark()
    proj = _linear(sim, out, X, e, "attention")                    # to_out[0]
    if downstream is not None:
        downstream += sim.saved_since(m2)
    sim.free(out, qr, kr, va)
    return proj


def _wan_cross_attention(sim: Sim, a: WanArch, c: WanCall, dev: Device, nh, text, B: int, S: int, T: int):
    e = c.itemsize
    H, D = a.heads, a.head_dim
    X = B * S * H * D
    Xt = B * T * H * D
    if c.self_attn == "ouroboros":
        ql = _linear(sim, nh, X, e, "cross-attention")
        q = _rms_norm(sim, ql, e, dev, "cross-attention")
        sim.free(ql)
        kl = _linear(sim, text, Xt, e, "cross-attention")
        k = _rms_norm(sim, kl, e, dev, "cross-attention", input_grad=False)
        sim.free(kl)
        v = _linear(sim, text, Xt, e, "cross-attention")
    else:
        ql = _linear(sim, nh, X, e, "cross-attention")
        kl = _linear(sim, text, Xt, e, "cross-attention")
        v = _linear(sim, text, Xt, e, "cross-attention")
        q = _rms_norm(sim, ql, e, dev, "cross-attention")
        sim.free(ql)
        k = _rms_norm(sim, kl, e, dev, "cross-attention", input_grad=False)
        sim.free(kl)
    image_len = c.image_len if a.image_dim else 0
    img_out = None
    if image_len:
        # Wan 2.1 I2V: the image tokens' keys (add_k_proj, norm_added_k) and values (add_v_proj),
        # attended by the same queries before the text attention; the two outputs are added
        Xi = B * image_len * H * D
        kil = _linear(sim, text, Xi, e, "cross-attention")
        vi = _linear(sim, text, Xi, e, "cross-attention")
        ki = _rms_norm(sim, kil, e, dev, "cross-attention", input_grad=False)
        sim.free(kil)
        img_out = _attention_out(sim, q, ki, vi, X, e, "cross-attention")
    out = _attention_out(sim, q, k, v, X, e, "cross-attention")
    if img_out is not None:
        summed = sim.new(X, e, "cross-attention")
        sim.free(out, img_out, ki, vi)
        out = summed
    if c.self_attn == "ouroboros" and c.record_maps:
        # _subject_map of the conditional row, 4096 queries at a time (no grad): q chunk and k
        # in float32 (copies unless they are float32 already), the logits, the scaled logits, the
        # softmax; under context parallelism the rank's S/N tokens (the (1, S) map gathered after:
        # S floats, below this walk's granularity)
        chunk = min(4096, S)
        kf = sim.new(H * T * D, F32, "maps") if e != F32 else None
        qf = sim.new(H * chunk * D, F32, "maps") if e != F32 else None
        m1 = sim.new(H * chunk * T, F32, "maps")
        m2 = sim.new(H * chunk * T, F32, "maps")
        sim.free(m1)
        p = sim.new(H * chunk * T, F32, "maps")
        sim.free(m2, qf, kf, p)
    proj = _linear(sim, out, X, e, "cross-attention")
    sim.free(out, q, k, v)
    return proj


# ---------------------------------------------------------------------------------------------
# UNets (UNet2DConditionModel: SD1.5, SDXL; UNetMotionModel: AnimateDiff), walked module by module
@dataclass
class UNetCall:
    """One UNet call on ``batch`` images (CFG halves included) of ``height`` x ``width`` latents.

    frames: frames per video for UNetMotionModel (the batch of its 2-D layers is batch * frames).
    processors: {layer name (without ".processor"): spec} for self-attention layers that do not
    run diffusers' AttnProcessor2_0; a spec is a dict with ``kind``:
      "consistent"   longvideo's ConsistentAttnProcessor with a plan: ``bank_tokens`` E (bank rows
                     per group read this call, 0 for none), ``groups`` G, ``write_tokens`` (rows
                     per group stored in the bank this call, 0 when not writing);
      "dense_mask"   the official StoryDiffusion dense path: SDPA over all G*N tokens of a group
                     with a (G*N)^2 boolean mask (``group`` G images per group, default the batch);
      "ouroboros"    longvideo's Ouroboros self-attention processor (``feature``: keys recorded);
    ``cross_maps``: names of cross-attention layers recording Ouroboros subject maps.
    ``stop_after``: a self-attention's name ("down_blocks.2.attentions.1.transformer_blocks.0.attn1"):
    the call ends as it returns (Ouroboros' guidance pass; see :func:`unet_guidance_pass`).
    """

    batch: int
    height: int
    width: int
    text_len: int = 77
    itemsize: int = 2
    frames: int = 1
    processors: dict = field(default_factory=dict)
    cross_maps: frozenset = frozenset()
    subject_tokens: int = 1
    stop_after: Optional[str] = None     # the pass ends as this attention returns (guidance pass)


def _group_norm(sim: Sim, x, e: int, tag: str):
    out = sim.new(x.numel, e, tag)
    sim.save(x)
    return out


def _resnet(sim: Sim, r, x, P: int, e: int, tag: str = "resnet", temb: bool = True):
    """ResnetBlock2D (no up/down sampling inside); P = batch * height * width. x stays alive
    (the caller holds it); returns the output handle. temb: the time embedding is added (UNets;
    the VAE's resnets have none)."""
    cin, cout = r.conv1.in_channels, r.conv1.out_channels
    n1 = _group_norm(sim, x, e, tag)
    s1 = sim.new(cin * P, e, tag)                  # silu
    sim.save(n1)
    sim.free(n1)
    c1 = sim.new(cout * P, e, tag)                 # conv1
    sim.save(s1)
    sim.free(s1)
    if temb:
        t = sim.new(cout * P, e, tag)              # + temb
        sim.free(c1)
    else:
        t = c1
    n2 = _group_norm(sim, t, e, tag)
    sim.free(t)
    s2 = sim.new(cout * P, e, tag)
    sim.save(n2)
    sim.free(n2)
    c2 = sim.new(cout * P, e, tag)                 # conv2 (dropout: identity)
    sim.save(s2)
    sim.free(s2)
    short = None
    if r.conv_shortcut is not None:
        short = sim.new(cout * P, e, tag)
        sim.save(x)
    s = sim.new(cout * P, e, tag)                  # input + hidden
    sim.free(c2, short)
    out = sim.new(cout * P, e, tag)                # / output_scale_factor
    sim.free(s)
    return out


def _diffusers_attention(sim: Sim, attn, x, B: int, N: int, kv, Nk: int, e: int, tag: str, spec=None,
                         maps: bool = False, frames: int = 1, subject_tokens: int = 1,
                         downstream: Optional[list] = None):
    """A diffusers ``Attention`` on (B, N, C) input x (3-D, as inside a transformer block) with keys
    from ``kv`` (B, Nk, Ck) (x itself for self-attention); returns the output handle (after
    ``/ rescale_output_factor``). spec: see UNetCall.processors. downstream: receives what the
    attention and the output projection save (nothing the recorded keys depend on)."""
    inner = attn.to_q.out_features
    heads = attn.heads
    q = _linear(sim, x, B * N * inner, e, tag)
    k = _linear(sim, kv, B * Nk * attn.to_k.out_features, e, tag)
    v = _linear(sim, kv, B * Nk * attn.to_v.out_features, e, tag)
    mark = sim.mark()
    extra = []
    kind = spec.get("kind") if spec else None
    if spec and spec.get("write_tokens"):      # write mode: the sampled inputs of the id images, kept by the bank
        sim.new(spec.get("groups", 1) * spec["write_tokens"] * attn.to_q.in_features, e, "id bank")
    if kind == "consistent":
        G, E = spec.get("groups", 1), spec.get("bank_tokens", 0)
        if E:            # read mode: bank rows projected by this layer's to_k / to_v
            extra = [sim.new(G * E * attn.to_k.out_features, e, tag), sim.new(G * E * attn.to_v.out_features, e, tag)]
            sim.save(*extra)
        out = _attention_out(sim, q, k, v, B * N * inner, e, tag)
    elif kind == "dense_mask":
        # the official StoryDiffusion path: SDPA over all G*N tokens of a group (G = ``group``
        # images, one group per CFG half) with a (G*N)^2 boolean mask shared by the groups.
        # Building the mask holds four (G*N)^2 booleans at once (same-image, same-group, sampled,
        # and a negation); SDPA then turns the boolean mask into an additive one in q's dtype
        L = spec.get("group", B) * N
        build = [sim.new(L * L, 1, "attention workspace") for _ in range(3)]
        mask = sim.new(L * L, 1, "attention workspace")
        sim.free(*build)
        add = sim.new(L * L, e, "attention workspace")
        out = _attention_out(sim, q, k, v, B * N * inner, e, tag)
        sim.free(add, mask)
    else:
        out = _attention_out(sim, q, k, v, B * N * inner, e, tag)
    if spec and spec.get("feature"):
        sim.hold(k)                                 # Ouroboros keeps the conditional rows' keys (a view)
        sim.save(k)
    if maps:
        D = inner // heads
        chunk = min(4096, N)
        qf = sim.new(frames * heads * chunk * D, F32, "maps")
        kf = sim.new(frames * heads * Nk * D, F32, "maps")
        m1 = sim.new(frames * heads * chunk * Nk, F32, "maps")
        m2 = sim.new(frames * heads * chunk * Nk, F32, "maps")
        sim.free(m1)
        p = sim.new(frames * heads * chunk * Nk, F32, "maps")
        sim.free(m2, qf, kf, p)
    proj = _linear(sim, out, B * N * inner, e, tag)       # to_out[0]
    sim.free(out)
    res = sim.new(proj.numel, e, tag)                     # / rescale_output_factor
    if downstream is not None:
        downstream += sim.saved_since(mark)
    sim.free(proj, q, k, v, *extra)
    return res


class _StopPass(Exception):
    """The UNet walk ends at UNetCall.stop_after (the guidance pass's forward hook raises)."""

    def __init__(self, downstream, keys_numel: int):
        super().__init__()
        self.downstream, self.keys_numel = downstream, keys_numel


def _basic_block(sim: Sim, blk, x, B: int, N: int, text, T: int, e: int, c: UNetCall, name: str):
    """BasicTransformerBlock (norm_type layer_norm; positional embeddings for motion modules)."""
    C = blk.norm1.normalized_shape[0]
    X = B * N * C
    n1 = sim.new(X, e, "transformer")                     # norm1 (layer_norm)
    sim.save(x)
    if getattr(blk, "pos_embed", None) is not None:
        p = sim.new(X, e, "transformer")
        sim.free(n1)
        n1 = p
    downstream = []
    a1 = _diffusers_attention(sim, blk.attn1, n1, B, N, n1, N, e, "attention",
                              c.processors.get(f"{name}.attn1"), False, c.frames, c.subject_tokens, downstream)
    if c.stop_after == f"{name}.attn1":
        raise _StopPass(downstream, B * N * blk.attn1.to_k.out_features)
    h1 = sim.new(X, e, "transformer")                     # attn_output + hidden_states
    h = h1
    nh = n1
    if blk.attn2 is not None:
        n2 = sim.new(X, e, "transformer")
        sim.save(h1)
        if getattr(blk, "pos_embed", None) is not None:
            p = sim.new(X, e, "transformer")
            sim.free(n2)
            n2 = p
        sim.free(nh)
        cross = getattr(blk.attn2, "is_cross_attention", False) and text is not None
        kv, Nk = (text, T) if cross else (n2, N)
        a2 = _diffusers_attention(sim, blk.attn2, n2, B, N, kv, Nk, e, "cross-attention", None,
                                  f"{name}.attn2" in c.cross_maps, c.frames, c.subject_tokens)
        sim.free(a1)
        a1 = a2
        h2 = sim.new(X, e, "transformer")
        sim.free(h1)
        h = h2
        nh = n2
    n3 = sim.new(X, e, "transformer")                     # norm3
    sim.save(h)
    sim.free(nh)
    ff = _feed_forward(sim, blk.ff, n3, B * N, e)
    out = sim.new(X, e, "transformer")                    # ff_output + hidden_states
    sim.free(ff, n3, a1, h)
    return out


def _feed_forward(sim: Sim, ff, x, rows: int, e: int):
    """diffusers FeedForward: GEGLU (proj to 2 x inner, chunk, h * gelu(gate)) or GELU, then Linear."""
    act = ff.net[0]
    proj_out = act.proj.out_features
    p = _linear(sim, x, rows * proj_out, e, "ffn")
    if type(act).__name__ == "GEGLU":
        inner = proj_out // 2
        g = sim.new(rows * inner, e, "ffn")               # gelu(gate)
        sim.save(p)                                       # gelu saves the gate half (a view of p)
        m = sim.new(rows * inner, e, "ffn")               # hidden * gelu(gate): saves both
        sim.save(g)
        sim.free(g, p)
    else:
        inner = proj_out
        m = sim.new(rows * inner, e, "ffn")
        sim.save(p)
        sim.free(p)
    out = _linear(sim, m, rows * ff.net[-1].out_features, e, "ffn")
    sim.free(m)
    # its backward's gradients in flight (float32, coarse): the projection's and two of the inner
    # width; the latest feed-forward's (a stopped pass's backward meets it first)
    sim.facts["ffn_backward"] = rows * (proj_out + 2 * inner) * F32
    return out


def _transformer_2d(sim: Sim, t2d, x, B: int, h: int, w: int, text, T: int, e: int, c: UNetCall, name: str):
    """Transformer2DModel on continuous input x (B, C, h, w); returns output + residual."""
    C = t2d.in_channels
    inner = t2d.inner_dim
    N = h * w
    n = _group_norm(sim, x, e, "transformer")
    if t2d.use_linear_projection:
        r = sim.new(B * N * C, e, "transformer")           # permute + reshape: a copy
        sim.free(n)
        hdl = _linear(sim, r, B * N * inner, e, "transformer")
        sim.free(r)
    else:
        p = sim.new(B * N * inner, e, "transformer")       # proj_in (1x1 conv)
        sim.save(n)
        sim.free(n)
        hdl = sim.new(B * N * inner, e, "transformer")     # permute + reshape: a copy
        sim.free(p)
    for k, blk in enumerate(t2d.transformer_blocks):
        nxt = _basic_block(sim, blk, hdl, B, N, text, T, e, c, f"{name}.transformer_blocks.{k}")
        sim.free(hdl)
        hdl = nxt
    if t2d.use_linear_projection:
        po = _linear(sim, hdl, B * N * C, e, "transformer")
        sim.free(hdl)
        hdl = sim.new(B * N * C, e, "transformer")         # reshape + permute + contiguous
        sim.free(po)
    else:
        cc = sim.new(B * N * inner, e, "transformer")
        sim.free(hdl)
        hdl = sim.new(B * N * C, e, "transformer")         # proj_out (1x1 conv)
        sim.save(cc)
        sim.free(cc)
    out = sim.new(B * N * C, e, "transformer")             # + residual
    sim.free(hdl)
    return out


def _motion_module(sim: Sim, mm, x, Bv: int, F: int, h: int, w: int, e: int, c: UNetCall, name: str):
    """AnimateDiffTransformer3D: frames as the sequence (batch Bv * h * w), returns output + residual."""
    C = mm.in_channels
    inner = mm.proj_in.out_features
    rows = Bv * h * w
    cont = sim.new(Bv * F * C * h * w, e, "motion")        # GroupNorm of a permuted view: contiguous copy
    n = sim.new(cont.numel, e, "motion")
    sim.save(cont)
    sim.free(cont)
    r = sim.new(n.numel, e, "motion")                       # permute + reshape copy
    sim.free(n)
    hdl = _linear(sim, r, rows * F * inner, e, "motion")
    sim.free(r)
    for k, blk in enumerate(mm.transformer_blocks):
        nxt = _basic_block(sim, blk, hdl, rows, F, None, 0, e, c, f"{name}.transformer_blocks.{k}")
        sim.free(hdl)
        hdl = nxt
    po = _linear(sim, hdl, rows * F * C, e, "motion")
    sim.free(hdl)
    back = sim.new(po.numel, e, "motion")                   # reshape/permute/contiguous
    sim.free(po)
    out = sim.new(po.numel, e, "motion")                    # + residual
    sim.free(back)
    return out


def unet_call(sim: Sim, unet, c: UNetCall) -> Optional[int]:
    """One UNet2DConditionModel / UNetMotionModel forward, walked over the module tree of `unet`
    (a real or meta-device model; only its structure is read). Tags: "resnet", "transformer",
    "attention", "cross-attention", "ffn", "motion", "skip" (the down path's outputs kept for the
    up path), "id bank" (entries written by this call), "maps", "hidden".

    ``c.stop_after``: the walk ends as that self-attention returns: the graph nodes past the
    recorded keys (the attention) and every local die; the graph upstream of the keys stays.
    Returns the number of elements of that layer's keys (None without a stop)."""
    try:
        _unet_walk(sim, unet, c)
    except _StopPass as stop:
        sim.where = f"{c.stop_after} (the pass stops)"
        sim.unsave(*stop.downstream)
        sim.unwind()
        return stop.keys_numel
    return None


def unet_guidance_pass(sim: Sim, unet, c: UNetCall) -> dict:
    """Ouroboros' self-recurrent guidance pass on a UNetMotionModel (AnimateDiff): the conditional
    half alone (``c.batch`` 1), parameters frozen (``Sim(grad=True, frozen=True)``), the walk
    stopped as the last feature layer returns (``c.stop_after``; the feature layers' processors
    with ``"feature": True``), then ``autograd.grad`` to the input.

    The forward is mirrored module by module (``unet_call``); the backward is coarse: the whole
    graph alive with the larger of three float32 gradients of the stop layer's keys (the slices'
    and the projection's) and the gradients of the last feed-forward before the stop (the first
    the backward meets; :func:`_feed_forward`) in flight. On CPU (tiny AnimateDiff UNets, one and
    two attention levels) the forward and the graph within 2% of the tracker, the backward within
    8%. Returns {"forward", "graph", "backward"} as :func:`wan_guidance_pass`."""
    if c.stop_after is None or not sim.grad:
        raise ValueError("unet_guidance_pass needs UNetCall.stop_after and Sim(grad=True)")
    before = (sim.peak, sim.peak_where, sim.peak_tags)
    sim.peak = sim.current
    keys = unet_call(sim, unet, c)
    if keys is None:
        raise ValueError(f"stop_after {c.stop_after!r} is not a self-attention of the walk")
    fwd, graph = sim.peak, sim.current
    at_fwd = (sim.peak, sim.peak_where, sim.peak_tags)
    sim.peak = sim.current
    sim.where = f"backward from {c.stop_after}"
    g = sim.new(max(3 * keys * F32, sim.facts.get("ffn_backward", 0)), 1, "gradients")
    sim.free(g)
    return _end_guidance_pass(sim, before, at_fwd, fwd, graph)


def _unet_walk(sim: Sim, unet, c: UNetCall) -> None:
    e, T = c.itemsize, c.text_len
    F = max(1, c.frames)
    B = c.batch * F                       # the 2-D layers see frames as batch
    h, w = c.height, c.width
    motion = hasattr(unet, "down_blocks") and any(hasattr(b, "motion_modules") for b in unet.down_blocks)
    text = sim.external(c.batch * F * T, e, "text")   # the caller's text states (not counted)
    sim.where = "conv_in"
    if motion:
        sim.bump(0, "hidden")
        x_in = sim.new(B * unet.conv_in.in_channels * h * w, e, "hidden")   # (B, C, F, h, w) -> (B*F, C, h, w)
    else:
        x_in = None
    sample = sim.new(B * unet.conv_in.out_channels * h * w, e, "skip")
    sim.free(x_in)
    skips = [(sample, h, w)]
    for i, blk in enumerate(unet.down_blocks):
        sim.where = f"down_blocks.{i}"
        attns = getattr(blk, "attentions", None) or [None] * len(blk.resnets)
        mms = getattr(blk, "motion_modules", None) or [None] * len(blk.resnets)
        for j, (res, att, mm) in enumerate(zip(blk.resnets, attns, mms)):
            hdl = _resnet(sim, res, sample, B * h * w, e)
            if att is not None:
                nxt = _transformer_2d(sim, att, hdl, B, h, w, text, T, e, c, f"down_blocks.{i}.attentions.{j}")
                sim.free(hdl)
                hdl = nxt
            if mm is not None:
                nxt = _motion_module(sim, mm, hdl, c.batch, F, h, w, e, c, f"down_blocks.{i}.motion_modules.{j}")
                sim.free(hdl)
                hdl = nxt
            sim.retag(hdl, "skip")
            skips.append((hdl, h, w))
            sample = hdl
        if getattr(blk, "downsamplers", None):
            for ds in blk.downsamplers:
                h2, w2 = (h + 1) // 2, (w + 1) // 2
                d = sim.new(B * ds.out_channels * h2 * w2, e, "skip")
                sim.save(sample)
                h, w = h2, w2
                skips.append((d, h, w))
                sample = d
    mid = unet.mid_block
    if mid is not None:
        sim.where = "mid_block"
        hdl = _resnet(sim, mid.resnets[0], sample, B * h * w, e)
        attns = getattr(mid, "attentions", [])
        mms = getattr(mid, "motion_modules", None) or [None] * len(attns)
        for j, (att, res) in enumerate(zip(attns, mid.resnets[1:])):
            nxt = _transformer_2d(sim, att, hdl, B, h, w, text, T, e, c, f"mid_block.attentions.{j}")
            sim.free(hdl)
            hdl = nxt
            if mms[j] is not None:
                nxt = _motion_module(sim, mms[j], hdl, c.batch, F, h, w, e, c, f"mid_block.motion_modules.{j}")
                sim.free(hdl)
                hdl = nxt
            nxt = _resnet(sim, res, hdl, B * h * w, e)
            sim.free(hdl)
            hdl = nxt
        sample = hdl
    for i, blk in enumerate(unet.up_blocks):
        sim.where = f"up_blocks.{i}"
        n = len(blk.resnets)
        mine, skips = skips[-n:], skips[:-n]
        inp = sample
        hdl = sim.ref(inp)
        attns = getattr(blk, "attentions", None) or [None] * n
        mms = getattr(blk, "motion_modules", None) or [None] * n
        for j, (res, att, mm) in enumerate(zip(blk.resnets, attns, mms)):
            # torch.cat([hidden_states, skip mine[-1 - j]]); the skip lives until the block returns
            cat = sim.new(B * res.conv1.in_channels * h * w, e, "hidden")
            sim.free(hdl)
            nxt = _resnet(sim, res, cat, B * h * w, e)
            sim.free(cat)
            hdl = nxt
            if att is not None:
                nxt = _transformer_2d(sim, att, hdl, B, h, w, text, T, e, c, f"up_blocks.{i}.attentions.{j}")
                sim.free(hdl)
                hdl = nxt
            if mm is not None:
                nxt = _motion_module(sim, mm, hdl, c.batch, F, h, w, e, c, f"up_blocks.{i}.motion_modules.{j}")
                sim.free(hdl)
                hdl = nxt
        if getattr(blk, "upsamplers", None):
            for us in blk.upsamplers:
                sh, sw = skips[-1][1:] if skips else (2 * h, 2 * w)
                it = sim.new(B * us.channels * sh * sw, e, "hidden")   # nearest interpolation
                u = sim.new(B * us.out_channels * sh * sw, e, "hidden")
                sim.save(it)
                sim.free(it, hdl)
                hdl = u
                h, w = sh, sw
        sim.free(*[s for s, _, _ in mine])                 # the block returns: its skips die
        sim.free(inp)
        sample = hdl
    sim.where = "conv_out"
    if unet.conv_norm_out is not None:
        n = _group_norm(sim, sample, e, "hidden")
        sim.free(sample)
        s = sim.new(n.numel, e, "hidden")
        sim.save(n)
        sim.free(n)
        sample = s
    out = sim.new(B * unet.conv_out.out_channels * h * w, e, "hidden")
    sim.save(sample)
    sim.free(sample, out)


# ---------------------------------------------------------------------------------------------
# VAEs
def kl_vae_decode(sim: Sim, vae, batch: int, h: int, w: int, itemsize: int, slicing: bool = False,
                  tile: Optional[int] = None) -> None:
    """AutoencoderKL.decode of (batch, C, h, w) latents (SD1.5, SDXL, AnimateDiff frames), walked
    over ``vae.decoder``. slicing: one image at a time (``enable_slicing``; the decoded images are
    concatenated at the end). tile: the latent tile side of ``enable_tiling`` (None: no tiling, or
    the latents fit one tile); tiles overlap by 25% and every decoded tile is kept until they are
    blended. Tags: "vae" (activations), "image" (the decoded output)."""
    e = itemsize
    dec = vae.decoder
    scale = 2 ** (len(dec.up_blocks) - 1)
    out_ch = dec.conv_out.out_channels
    n = 1 if slicing else batch
    images = []
    if tile is not None and (h > tile or w > tile):
        stride = int(tile * 0.75)
        tiles = [(min(tile, h - i), min(tile, w - j)) for i in range(0, h, stride) for j in range(0, w, stride)]
        kept = []
        for th, tw in tiles:
            o = _kl_decoder(sim, vae, dec, n, th, tw, e)
            kept.append(o)
        res = sim.new(n * out_ch * h * scale * w * scale, e, "image")   # blended and concatenated
        sim.free(*kept)
        images.append(res)
    else:
        for _ in range(batch if slicing else 1):
            images.append(_kl_decoder(sim, vae, dec, n, h, w, e))
    if slicing and batch > 1:
        out = sim.new(batch * out_ch * h * scale * w * scale, e, "image")
        sim.free(*images)
        sim.free(out)
    else:
        sim.free(*images)


def _kl_decoder(sim: Sim, vae, dec, B: int, h: int, w: int, e: int):
    """post_quant_conv + Decoder of B latents of h x w; returns the decoded images' handle."""
    C_lat = dec.conv_in.in_channels
    pq = sim.new(B * C_lat * h * w, e, "vae") if getattr(vae, "post_quant_conv", None) is not None else None
    x = sim.new(B * dec.conv_in.out_channels * h * w, e, "vae")
    sim.free(pq)
    P = B * h * w
    mid = dec.mid_block
    hdl = _resnet(sim, mid.resnets[0], x, P, e, "vae", temb=False)
    sim.free(x)
    for att, res in zip(mid.attentions, mid.resnets[1:]):
        if att is not None:
            nxt = _vae_attention(sim, att, hdl, B, h * w, e)
            sim.free(hdl)
            hdl = nxt
        nxt = _resnet(sim, res, hdl, P, e, "vae", temb=False)
        sim.free(hdl)
        hdl = nxt
    for blk in dec.up_blocks:
        for res in blk.resnets:
            nxt = _resnet(sim, res, hdl, B * h * w, e, "vae", temb=False)
            sim.free(hdl)
            hdl = nxt
        if blk.upsamplers:
            for us in blk.upsamplers:
                h, w = 2 * h, 2 * w
                it = sim.new(B * us.channels * h * w, e, "vae")
                u = sim.new(B * us.out_channels * h * w, e, "vae")
                sim.free(it, hdl)
                hdl = u
    n = sim.new(hdl.numel, e, "vae")                                       # conv_norm_out
    sim.free(hdl)
    a = sim.new(n.numel, e, "vae")                                         # silu
    sim.free(n)
    out = sim.new(B * dec.conv_out.out_channels * h * w, e, "image")
    sim.free(a)
    return out


def _vae_attention(sim: Sim, attn, x, B: int, N: int, e: int):
    """The single-head spatial attention of the VAE's mid block (AttnProcessor2_0 on 4-D input,
    group norm, residual connection); F.linear on the transposed group-norm output copies it."""
    C = attn.to_q.in_features
    X = B * N * C
    gn = sim.new(X, e, "vae")
    parts = []
    for _ in range(3):
        cp = sim.new(X, e, "vae")                          # reshape copy of the transposed input
        parts.append(sim.new(X, e, "vae"))
        sim.free(cp)
    out = sim.new(X, e, "vae")
    proj = sim.new(X, e, "vae")
    sim.free(out)
    back = sim.new(X, e, "vae")                            # transpose + reshape to (B, C, h, w): a copy
    sim.free(proj)
    r = sim.new(X, e, "vae")                               # + residual
    sim.free(back)
    o = sim.new(X, e, "vae")                               # / rescale_output_factor
    sim.free(r, gn, *parts)
    return o


def _wan_rms(sim: Sim, x, e: int):
    """WanRMS_norm: F.normalize (float32 for half inputs), * scale, * gamma, + bias."""
    up = sim.cast(x, F32, "vae")
    nrm = sim.new(x.numel, F32, "vae")
    sim.free(up)
    nz = sim.cast(nrm, e, "vae")
    sim.free(nrm)
    t1 = sim.new(x.numel, e, "vae")
    t2 = sim.new(x.numel, e, "vae")
    sim.free(t1)
    t3 = sim.new(x.numel, e, "vae")
    sim.free(t2, nz)
    return t3


class WanDecoderCache:
    """The causal decoder's feature cache: {conv index: (handle, frames)} (the last one or two
    frames of each causal conv's input; "Rep" marks the first call of a temporal upsampler), kept
    across chunks: FIFO's decoder state."""

    def __init__(self):
        self.slots: dict = {}
        self.idx = 0

    def get(self):
        return self.slots.get(self.idx)

    def put(self, sim: Sim, entry) -> None:
        old = self.slots.get(self.idx)
        if entry is not None and entry != "Rep":
            sim.retag(entry[0], "vae cache")
        self.slots[self.idx] = entry
        if old is not None and old != "Rep":
            sim.free(old[0])
        self.idx += 1

    @property
    def nbytes(self) -> int:
        return sum(v[0].nbytes for v in self.slots.values() if v is not None and v != "Rep")

    def free(self, sim: Sim) -> None:
        for v in self.slots.values():
            if v is not None and v != "Rep":
                sim.free(v[0])
        self.slots = {}


def _new_cache_entry(sim: Sim, C: int, B: int, T: int, H: int, W: int, e: int, slot):
    """cache_x = x[:, :, -2:].clone(), with the previous entry's last frame in front when x has one
    frame (zeros in front after "Rep")."""
    clone = sim.new(B * C * min(T, 2) * H * W, e, "vae")
    if T < 2 and slot is not None:
        if slot == "Rep":
            z = sim.new(clone.numel, e, "vae")                   # zeros_like
            full = sim.new(2 * clone.numel, e, "vae")
            sim.free(z)
        else:
            full = sim.new(2 * clone.numel, e, "vae")
        sim.free(clone)
        return (full, 2)
    return (clone, min(T, 2))


def _causal_conv(sim: Sim, conv, x, B: int, T: int, H: int, W: int, e: int, cache: Optional[WanDecoderCache]):
    """WanCausalConv3d, with the feature cache for temporal kernels: clone the input's last frames,
    cat the cached frames in front, pad, convolve. Returns the output handle."""
    cin, cout = conv.in_channels, conv.out_channels
    kt = conv.kernel_size[0]
    pd = conv._padding                     # (w, w, h, h, 2 * t, 0); the Conv3d itself pads nothing
    pw, ph, pad_t = pd[0], pd[2], pd[4]
    entry = None
    prev = 0
    if cache is not None and kt > 1:
        slot = cache.get()
        entry = _new_cache_entry(sim, cin, B, T, H, W, e, slot)
        if slot is not None and slot != "Rep":
            prev = slot[1]
    cat = sim.new(B * cin * (T + prev) * H * W, e, "vae") if prev else None
    tp = max(0, pad_t - prev)
    pad = sim.new(B * cin * (T + prev + tp) * (H + 2 * ph) * (W + 2 * pw), e, "vae")   # F.pad (a copy)
    sim.free(cat)
    out = sim.new(B * cout * T * H * W, e, "vae")
    sim.free(pad)
    if cache is not None and kt > 1:
        cache.put(sim, entry)
    return out


def _wan_resblock(sim: Sim, r, x, B: int, T: int, H: int, W: int, e: int, cache: WanDecoderCache):
    cin = r.conv1.in_channels
    cout = r.conv2.out_channels
    if type(r.conv_shortcut).__name__ != "Identity":
        h = _causal_conv(sim, r.conv_shortcut, x, B, T, H, W, e, None)
    else:
        h = sim.ref(x)
    n1 = _wan_rms(sim, x, e)
    s1 = sim.new(n1.numel, e, "vae")
    sim.free(n1)
    c1 = _causal_conv(sim, r.conv1, s1, B, T, H, W, e, cache)
    sim.free(s1)
    n2 = _wan_rms(sim, c1, e)
    sim.free(c1)
    s2 = sim.new(n2.numel, e, "vae")
    sim.free(n2)
    c2 = _causal_conv(sim, r.conv2, s2, B, T, H, W, e, cache)
    sim.free(s2)
    out = sim.new(B * cout * T * H * W, e, "vae")
    sim.free(c2, h)
    del cin
    return out


def wan_vae_decode_chunk(sim: Sim, vae, B: int, T: int, h: int, w: int, e: int, cache: WanDecoderCache):
    """One call of WanDecoder3d on T latent frames (a view of the post_quant_conv output; the
    causal decoder is called one latent frame at a time); returns (output handle, frames out).
    A block's input lives until the block returns (the caller's variable holds it)."""
    dec = vae.decoder
    cache.idx = 0
    H, W = h, w
    x = _causal_conv(sim, dec.conv_in, None, B, T, H, W, e, cache)
    mid = dec.mid_block
    m = _wan_resblock(sim, mid.resnets[0], x, B, T, H, W, e, cache)
    for att, res in zip(mid.attentions, mid.resnets[1:]):
        C = att.dim
        X = B * C * T * H * W
        p = sim.new(X, e, "vae")                                            # permute + reshape copy
        n = _wan_rms(sim, p, e)
        sim.free(p)
        qkv = sim.new(3 * X, e, "vae")
        sim.free(n)
        qkv2 = sim.new(3 * X, e, "vae")                                     # permute + contiguous
        sim.free(qkv)
        o = sim.new(X, e, "vae")
        back = sim.new(X, e, "vae")                                         # squeeze/permute/reshape copy
        sim.free(o)
        pr = sim.new(X, e, "vae")
        sim.free(back)
        a = sim.new(X, e, "vae")                                            # + identity
        sim.free(pr, qkv2)                                                  # q, k, v views die on return
        sim.free(m)
        m = _wan_resblock(sim, res, a, B, T, H, W, e, cache)
        sim.free(a)
    sim.free(x)                                                             # the decoder rebinds x
    x = m
    for blk in dec.up_blocks:
        inp = x
        # WanResidualUpBlock (the Wan 2.2 VAE) clones its input first, whether or not it has a
        # DupUp3D shortcut to add it through (the last block has none); Wan 2.1's WanUpBlock does not
        copy = sim.new(x.numel, e, "vae") if hasattr(blk, "avg_shortcut") else None
        y = sim.ref(inp)
        for res in blk.resnets:
            nxt = _wan_resblock(sim, res, y, B, T, H, W, e, cache)
            sim.free(y)
            y = nxt
        ups = list(blk.upsamplers) if getattr(blk, "upsamplers", None) else (
            [blk.upsampler] if getattr(blk, "upsampler", None) is not None else [])
        for us in ups:
            C = us.dim
            z = sim.ref(y)                                                  # WanResample's local x
            if us.mode == "upsample3d":
                slot = cache.get()
                if slot is None:
                    cache.put(sim, "Rep")                                   # first call: no time conv
                else:
                    entry = _new_cache_entry(sim, C, B, T, H, W, e, slot)
                    prev = slot[1] if slot != "Rep" else 0
                    cat = sim.new(B * C * (T + prev) * H * W, e, "vae") if prev else None
                    pad = sim.new(B * C * (T + max(prev, 2)) * H * W, e, "vae")   # F.pad: a copy
                    sim.free(cat)
                    tc = sim.new(B * 2 * C * T * H * W, e, "vae")
                    sim.free(pad)
                    cache.put(sim, entry)
                    st = sim.new(tc.numel, e, "vae")                        # stack of the two halves
                    sim.free(tc, z)
                    z = st
                    T = 2 * T
            p = sim.new(B * C * T * H * W, e, "vae")                        # permute + reshape copy
            sim.free(z)
            H, W = 2 * H, 2 * W
            it = sim.cast(p, F32, "vae")
            up = sim.new(B * C * T * H * W, F32, "vae")                     # nearest-exact, in float32
            sim.free(it)
            upc = sim.cast(up, e, "vae")
            sim.free(up)
            conv = us.resample[1]                                           # nn.Conv2d pads inside the kernel
            o = sim.new(B * conv.out_channels * T * H * W, e, "vae")
            sim.free(upc, p)
            sim.free(y)
            y = o
        if getattr(blk, "avg_shortcut", None) is not None:
            sc = sim.new(y.numel, e, "vae")                                 # DupUp3D(copy)
            s2 = sim.new(y.numel, e, "vae")
            sim.free(sc, y, copy)
            y = s2
        else:
            sim.free(copy)
        sim.free(inp)                                                       # the decoder rebinds x
        x = y
    n = _wan_rms(sim, x, e)
    sim.free(x)
    s = sim.new(n.numel, e, "vae")
    sim.free(n)
    out = _causal_conv(sim, dec.conv_out, s, B, T, H, W, e, cache)
    sim.free(s)
    sim.retag(out, "video")
    return out, T


def wan_vae_decode(sim: Sim, vae, B: int, T_lat: int, h: int, w: int, e: int = F32,
                   tile: Optional[tuple] = None) -> None:
    """AutoencoderKLWan.decode of (B, z, T_lat, h, w): post_quant_conv, then one latent frame per
    decoder call with the feature cache, the outputs concatenated as they come (the cat of the
    growing video with each chunk), clamp. tile: (tile_h, tile_w, stride_h, stride_w) in latent
    pixels for ``enable_tiling`` (every tile decoded over all frames and kept until blended)."""
    z_pad = sim.new(B * vae.decoder.conv_in.in_channels * T_lat * h * w, e, "vae")   # post_quant_conv: F.pad copy
    pq = sim.new(z_pad.numel, e, "vae")
    sim.free(z_pad)
    spatial = 2 ** sum(1 for b in vae.decoder.up_blocks if getattr(b, "upsamplers", None) or
                       getattr(b, "upsampler", None) is not None)
    # the decoder's own output: conv_out's channels at `spatial` x the latents; a VAE with a
    # patch_size (Wan 2.2: 12 channels at 8x) is unpatchified afterwards (3 channels at 16x: the
    # same bytes, one more copy)
    c_out, f_out = vae.decoder.conv_out.out_channels, 4 * (T_lat - 1) + 1
    patched = getattr(getattr(vae, "config", None), "patch_size", None) is not None
    if tile is not None and (h > tile[0] or w > tile[1]):
        th, tw, sh, sw = tile
        sim.free(pq)
        kept = []
        rows_numel = 0
        for i in range(0, h, sh):
            for j in range(0, w, sw):
                cache = WanDecoderCache()
                frames = []
                for k in range(T_lat):
                    o, _ = wan_vae_decode_chunk(sim, vae, B, 1, min(th, h - i), min(tw, w - j), e, cache)
                    frames.append(o)
                cat = sim.new(sum(f.numel for f in frames), e, "video")
                sim.free(*frames)
                kept.append(cat)
                cache.free(sim)
                rows_numel += B * c_out * f_out * min(th, h - i, sh) * spatial * min(tw, w - j, sw) * spatial
        # tiled_decode keeps every tile and every blended row (lists) to its end; the rows are
        # concatenated, cut to size, unpatchified (a copy) and clamped (a copy)
        rows = sim.new(rows_numel, e, "video")
        whole = sim.new(rows_numel, e, "video")
        video = B * c_out * f_out * h * spatial * w * spatial
        if patched:
            unp = sim.new(video, e, "video")
            sim.free(whole)
            whole = unp
        res = sim.new(video, e, "video")
        sim.free(whole, rows, *kept)
        sim.free(res)
        return
    cache = WanDecoderCache()
    out = prev = None
    for k in range(T_lat):
        o, _ = wan_vae_decode_chunk(sim, vae, B, 1, h, w, e, cache)
        sim.free(prev)                     # `out_` of the previous chunk, rebound only now
        if out is None:
            out = o
            prev = None
        else:
            cat = sim.new(out.numel + o.numel, e, "video")
            sim.free(out)
            out, prev = cat, o
    if patched:                            # unpatchify: a contiguous copy, `out_` and x still bound
        unp = sim.new(out.numel, e, "video")
        sim.free(out)
        out = unp
    sim.free(prev, pq)
    cl = sim.new(out.numel, e, "video")                                     # clamp
    sim.free(out)
    cache.free(sim)
    sim.free(cl)


def _wan_decoder_geometry(vae):
    """(decoder output channels, its spatial factor over the latents, whether the output is
    unpatchified): Wan 2.1 3 channels at 8x; Wan 2.2 12 channels at 8x, unpatchified to 3 at 16x."""
    spatial = 2 ** sum(1 for b in vae.decoder.up_blocks if getattr(b, "upsamplers", None) or
                       getattr(b, "upsampler", None) is not None)
    patched = getattr(getattr(vae, "config", None), "patch_size", None) is not None
    return vae.decoder.conv_out.out_channels, spatial, patched


def _stream_chunk_out(sim: Sim, numel: int, patched: bool, e: int, held=None):
    """What happens to one decoded chunk after the decoder returns it (longvideo.decode's
    _finish_wan, then iter_frames' postprocess_video, np): unpatchify (a contiguous copy, Wan 2.2),
    clamp; then ``(x * 0.5 + 0.5).clamp(0, 1)`` (three temporaries, two alive at a time) and
    ``.cpu()`` (on a GPU the frames leave the device; on a CPU the float32 tensor is shared with
    numpy, whose np.stack copy is not a torch tensor). `numel`: the chunk's elements (B, C, n, H, W
    as the decoder returns it). `held`: the previous chunk's clamped output,
    which ``torch.no_grad``'s generator wrapper around ``iter_decoded`` keeps (its ``response``)
    until this chunk replaces it. Returns this chunk's clamped output (held in turn)."""
    unp = sim.new(numel, e, "video") if patched else None
    cl = sim.new(numel, e, "video")
    sim.free(unp)
    sim.free(held)
    t1 = sim.new(numel, e, "video")
    t2 = sim.new(numel, e, "video")
    sim.free(t1)
    t3 = sim.new(numel, e, "video")
    sim.free(t2)
    sim.free(t3)
    return cl


# the latent frames a streamed decode walks: frame 0 (one video frame, the upsamplers' "Rep"),
# frame 1 (the caches filled), frame 2 (the first steady-state frame: every cache entry two
# frames, the previous chunk four frames) and frame 3, identical to frame 2 -- as is every later
# frame, so the peak does not depend on the length
STREAM_FRAMES_WALKED = 4


def wan_vae_decode_streamed(sim: Sim, vae, B: int, T_lat: int, h: int, w: int, e: int = F32,
                            tile: Optional[tuple] = None) -> int:
    """longvideo.decode.decode_to of a (B=1, z, T_lat, h, w) latent video on AutoencoderKLWan (what
    ``longvideo generate --method freeloc|direct`` and ``longvideo enhance`` run): the pipeline's
    latents mapped to the VAE's space (``latents / (1 / std) + mean``: a copy, kept to the end),
    then one latent frame per decoder call with the feature cache, each chunk clamped,
    post-processed and handed to the writer before the next call. The generator keeps the
    previous call's output (its variable) until the next call returns.

    Untiled: post_quant_conv of the whole latent video once (a copy, kept to the end), one cache.
    tile: (tile_h, tile_w, stride_h, stride_w) in latent pixels (``enable_tiling``): every tile's
    post_quant_conv and decoder call per frame, one cache per tile (all alive to the end), the
    frame's tiles kept until blended (in place), cropped, concatenated by rows and then into the
    frame; the last row's tiles of a frame stay referenced (the loop's variables) until the next
    frame's blend. The walk stops after STREAM_FRAMES_WALKED frames (later frames repeat the
    steady state: the same bytes). Returns the number of latent frames walked."""
    if B != 1:
        raise ValueError(f"B: the streamed decode decodes one video (batch 1), got {B}")
    C = vae.decoder.conv_in.in_channels
    lat = B * C * T_lat * h * w
    d = sim.new(lat, e, "vae")                                   # vae_latents: latents / inv_std
    z = sim.new(lat, e, "vae")                                   # ... + mean
    sim.free(d)
    c_out, spatial, patched = _wan_decoder_geometry(vae)
    walk = min(T_lat, STREAM_FRAMES_WALKED)
    if tile is None or not (h > tile[0] or w > tile[1]):
        zp = sim.new(lat, e, "vae")                              # post_quant_conv: F.pad copy
        x = sim.new(lat, e, "vae")
        sim.free(zp)
        cache = WanDecoderCache()
        prev = held = None
        for _ in range(walk):
            o, _n = wan_vae_decode_chunk(sim, vae, B, 1, h, w, e, cache)
            sim.free(prev)                                       # `out` rebound after the call
            prev = o
            held = _stream_chunk_out(sim, o.numel, patched, e, held)
        sim.free(prev, held, x, z)
        cache.free(sim)
        return walk
    th, tw, sh, sw = tile
    rows, cols = list(range(0, h, sh)), list(range(0, w, sw))
    caches = {(i, j): WanDecoderCache() for i in rows for j in cols}
    prev_out, prev_last_row, held = None, [], None
    for _ in range(walk):
        tiles, pq = {}, None
        for i in rows:
            for j in cols:
                hh, ww = min(th, h - i), min(tw, w - j)
                pad = sim.new(B * C * hh * ww, e, "vae")         # post_quant_conv of the tile: F.pad copy
                nxt = sim.new(pad.numel, e, "vae")
                sim.free(pad)
                sim.free(pq)                                     # `tile` rebound
                pq = nxt
                tiles[(i, j)], n = wan_vae_decode_chunk(sim, vae, B, 1, hh, ww, e, caches[(i, j)])
        sim.free(pq)                                             # `tile` rebound by the blend loop
        sim.free(*prev_last_row)                                 # `result_row` rebound: the last frame's row
        row_cats = []
        for a, i in enumerate(rows):
            kept = 0
            for b, j in enumerate(cols):
                hh, ww = min(th, h - i), min(tw, w - j)
                for blend, side in ((a > 0, ww), (b > 0, hh)):  # blend_v, blend_h: per line, in place
                    if blend:
                        tmp = [sim.new(B * c_out * n * side * spatial, e, "video") for _ in range(3)]
                        sim.free(*tmp)
                kept += B * c_out * n * min(sh, hh) * spatial * min(sw, ww) * spatial
            row_cats.append(sim.new(kept, e, "video"))           # torch.cat(result_row, dim=-1)
        last = [tiles[(rows[-1], j)] for j in cols]
        sim.free(*[v for k_, v in tiles.items() if k_[0] != rows[-1]])   # del rows
        out = sim.new(sum(r.numel for r in row_cats), e, "video")        # torch.cat(result_rows, dim=3)
        sim.free(prev_out)                                       # `out` rebound
        sim.free(*row_cats)                                      # del result_rows
        prev_out, prev_last_row = out, last
        held = _stream_chunk_out(sim, B * c_out * n * h * spatial * w * spatial, patched, e, held)   # the crop
    sim.free(prev_out, held, *prev_last_row, z)
    for c in caches.values():
        c.free(sim)
    return walk


# ---------------------------------------------------------------------------------------------
# text encoders (coarse: a formula per encoder type, not an op-by-op walk)
def text_encoder_peak(comp, batch: int, seq: int, itemsize: int) -> int:
    """Peak activation bytes of one text-encoder call on `batch` prompts of `seq` tokens.

    T5 / UMT5 encoders (eager attention with a relative position bias): the hidden state with its
    float32 norm temporaries, plus the larger of the attention step (scores and bias in the
    model's dtype, the float32 softmax and its cast: B*H*L^2*(3e + 4)) and the gated FFN (three
    (B, L, d_ff) tensors). CLIP text encoders (SDPA attention, 77 tokens): every layer's hidden
    state (the SD pipelines ask for all of them) plus the MLP (two (B, L, 4d) tensors). Coarse by
    design (+-30%): text encoding is never the peak of a run with the encoder's weights counted."""
    cfg = comp.config
    e = itemsize
    B, L = batch, seq
    if "d_model" in cfg:                                   # T5 family
        d, H, dff = int(cfg["d_model"]), int(cfg["num_heads"]), int(cfg["d_ff"])
        hidden = B * L * d * (2 * e + 2 * F32)
        attn = B * H * L * L * (3 * e + F32)
        ffn = 3 * B * L * dff * e
        # the relative-position buckets of each layer's bias: six (L, L) int64 temporaries, a
        # float32 log and two boolean masks (transformers' _relative_position_bucket)
        buckets = L * L * (6 * 8 + F32 + 2)
        return hidden + max(attn, ffn, buckets) + 2 * B * L * d * e
    d = int(cfg.get("hidden_size", 768))
    layers = int(cfg.get("num_hidden_layers", 12))
    dff = int(cfg.get("intermediate_size", 4 * d))
    L = min(L, int(cfg.get("max_position_embeddings", 77)))
    return (layers + 1) * B * L * d * e + max(3 * B * L * d * e, 2 * B * L * dff * e) + 2 * B * L * d * e


# ---------------------------------------------------------------------------------------------
# image-to-video: the CLIP image encoder, the Wan VAE encoder, the pipeline's condition
def clip_vision_call(sim: Sim, cfg: dict, batch: int, itemsize: int = F32):
    """transformers' CLIPVisionModel(pixel_values, output_hidden_states=True), as
    ``WanImageToVideoPipeline.encode_image`` calls it (Wan 2.1 I2V's image encoder), op by op:
    the patch convolution, the class token and position embeddings, ``pre_layrnorm``, then per
    layer layer_norm1, q / k / v, SDPA (flash-style: one output in the query's layout, so the
    transpose back is a view), out_proj, the residual, layer_norm2, fc1, the activation
    (quick_gelu: three temporaries; gelu: one), fc2, the residual. Every layer's output is kept to
    the end (the output's ``hidden_states``: L + 1 tensors of (B, N, d)).

    cfg: the encoder's config (a CLIPVisionConfig dict, or a CLIPConfig with ``vision_config``);
    N = (image_size / patch_size)^2 + 1 tokens. Returns the handle of ``hidden_states[-2]``, what
    the pipeline keeps (the other hidden states die with the output object). Tag "image encoder"."""
    cfg = cfg.get("vision_config", cfg)
    d = int(cfg.get("hidden_size", 768))
    layers = int(cfg.get("num_hidden_layers", 12))
    dff = int(cfg.get("intermediate_size", 4 * d))
    grid = int(cfg.get("image_size", 224)) // int(cfg.get("patch_size", 32))
    N, e, B, tag = grid * grid + 1, itemsize, batch, "image encoder"
    X = B * N * d
    quick = str(cfg.get("hidden_act", "quick_gelu")) == "quick_gelu"
    sim.where = "image encoder embeddings"
    patch = sim.new(B * d * (N - 1), e, tag)            # patch_embedding (conv)
    cat = sim.new(X, e, tag)                            # cat([class token, patches])
    pos = sim.new(N * d, e, tag)                        # position_embedding(position_ids)
    emb = sim.new(X, e, tag)                            # + position
    sim.free(cat, pos, patch)
    hidden = sim.new(X, e, tag)                         # pre_layrnorm
    sim.free(emb)
    states = [hidden]
    for layer in range(layers):
        sim.where = f"image encoder layer {layer}"
        n1 = sim.new(X, e, tag)                         # layer_norm1
        q, k, v = (sim.new(X, e, tag) for _ in range(3))
        o = sim.new(X, e, tag)                          # SDPA (lse: B*H*N floats, not modelled)
        proj = sim.new(X, e, tag)                       # out_proj
        sim.free(q, k, v, o)
        sim.free(n1)
        r1 = sim.new(X, e, tag)                         # residual + attention
        sim.free(proj)
        n2 = sim.new(X, e, tag)                         # layer_norm2
        f1 = sim.new(B * N * dff, e, tag)               # fc1
        if quick:                                       # x * sigmoid(1.702 * x)
            t = sim.new(f1.numel, e, tag)
            s = sim.new(f1.numel, e, tag)
            sim.free(t)
            g = sim.new(f1.numel, e, tag)
            sim.free(s)
        else:
            g = sim.new(f1.numel, e, tag)
        sim.free(f1)
        f2 = sim.new(X, e, tag)                         # fc2
        sim.free(g, n2)
        out = sim.new(X, e, tag)                        # residual + mlp
        sim.free(f2, r1)
        states.append(out)
    sim.where = "image encoder output"
    keep = states[-2]
    sim.free(*[h for h in states if h is not keep])
    return keep


def _wan_vae_attention(sim: Sim, C: int, B: int, T: int, H: int, W: int, e: int):
    """WanAttentionBlock (one head over each frame's pixels); the input is the caller's."""
    X = B * C * T * H * W
    p = sim.new(X, e, "vae")                                            # permute + reshape copy
    n = _wan_rms(sim, p, e)
    sim.free(p)
    qkv = sim.new(3 * X, e, "vae")
    qkv2 = sim.new(3 * X, e, "vae")                                     # permute + contiguous
    sim.free(qkv)
    o = sim.new(X, e, "vae")
    sim.free(n)
    back = sim.new(X, e, "vae")                                         # squeeze/permute/reshape copy
    sim.free(o)
    pr = sim.new(X, e, "vae")
    sim.free(back)
    out = sim.new(X, e, "vae")                                          # + identity
    sim.free(pr, qkv2)
    return out


def _wan_downsample(sim: Sim, rs, x, B: int, T: int, H: int, W: int, e: int, cache: WanDecoderCache):
    """WanResample "downsample2d" / "downsample3d" of the encoder: the frames as a batch of
    images (a copy), ZeroPad2d (a copy), the stride-2 Conv2d; downsample3d then keeps the first
    call's output in the cache and afterwards convolves [last cached frame, x] in time with
    stride 2. Returns (output handle, T, H, W); x is the caller's."""
    C = rs.dim
    p = sim.new(B * C * T * H * W, e, "vae")                            # permute + reshape copy
    pad = sim.new(B * C * T * (H + 1) * (W + 1), e, "vae")              # ZeroPad2d((0, 1, 0, 1))
    H, W = H // 2, W // 2
    out = sim.new(B * C * T * H * W, e, "vae")
    sim.free(pad, p)
    if rs.mode == "downsample3d" and cache is not None:
        if cache.get() is None:
            cache.put(sim, (sim.new(out.numel, e, "vae"), T))           # x.clone(): no time conv yet
        else:
            keep = sim.new(B * C * H * W, e, "vae")                     # x[:, :, -1:].clone()
            cat = sim.new(B * C * (T + 1) * H * W, e, "vae")
            padded = sim.new(cat.numel, e, "vae")                       # F.pad with zero pads: a copy
            T = (T + 1 - 3) // 2 + 1
            o2 = sim.new(B * C * T * H * W, e, "vae")
            sim.free(padded, cat, out)
            cache.put(sim, (keep, 1))
            out = o2
    return out, T, H, W


def _wan_residual_down_block(sim: Sim, blk, x, B: int, T: int, H: int, W: int, e: int, cache: WanDecoderCache):
    """WanResidualDownBlock (the Wan 2.2 VAE): x.clone(), the residual blocks, the downsampler,
    plus AvgDown3D of the clone (F.pad copy, permute + contiguous copy, mean). x is the caller's."""
    copy = sim.new(x.numel, e, "vae")
    y = sim.ref(x)
    T0, H0, W0 = T, H, W
    for res in blk.resnets:
        nxt = _wan_resblock(sim, res, y, B, T, H, W, e, cache)
        sim.free(y)
        y = nxt
    if blk.downsampler is not None:
        nxt, T, H, W = _wan_downsample(sim, blk.downsampler, y, B, T, H, W, e, cache)
        sim.free(y)
        y = nxt
    avg = blk.avg_shortcut
    ft, fs = avg.factor_t, avg.factor_s
    Tp = T0 + (ft - T0 % ft) % ft
    padded = sim.new(B * avg.in_channels * Tp * H0 * W0, e, "vae")      # F.pad (a copy)
    perm = sim.new(padded.numel, e, "vae")                              # permute(...).contiguous()
    sim.free(padded)
    mean = sim.new(B * avg.out_channels * (Tp // ft) * (H0 // fs) * (W0 // fs), e, "vae")
    sim.free(perm)
    out = sim.new(y.numel, e, "vae")                                    # x + avg_shortcut(x_copy)
    sim.free(mean, y, copy)
    return out, T, H, W


def wan_vae_encode_chunk(sim: Sim, vae, B: int, T: int, H: int, W: int, e: int, cache: WanDecoderCache):
    """One WanEncoder3d call on T frames (1 for the first chunk, then 4) of the encoder's input
    (the video, patchified on the Wan 2.2 VAE), H x W pixels, with the causal feature cache
    (``cache``, kept across chunks: the last frames of every causal conv's input). A block's input
    lives until the block returns. Returns (output handle (B, 2 z, T', H', W'), T')."""
    enc = vae.encoder
    cache.idx = 0
    x = _causal_conv(sim, enc.conv_in, None, B, T, H, W, e, cache)
    for layer in enc.down_blocks:
        kind = type(layer).__name__
        if kind == "WanResidualBlock":
            y = _wan_resblock(sim, layer, x, B, T, H, W, e, cache)
        elif kind == "WanAttentionBlock":
            y = _wan_vae_attention(sim, layer.dim, B, T, H, W, e)
        elif kind == "WanResample":
            y, T, H, W = _wan_downsample(sim, layer, x, B, T, H, W, e, cache)
        elif kind == "WanResidualDownBlock":
            y, T, H, W = _wan_residual_down_block(sim, layer, x, B, T, H, W, e, cache)
        else:
            raise ValueError(f"the Wan VAE encoder walk does not know the block {kind}")
        sim.free(x)
        x = y
    mid = enc.mid_block
    m = _wan_resblock(sim, mid.resnets[0], x, B, T, H, W, e, cache)
    for att, res in zip(mid.attentions, mid.resnets[1:]):
        a = _wan_vae_attention(sim, att.dim, B, T, H, W, e)
        sim.free(m)
        m = _wan_resblock(sim, res, a, B, T, H, W, e, cache)
        sim.free(a)
    sim.free(x)                                                         # the encoder rebinds x
    n = _wan_rms(sim, m, e)
    sim.free(m)
    s = sim.new(n.numel, e, "vae")                                      # silu
    sim.free(n)
    out = _causal_conv(sim, enc.conv_out, s, B, T, H, W, e, cache)
    sim.free(s)
    return out, T


def _quant_conv(sim: Sim, x, e: int):
    """quant_conv, a 1x1x1 WanCausalConv3d (2 z -> 2 z): F.pad's copy, then the output."""
    pad = sim.new(x.numel, e, "vae")
    out = sim.new(x.numel, e, "vae")
    sim.free(pad)
    return out


def wan_vae_encode(sim: Sim, vae, B: int, frames: int, height: int, width: int, e: int = F32,
                   tile: Optional[tuple] = None):
    """``AutoencoderKLWan.encode`` of a (B, 3, frames, height, width) video (the caller's tensor),
    as diffusers 0.42 runs it: patchify (a copy, Wan 2.2's patch 2), the causal encoder on the
    first frame and then on 4 frames per call with the feature cache, the outputs concatenated as
    they come (the previous chunk's output alive during the next call), ``quant_conv``, the cache
    cleared; then the ``DiagonalGaussianDistribution`` (clamped log-variance, std, variance), which
    dies once the pipeline has taken its mode (``retrieve_latents(..., "argmax")``: a view of the
    moments). Returns the handle of the moments (B, 2 z, 1 + (frames - 1) // 4, h, w).

    tile: (tile_h, tile_w, stride_h, stride_w) in pixels of the encoder's input for
    ``enable_tiling`` (used when the video is larger than the tile): ``tiled_encode``, every tile
    encoded over all frames (quant_conv per chunk, the chunks concatenated per tile), all tiles kept,
    blended in place, cropped, concatenated per row and then whole."""
    patch = getattr(vae.config, "patch_size", None)
    H, W = height, width
    xp = None
    if patch:
        xp = sim.new(B * 3 * frames * height * width, e, "vae")         # patchify: a contiguous copy
        H, W = height // patch, width // patch
    chunks = 1 + (frames - 1) // 4
    if tile is not None and (width > tile[1] or height > tile[0]):
        th, tw, sh, sw = tile
        s = int(vae.config.scale_factor_spatial) // (patch or 1)        # the encoder's own factor
        tiles, time, row_numels = [], [], []
        cache = None
        for i in range(0, H, sh):
            row = 0
            for j in range(0, W, sw):
                if cache is not None:
                    cache.free(sim)                                     # clear_cache
                sim.free(*time)                                         # the previous tile's chunks
                cache, time = WanDecoderCache(), []
                hh, ww = min(th, H - i), min(tw, W - j)
                for k in range(chunks):
                    o, _ = wan_vae_encode_chunk(sim, vae, B, 1 if k == 0 else 4, hh, ww, e, cache)
                    time.append(_quant_conv(sim, o, e))
                    sim.free(o)
                tiles.append(sim.new(sum(t.numel for t in time), e, "vae"))   # cat over time
                lat = tiles[-1].numel // ((hh // s) * (ww // s))
                row += lat * min(sh // s, hh // s) * min(sw // s, ww // s)     # the tile's crop
            row_numels.append(row)
        cache.free(sim)
        rows = [sim.new(n, e, "vae") for n in row_numels]               # cat of each row's crops
        enc = sim.new(sum(row_numels), e, "vae")                        # cat of the rows
        sim.free(*rows, *tiles, *time)
    else:
        cache = WanDecoderCache()
        out = prev = None
        for k in range(chunks):
            o, _ = wan_vae_encode_chunk(sim, vae, B, 1 if k == 0 else 4, H, W, e, cache)
            sim.free(prev)                                              # out_ of the previous chunk
            if out is None:
                out = o
            else:
                cat = sim.new(out.numel + o.numel, e, "vae")
                sim.free(out)
                out, prev = cat, o
        enc = _quant_conv(sim, out, e)
        cache.free(sim)                                                 # clear_cache
        sim.free(out, prev)
    sim.free(xp)
    zc = enc.numel // 2
    logvar = sim.new(zc, e, "vae")                                      # clamp(logvar)
    half = sim.new(zc, e, "vae")                                        # 0.5 * logvar
    std = sim.new(zc, e, "vae")                                         # exp
    sim.free(half)
    var = sim.new(zc, e, "vae")                                         # exp(logvar)
    sim.free(logvar, std, var)                                          # the distribution dies
    return enc


def wan_vae_encode_stream_step(sim: Sim, vae, B: int, T: int, H: int, W: int, e: int, cache: WanDecoderCache):
    """One step of ``longvideo.methods.families.wan_i2v.ImageCondition``'s streamed encoding: T
    frames (the image, then 4 zero frames: a new float32 tensor), patchified on the Wan 2.2 VAE, one
    encoder call with the cache carried over, quant_conv, the mode normalised ((mu - mean) / std:
    two latent-frame tensors). The cache entries the call replaces stay alive until it returns
    (the step compares the old and the new cache). Returns the handle of the normalised latent
    frame (B, z, T', h, w)."""
    patch = getattr(vae.config, "patch_size", None)
    chunk = sim.new(B * 3 * T * H * W, F32, "vae") if T > 1 else None  # new_zeros (the image: a view)
    if patch:
        p = sim.new(B * 3 * T * H * W, e, "vae")
        sim.free(chunk)
        chunk = p
        H, W = H // patch, W // patch
    before = [sim.ref(v[0]) for v in cache.slots.values() if v is not None and v != "Rep"]
    o, _ = wan_vae_encode_chunk(sim, vae, B, T, H, W, e, cache)
    moments = _quant_conv(sim, o, e)
    sim.free(o)
    d = sim.new(moments.numel // 2, F32, "vae")                         # mu - mean
    lat = sim.new(d.numel, F32, "vae")                                  # * 1 / std
    sim.free(d, moments, chunk, *before)
    return lat


def wan_i2v_prepare_latents(sim: Sim, vae, B: int, frames: int, height: int, width: int, first_frame: bool,
                            dev: Device = CUDA, e_vae: int = F32, tile: Optional[tuple] = None) -> tuple:
    """``WanImageToVideoPipeline.prepare_latents`` (diffusers 0.42) for a (B, 3, height, width)
    image (the caller's float32 tensor): the noise latents (B, z, F, h, w) float32; the condition
    video -- Wan 2.1 / 2.2 A14B I2V: the image followed by ``frames - 1`` zero frames (a zeros
    tensor and the cat, float32); ``first_frame`` (Wan 2.2 TI2V, ``expand_timesteps``): the image
    alone -- encoded by the VAE (:func:`wan_vae_encode`); the mode repeated over the batch (a copy)
    and normalised ((x - mean) * 1/std); then

    * first_frame: the mask (1, 1, F, h, w) of ones (0 at frame 0); returns (latents, condition
      latents (B, z, 1, h, w), mask);
    * otherwise the mask (B, 4, F, h, w): built on the host by the pipeline (ones per video frame,
      the first frame repeated 4 times, concatenated) and moved to the device (on "cpu" the host
      tensors are the device's), concatenated with the condition latents; returns (latents,
      condition (B, 4 + z, F, h, w)). The condition video dies when the function returns."""
    z = int(vae.config.z_dim)
    s = int(vae.config.scale_factor_spatial)
    F = (frames - 1) // int(vae.config.scale_factor_temporal) + 1
    h, w = height // s, width // s
    sim.where = "prepare_latents"
    latents = sim.new(B * z * F * h * w, F32, "latents")                # randn
    video = None
    if not first_frame:
        zeros = sim.new(3 * (frames - 1) * height * width, F32, "condition video")
        video = sim.new(3 * frames * height * width, F32, "condition video")
        sim.free(zeros)
    sim.where = "VAE encode of the condition"
    enc = wan_vae_encode(sim, vae, 1, 1 if first_frame else frames, height, width, e_vae, tile)
    sim.where = "condition latents"
    lc = sim.new(B * enc.numel // 2, e_vae, "condition latents")         # .repeat(batch)
    sim.free(enc)
    d = sim.new(lc.numel, F32, "condition latents")                     # - mean
    m = sim.new(lc.numel, F32, "condition latents")                     # * 1/std
    sim.free(d, lc)
    lc = m
    if first_frame:
        mask = sim.new(F * h * w, F32, "condition mask")
        return latents, lc, mask
    if dev.kind == "cpu":                                               # the host tensors are the device's
        ones = sim.new(B * frames * h * w, F32, "condition mask")
        rep = sim.new(B * 4 * h * w, F32, "condition mask")             # repeat_interleave of frame 0
        mask = sim.new(B * 4 * F * h * w, F32, "condition mask")        # concat
        sim.free(ones)
    else:
        rep = None
        mask = sim.new(B * 4 * F * h * w, F32, "condition mask")        # .to(device) of the host mask
    cond = sim.new(B * (4 + z) * F * h * w, F32, "condition latents")    # cat([mask, condition latents])
    sim.free(rep, mask, lc, video)
    return latents, cond
