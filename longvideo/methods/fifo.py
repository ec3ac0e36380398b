"""FIFO-Diffusion (Kim et al. 2024) and Ouroboros-Diffusion (Chen et al. 2025) on diffusers video pipelines.

Diagonal denoising. The queue holds ``L`` latent frames at increasing noise levels: slot ``k`` at
level ``k + 1`` (levels 0 = clean .. L = tail; the family's grid of L steps, see ``longvideo.methods.families``
and ``timestep_grid`` below). Where this package and the official code differ, and by how much:
docs/fidelity.md. One iteration denoises every window of the queue once, so every slot
moves exactly one level down, then the head (now clean) leaves the queue -- decoded and written at
once -- and a new tail frame enters at level L. Each frame gets the model's per-frame update:

    flow matching (Wan, SkyReels-V2):  x_{k} = x_{k+1} + (sigma_k - sigma_{k+1}) v(x, sigma_{k+1})
    DDIM (AnimateDiff):    x_{k} = sqrt(abar_k) x0_hat + sqrt(1 - abar_k) eps(x, t_{k+1})

with the model called on a window of f frames with one noise level per frame (Wan: per-token 2-D
timestep; SkyReels-V2: per-frame (B, F) timestep with diffusion forcing; AnimateDiff: per-frame
time embeddings). Classifier-free guidance runs both halves in one
model call.

Without lookahead: ``L = n f`` and n windows of f slots. Lookahead denoising (default): windows of
f frames start every ``w = floor(f/2)`` positions over ``[c clean context frames | L slots]`` with
``c = f - w`` and ``L = 2 n w``; each window writes back only its last w frames, so every frame is
denoised with c cleaner frames before it (2n model calls per iteration). Even f: c = w = f/2 and
L = n f, as in the paper; odd f (Wan's 21 latent frames) is supported the same way.

Initial queue (as the official code builds it): a normally sampled clip of f latent frames (the
plain pipeline with ``init_steps`` steps, L by default); slot i gets clip frame
``max(0, i - (L - f))`` re-noised to level i + 1 with fresh noise, i.e. the last f slots hold the
clip in order and the slots before them copies of its first frame. The first ``L - f`` frames
that leave the queue are those copies: with ``skip_warmup=True`` (default, as the official code)
they are not emitted, so the video starts with the clip's first frame re-denoised by the queue.

Lookahead context (``lookahead_context``): ``"official"`` (default, as the official code, both its
VideoCrafter and its Open-Sora Plan branch): the c context frames start as the clip's first frame
re-noised to level 1 (the grid's lowest timestep t_0; DDIM with the official grid: std
sqrt(1 - abar(0)) ~ 0.03) with fresh noise per frame, and the model is told level 1's timestep
for every context frame at every iteration (the popped heads that later fill the context are at
level 0 but are still told t_0). ``"clean"``: the clip's first frame itself and level 0's timestep
(this package before the option existed). Noise draws of the initial state: the slots' noise,
then the context's ("official" only).

Timestep grid (``timestep_grid``): ``"official"`` (default): the official code's
``linspace(0, 999, L).round()`` on the DDIM family (AnimateDiff), whatever the scheduler's spacing;
on the flow-matching families (Wan, SkyReels-V2) the official code defines no such grid, and its
diffusers branch uses the scheduler's own, so there ``"official"`` is the scheduler's sigmas.
``"scheduler"``: the pipeline scheduler's timesteps for L steps. See ``longvideo.methods.families``.

Multi-prompt: ``prompt`` may be a list of ``(prompt, start_video_frame)``; a window uses the prompt in
force at the latent frame it is centred on (video frame v lies in latent frame ceil(v / 4) on Wan,
frame v on AnimateDiff).

Streaming and no lost work: ``generate`` yields uint8 frames as they leave the queue (and writes them
to ``writer`` if given); every ``checkpoint_every`` iterations the queue state (latents, context,
iteration, frames emitted, the CPU generator's state, Ouroboros' maps and bank) is saved atomically
(the writer's ``sync()`` first, then temporary file, fsync, rename: docs/outputs.md);
``resume=True`` continues from it and yields exactly the frames an uninterrupted run with the
same seed yields after that point. The run's settings saved with it (and compared on
resume) include the grid in effect and the lookahead context; a checkpoint written before those
options existed counts as ``timestep_grid="scheduler"``, ``lookahead_context="clean"``.

Several processes: when torch.distributed is initialised (NCCL on GPUs, gloo on CPU), window i of
an iteration runs on rank ``i % world``; the new slot values (and Ouroboros' maps and bank features)
are assembled with ONE all_reduce of a buffer that is zero except where the rank wrote: every slot is
written by exactly one window, so each sum adds zeros to one value and every rank ends with the same
queue, bit for bit equal to a single process's. All ranks must use the same seed; the initial
queue is broadcast from rank 0; rank 0 writes the video and the checkpoints, and ``resume`` needs
the checkpoint directory on a filesystem every rank can read. With context parallelism on the
denoiser (``longvideo.parallel.enable_context_parallel(pipe, context_parallel_groups(N))``), the
windows are split over the world / N contiguous groups of N ranks instead (window i on group
``i % (world / N)``), each window's sequence over its group; every rank of a group computes the
group's windows and the group's first rank alone writes them into the all_reduce buffer.
Self-recurrent guidance then takes its gradient through the all-to-alls (head-sharded loss,
gradients summed over the group; docs/methods.md, "Several GPUs (context parallelism)").

Ouroboros-Diffusion: ``OuroborosDiffusion`` (or ``FIFODiffusion(..., ouroboros=OuroborosConfig())``)
adds coherent tail sampling, SACFA and self-recurrent guidance (``fifo_ouroboros``; processors in
``longvideo.processors.ouroboros``); every part off is exactly FIFO.
"""
from __future__ import annotations

import contextlib

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from .._io import OutputError
from .families import family_for
from .families.base import model_fingerprint  # noqa: F401  (resume checks; tests import it from here)
from .outputs import (
    ProgressBarMixin,
    VideoOutput,
    check_callback,
    check_frame_count,
    check_output_type,
    check_positive_int,
    check_prompt,
    check_size,
    resolve_generator,
    video_output,
)
from .fifo_ouroboros import (
    OuroborosConfig,
    SubjectBank,
    default_feature_layers,
    frame_features,
    subject_token_positions,
    subject_words_from_prompt,
)

LOOKAHEAD_CONTEXTS = ("official", "clean")

__all__ = ["FIFODiffusion", "OuroborosDiffusion", "OuroborosConfig", "QueueState", "PromptSchedule"]


class _StopForward(Exception):
    """Ends a model call once the layers a pass needs have run (see _stop_after)."""


@contextlib.contextmanager
def _stop_after(module: torch.nn.Module):
    """Raise _StopForward right after `module`'s forward returns (its outputs recorded)."""
    def hook(_mod, _args, _out):
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _frozen_parameters(model: torch.nn.Module):
    """Parameters set not to require grad for the block (and restored): a gradient w.r.t. the
    input only, without autograd keeping each linear layer's input for a weight gradient."""
    thawed = [p for p in model.parameters() if p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


@dataclass
class QueueState:
    """Everything needed to continue a run: saved every K iterations, loaded by resume."""

    queue: torch.Tensor          # (1, C, L, h, w) noisy slots, slot k at level k + 1
    context: torch.Tensor        # (1, C, c, h, w) clean frames before the head (lookahead; c = 0 without)
    decoder_state: Optional[list]  # the family's decoder state (Wan: the causal VAE's cache), None at the start
    iteration: int
    frames_out: int
    rng_state: torch.Tensor      # state of the CPU generator that draws tail noise
    maps: Optional[torch.Tensor] = None  # Ouroboros: (c + L, h, w) subject maps of context + slots
    bank: Optional[torch.Tensor] = None  # Ouroboros: flat subject bank (see SubjectBank)


@dataclass
class StepOutput:
    queue: torch.Tensor                  # after the iteration's denoising, before the pop
    maps: Optional[torch.Tensor] = None  # (L, h, w) new subject maps of the slots
    bank_features: Optional[torch.Tensor] = None


def _check_video_pipeline(pipe) -> None:
    """Refuse, at construction, pipelines of a family FIFO cannot run (ValueError naming `pipe`):
    an image UNet (UNet2DConditionModel: Stable Diffusion) passes the family test by its blocks
    but fails much later without per-frame motion modules."""
    unet = getattr(pipe, "unet", None)
    if getattr(pipe, "transformer", None) is None and unet is not None and type(unet).__name__ != "UNetMotionModel":
        raise ValueError(f"pipe: {type(pipe).__name__} has an image UNet ({type(unet).__name__}); FIFO and "
                         "Ouroboros need a video pipeline: Wan, SkyReels-V2 or AnimateDiff (UNetMotionModel)")


def _then(first, second):
    """A function running `second` then `first` (undo in the reverse order of installation)."""
    def both():
        try:
            second()
        finally:
            first()
    return both


class FIFODiffusion(ProgressBarMixin):
    """FIFO-Diffusion on a diffusers Wan or AnimateDiff pipeline (see the module docstring).

    Args:
        pipe: WanPipeline-like (transformer, vae, scheduler, encode_prompt) or AnimateDiffPipeline.
        num_partitions: n.
        frames_per_window: f, latent frames per model call (default: the model's clip length: 21 on
            Wan 2.1, 25 on SkyReels-V2 540P, the tiny models' 3, 16 on AnimateDiff).
        lookahead: lookahead denoising.
        coherent_tail, tail_d_s, tail_d_t: shorthand for ``ouroboros=OuroborosConfig(tail_sampling=True,
            sacfa=False, self_recurrent_guidance=False, ...)``.
        distributed: split the windows over torch.distributed ranks when a process group exists
            (over groups of ranks when the denoiser's sequence is split: module docstring).
        ouroboros: OuroborosConfig, or None for plain FIFO.
        skip_warmup: do not emit the first L - f frames that leave the queue (copies of the initial
            clip's first frame; see the module docstring), as the official code.
        eta: DDIM's eta for the AnimateDiff family (0: deterministic, the default; the official
            FIFO code uses 1.0; see ``longvideo.methods.families.animatediff``).
        timestep_grid: "official" (default: linspace(0, 999, L) on the DDIM family, the scheduler's
            sigmas on flow matching, where the official code defines no other) or "scheduler" (the
            pipeline scheduler's own timesteps); see the module docstring and docs/fidelity.md.
        lookahead_context: "official" (default: context frames noised to the grid's t_0 and told
            t_0, as the official code) or "clean" (the clip's first frame, told level 0); only
            with lookahead.

    ``lean_wan_forward`` (class attribute, True; set False on an instance to compare): Wan
    transformers run longvideo's forward for the run (processors/wan_modulation.py: the
    per-frame timesteps embedded once per frame, no float32 temporaries without autograd; the
    same output, a fraction of the memory: docs/methods.md, "Longvideo's Wan forward").
    """

    lean_wan_forward = True

    def __init__(self, pipe, num_partitions: int = 4, frames_per_window: Optional[int] = None, lookahead: bool = True,
                 coherent_tail: bool = False, tail_d_s: float = 0.25, tail_d_t: float = 1.0, distributed: bool = True,
                 ouroboros: Optional[OuroborosConfig] = None, skip_warmup: bool = True, eta: float = 0.0,
                 timestep_grid: str = "official", lookahead_context: str = "official"):
        _check_video_pipeline(pipe)
        self.family = family_for(pipe, "fifo")
        self.timestep_grid = self.family.resolve_grid(timestep_grid)  # the grid in effect (ValueError if unknown)
        if lookahead_context not in LOOKAHEAD_CONTEXTS:
            raise ValueError(f"lookahead_context must be one of {LOOKAHEAD_CONTEXTS}, got {lookahead_context!r}")
        self.lookahead_context = lookahead_context
        if frames_per_window is None:  # the model's clip length (at least 2 for lookahead's half windows)
            f = max(self.family.default_window(), 2 if lookahead else 1)
        else:
            f = int(frames_per_window)
        self.family.check_window(f)  # SkyReels-V2 causal blocks: whole blocks per window
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        if f < (2 if lookahead else 1):
            raise ValueError(f"frames_per_window must be >= 2 with lookahead (>= 1 without), got {f}")
        self.pipe, self.n, self.f, self.lookahead = pipe, num_partitions, f, lookahead
        self.stride = f // 2 if lookahead else f          # w: slots written per window
        self.context_len = f - self.stride if lookahead else 0  # c
        self.L = 2 * num_partitions * self.stride if lookahead else num_partitions * f
        if coherent_tail and ouroboros is None:
            ouroboros = OuroborosConfig(tail_sampling=True, sacfa=False, self_recurrent_guidance=False,
                                        tail_d_s=tail_d_s, tail_d_t=tail_d_t)
        self.ouro = ouroboros.validate() if ouroboros is not None else None
        if self.ouro is not None and self.ouro.self_recurrent_guidance:
            windows = self.guided_windows
            bad = [i for i in windows if not 0 <= i < self.num_windows]
            if bad or not windows:
                raise ValueError(f"guided_windows: {list(windows)} must be non-empty window indices in "
                                 f"[0, {self.num_windows}) (n = {self.n}, f = {self.f}, lookahead = {lookahead})")
        self.distributed = distributed
        self.warmup = self.L - f if skip_warmup else 0  # frames that leave the queue before the video starts
        if eta and self.family.name != "animatediff":
            raise ValueError(f"eta: DDIM's eta applies to the DDIM family (AnimateDiff), not to {self.family.name}'s "
                             "flow matching")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.eta = float(eta)
        if self.ouro is not None and self.ouro.needs_processors and self.family.image_conditioned:
            raise ValueError("ouroboros: SACFA and self-recurrent guidance are not supported on image-to-video "
                             "pipelines (their processors do not take the image projections); tail_sampling is")
        self._ctx = None
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        """Set ``method._interrupt = True`` (e.g. in ``callback_on_step_end``) to end the run after
        the current iteration: the frames emitted so far are the video (and the checkpoint)."""
        return self._interrupt

    def size_multiple(self) -> int:
        """What height and width must be multiples of: the family's (Wan, SkyReels-V2: the VAE's
        spatial factor times the transformer's patch, at least the 16 their diffusers pipelines
        require; AnimateDiff: the VAE's factor times the UNet's down-sampling)."""
        return int(self.family.size_multiple())

    # ------------------------------------------------------------------------------------------
    @property
    def num_windows(self) -> int:
        return self.L // self.stride

    @property
    def guided_windows(self) -> tuple:
        """Windows guided by self-recurrent guidance: the option, else window 1 (the frames right
        after the head window, which writes the bank), or window 0 when it is the only one."""
        if self.ouro.guided_windows is not None:
            return tuple(int(i) for i in self.ouro.guided_windows)
        return (min(1, self.num_windows - 1),)

    def levels(self, device):
        return self.family.levels(self.L, device, grid=self.timestep_grid)

    @property
    def context_level(self) -> int:
        """The level whose timestep the model is told for the lookahead context frames: 1 (the
        grid's t_0, "official") or 0 ("clean")."""
        return 1 if self.lookahead_context == "official" else 0

    def sigmas(self, device) -> torch.Tensor:
        """Flow-matching families: sigma_0 = 0 < ... < sigma_L."""
        return self.levels(device).sigma

    def _model(self, x, t_frames, prompt_embeds, negative_embeds, guidance_scale):
        return self.family.model_output(x, t_frames, prompt_embeds, negative_embeds, guidance_scale)

    def _rank_world(self):
        import torch.distributed as dist

        if self.distributed and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _sequence_parallel(self):
        """The ``longvideo.parallel.SequenceParallel`` splitting the denoiser's token sequence
        (context parallelism), or None."""
        return getattr(self.family.denoiser, "longvideo_sequence_parallel", None)

    def _window_groups(self):
        """(index, count, leader): windows run on `count` groups of ranks, window i on group
        ``i % count``; `leader`: this rank's results count in the iteration's sum. Without context
        parallelism a group is one rank; with it, the contiguous ranks splitting one sequence
        (``longvideo.parallel.window_groups``), whose first rank is the leader."""
        rank, world = self._rank_world()
        sp = self._sequence_parallel()
        if sp is None or sp.world_size == 1 or world == 1:  # world 1 (distributed=False): every window here
            return rank, world, True
        from ..parallel import window_groups

        return window_groups(sp)

    # ------------------------------------------------------------------------------------------
    def step(self, state: QueueState, lv, prompts, negative_embeds, guidance_scale, noise=None) -> StepOutput:
        """One iteration's denoising of every window (all read the same snapshot). `noise`: DDIM's z
        for every slot (eta > 0), drawn by the caller for the whole queue."""
        q, f, w, c, L = state.queue, self.f, self.stride, self.context_len, self.L
        if not isinstance(prompts, PromptSchedule):  # one embedding tensor for every window
            single = PromptSchedule([""], [0])
            single.embeds = [prompts]
            prompts = single
        full = torch.cat([state.context, q], dim=2) if c else q
        k_full = torch.cat([torch.full((c,), self.context_level, dtype=torch.long),
                            torch.arange(1, L + 1)]).to(q.device)
        rank, world, leader = self._window_groups()
        ouro, ctx = self.ouro, self._ctx
        new_q = torch.zeros_like(q)
        new_maps = q.new_zeros(L, *q.shape[3:]) if ctx is not None else None
        bank_feat = None
        first = state.iteration - self.warmup - c  # output latent frame index of full[:, :, 0]
        self.family.release_frames_before(first)
        if ctx is not None and ouro.self_recurrent_guidance:
            bank_feat = q.new_zeros(self._bank.numel)
        for i in range(self.num_windows):
            if i % world != rank:
                continue
            s = i * w                                # window = full[s : s + f], writes its last w frames
            xw, kw = full[:, :, s: s + f], k_full[s: s + f]
            # latent frame of the output video at the window's centre (negative during the warm-up)
            pidx = prompts.index(state.iteration - self.warmup + s + (f // 2 if not c else 0))
            emb = prompts.embeds[pidx]
            self.family.set_window_start(first + s)
            if ctx is None:
                out, grad, maps, feats = self._model(xw, lv.t_model[kw], emb, negative_embeds, guidance_scale), None, None, None
            else:
                out, grad, maps, feats = self._ouroboros_window(i, s, xw, kw, lv, emb, negative_embeds,
                                                                guidance_scale, state, prompts.subject_ids[pidx])
            a = f - w
            k_in = kw[a:]
            z = noise[:, :, s: s + w] if noise is not None else None
            upd = self.family.update(lv, xw[:, :, a:], out[:, :, a:], k_in, k_in - 1, eta=self.eta, noise=z)
            if grad is not None:
                coef = self.family.guidance_coefficient(lv, k_in, k_in - 1, eta=self.eta)
                upd = upd - ouro.guidance_scale * coef * grad[:, :, a:]
            new_q[:, :, s: s + w] = upd
            if maps is not None:
                new_maps[s: s + w] = maps[a:]
            if feats is not None:
                bank_feat = feats
        if world > 1:
            import torch.distributed as dist

            if not leader:
                # context parallel: every rank of a group computed the group's windows; the group's
                # first rank alone contributes them to the sum, so each value is added once
                new_q.zero_()
                for t in (new_maps, bank_feat):
                    if t is not None:
                        t.zero_()
            parts = [new_q] + [t for t in (new_maps, bank_feat) if t is not None]
            flat = torch.cat([t.reshape(-1) for t in parts])
            dist.all_reduce(flat)
            chunks = flat.split([t.numel() for t in parts])
            new_q = chunks[0].view_as(new_q)
            if new_maps is not None:
                new_maps = chunks[1].view_as(new_maps)
            if bank_feat is not None:
                bank_feat = chunks[-1].view_as(bank_feat)
        return StepOutput(queue=new_q, maps=new_maps, bank_features=bank_feat)

    # ------------------------------------------------------------------------------------------
    # Ouroboros: one window with SACFA masks, map recording, bank features and guidance
    def _ouroboros_window(self, i, s, xw, kw, lv, emb, neg, guidance_scale, state, subject_ids):
        ouro, f, w = self.ouro, self.f, self.stride
        a = f - w
        masks = None
        if state.maps is not None:
            m = state.maps[s: s + f] > ouro.mask_threshold
            masks = m if bool(m.any()) else None
        srg = ouro.self_recurrent_guidance
        bank_window = srg and i == 0
        guided = srg and masks is not None and i in self.guided_windows
        nb = min(ouro.bank_frames, w)
        if not getattr(self.family, "two_experts", False):
            return self._ouroboros_call(None, xw, kw, lv, emb, neg, guidance_scale, state, subject_ids, masks,
                                        a, slice(a, a + nb), bank_window, guided)
        return self._ouroboros_experts(xw, kw, lv, emb, neg, guidance_scale, state, subject_ids, masks, a, nb,
                                       bank_window, guided)

    def _ouroboros_experts(self, xw, kw, lv, emb, neg, guidance_scale, state, subject_ids, masks, a, nb,
                           bank_window, guided):
        """One window on a two-expert pipeline (Wan 2.2 A14B; docs/methods.md, "Wan 2.2"): the
        window's expert calls (``family.expert_calls``: split sub-windows or, with "select", the
        whole window per expert) each run as a one-expert Ouroboros window of their own frames --
        that expert's processors record the subject maps and features of the frames it is given,
        its self-recurrent guidance compares them with that expert's bank and its gradient flows
        through that expert only -- and every frame takes the output, map and bank features of the
        call that owns it; the gradient is the sum over calls (w.r.t. the window's input)."""
        calls = self.family.expert_calls(lv.t_model[kw])
        out = grad = maps = feats = None
        for expert, inputs, owned in calls:
            at = {j: p for p, j in enumerate(inputs.tolist())}
            own_pos = torch.tensor([at[j] for j in owned.tolist()], dtype=torch.long)
            written = own_pos[owned >= a]                    # call rows of the frames this window writes
            banked = own_pos[(owned >= a) & (owned < a + nb)]  # ... and of the bank's frames (window 0)
            dev = xw.device
            y, g, m, fe = self._ouroboros_call(
                expert, xw.index_select(2, inputs.to(dev)), kw[inputs.to(kw.device)], lv, emb, neg, guidance_scale,
                state, subject_ids, None if masks is None else masks[inputs.to(masks.device)], written.to(dev),
                banked.to(dev), bank_window, guided and written.numel() > 0)
            if out is None:
                out = y.new_empty(y.shape[:2] + xw.shape[2:])
            out[:, :, owned.to(out.device)] = y[:, :, own_pos.to(y.device)]
            if g is not None:
                grad = torch.zeros_like(g.new_empty(g.shape[:2] + xw.shape[2:])) if grad is None else grad
                grad[:, :, inputs.to(grad.device)] += g
            if m is not None:
                maps = m.new_zeros((xw.shape[2],) + m.shape[1:]) if maps is None else maps
                maps[owned.to(maps.device)] = m[own_pos.to(m.device)]
            if fe is not None:
                feats = fe if feats is None else feats + fe  # disjoint parts of the bank
        return out, grad, maps, feats

    def _call_denoiser(self, expert, x, t, emb, neg, guidance_scale):
        """The guided model output of the window's model (`expert` None) or of one expert."""
        if expert is None:
            return self._model(x, t, emb, neg, guidance_scale)
        return self.family.expert_output(expert, x, t, emb, neg, guidance_scale)

    def _ouroboros_call(self, expert, xw, kw, lv, emb, neg, guidance_scale, state, subject_ids, masks, written,
                        banked, bank_window, guided):
        """One model call with Ouroboros' processors: (output, guidance gradient or None, subject
        maps (F, h, w) or None, bank features or None) for the frames `xw` (B, C, F, h, w) at levels
        `kw`. `expert`: None (the family's model) or the index of a two-expert pipeline's expert.
        `written`: the rows the loss of the guidance reads (an int a: rows a:, or an index tensor);
        `banked`: the rows whose features fill the bank (a slice or an index tensor)."""
        ouro, ctx = self.ouro, self._ctx
        f = xw.shape[2]
        guided = guided and self._bank.valid_for(state.bank, expert or 0)
        layers = self._feature_layers if (guided or bank_window) else ()
        ctx.begin(frames=f, masks=masks, sacfa=ouro.sacfa, use_op=guided, record_maps=True, feature_layers=layers,
                  sacfa_tokens=ouro.sacfa_tokens)
        ctx.subject_ids = subject_ids
        grad = feats = None
        try:
            if guided:
                grad = (self._guidance_gradient(xw, kw, lv, emb, state, written) if expert is None else
                        self._guidance_gradient(xw, kw, lv, emb, state, written, expert=expert))
                # the window's output: the whole model without autograd, as every other window
                ctx.begin(frames=f, masks=masks, sacfa=ouro.sacfa, use_op=guided, record_maps=True,
                          feature_layers=layers, sacfa_tokens=ouro.sacfa_tokens)
                ctx.subject_ids = subject_ids
            out = self._call_denoiser(expert, xw, lv.t_model[kw], emb, neg, guidance_scale)
            maps = ctx.maps()
            if bank_window and masks is not None:
                sel = {}
                for name in self._feature_layers:
                    keys = ctx.features[name][banked].detach()
                    tm = ctx.layer_masks(keys.shape[2])[banked]
                    ok = tm.any(1)
                    if not bool(ok.any()):
                        sel = None
                        break
                    sel[name] = frame_features(keys, tm)[ok].mean(0)
                    sp = ctx.feature_parallel.get(name)
                    if sp is not None:  # this rank's heads -> every head, (H, D)
                        sel[name] = sp.gather_heads(sel[name], 0)
                if sel:
                    feats = self._bank.pack(sel, expert or 0)
        finally:
            ctx.end()
        return out, grad, maps, feats

    def _guidance_gradient(self, xw, kw, lv, emb, state, a, expert=None):
        """d loss / d xw of self-recurrent guidance for one window (loss: fifo_ouroboros (c)) over
        the frames the window writes: rows a: (an int) or the rows of an index tensor `a`.
        `expert`: None (the family's model) or the index of the two-expert pipeline's expert
        whose call this is (its model, its part of the bank).

        The loss reads the subject features of the feature layers only (Wan: the first quarter of
        the blocks; AnimateDiff: the down path), of the conditional prompt only. So this pass runs
        the conditional half alone, stops the model right after the last feature layer, and freezes
        the model's parameters (no weight gradients are wanted): autograd keeps the activations of
        that part of one half instead of the whole CFG batch through every block (Wan2.1-1.3B,
        480p, 21-frame windows: the planner's estimate falls from ~303 GiB to a quarter of one
        half). The gradient is the same as through the whole batched call: the features do not
        depend on anything after them, nor on the other CFG half. The features are recorded by
        the processors (the context's current settings) and the context is left as found."""
        ctx = self._ctx
        bank = self._bank.unpack(state.bank, expert or 0)
        model = self.family.denoiser if expert is None else self.family.experts[expert]
        rows = slice(a, None) if isinstance(a, int) else a
        order = {name: i for i, name in enumerate(model.attn_processors)}
        last = max(self._feature_layers, key=lambda n: order.get(n, -1))
        stop_at = model.get_submodule(last[: -len(".processor")])
        record_maps = ctx.record_maps
        ctx.record_maps = False  # the subject maps come from the full call
        try:
            with torch.enable_grad(), _stop_after(stop_at), _frozen_parameters(model):
                xg = xw.detach().requires_grad_(True)
                try:
                    self._call_denoiser(expert, xg, lv.t_model[kw], emb, None, 1.0)  # the conditional half only
                except _StopForward:
                    pass
                loss, parallel = None, None
                for name in self._feature_layers:
                    keys = ctx.features[name][rows]                    # the frames this window writes
                    tm = ctx.layer_masks(keys.shape[2])[rows]
                    ok = tm.any(1)
                    if bool(ok.any()):
                        feats = frame_features(keys, tm)[ok]
                        sp = ctx.feature_parallel.get(name)
                        if sp is None:
                            d = ((feats - bank[name]) ** 2).mean()
                        else:
                            # context parallel: this rank holds heads [h0, h1) of the layer; its part
                            # of the mean over (frames, H, D), so the ranks' parts sum to the loss
                            h0, h1 = sp.head_range(feats.shape[1])
                            d = ((feats - bank[name][h0:h1]) ** 2).sum() / (feats.shape[0] * bank[name].numel())
                            parallel = sp
                        loss = d if loss is None else loss + d
                grad = None if loss is None else torch.autograd.grad(loss, xg)[0].detach()
                if grad is not None and parallel is not None:
                    # each rank's backward reached the input through its own tokens only (the
                    # all-to-alls' backward carried every rank's loss there): the sum is the gradient
                    grad = parallel.all_reduce(grad.contiguous())
        finally:
            ctx.record_maps = record_maps
            ctx.features = {}
        return grad

    def _lean_wan_forward(self):
        """longvideo's Wan forward (longvideo/processors/wan_modulation.py) on every Wan expert not
        patched yet, for the run; returns the function that removes what it added (offloading
        hooks already in place: diffusers' forward stays, with a warning)."""
        if not self.lean_wan_forward:
            return lambda: None
        from ..processors.wan_modulation import lean_wan_forward_where_possible

        handles = lean_wan_forward_where_possible(self.pipe, "FIFO")
        return lambda: [h.remove() for h in reversed(handles)]

    def _install(self, latent_hw):
        """Install Ouroboros' processors (when SACFA or guidance is on); returns a restore function."""
        if self.ouro is None or not self.ouro.needs_processors:
            self._ctx = None
            return lambda: None
        from ..processors.ouroboros import OuroborosContext, apply_ouroboros_processors

        model = self.family.denoiser
        self._ctx = OuroborosContext(latent_hw)
        patch = apply_ouroboros_processors(model, self._ctx)
        patch.on_remove(lambda: setattr(self, "_ctx", None))
        experts = [model]
        try:
            if getattr(self.family, "two_experts", False):
                # every expert gets the processors, sharing the context (one call at a time)
                experts = list(self.family.experts)
                for other in experts[1:]:
                    second = apply_ouroboros_processors(other, self._ctx)
                    patch.on_remove(second.remove)
                    if second.self_layers != patch.self_layers:
                        raise ValueError("ouroboros: the pipeline's experts have different self-attention layers")
            self_layers = patch.self_layers
            layers = list(self.ouro.feature_layers) if self.ouro.feature_layers else default_feature_layers(
                self.family.name, self_layers)
            unknown = [n for n in layers if n not in self_layers]
            if unknown:
                raise ValueError(f"feature_layers: {unknown} are not self-attention layers of the model")
            shapes = []
            for n in layers:
                attn = model.get_submodule(n[: -len(".processor")])
                shapes.append((attn.heads, attn.to_k.out_features // attn.heads))
            self._feature_layers, self._bank = layers, SubjectBank(layers, shapes, experts=len(experts))
        except BaseException:
            patch.remove()
            raise
        return patch.remove

    # ------------------------------------------------------------------------------------------
    def _initial_state(self, lv, prompt_embeds, negative_embeds, height, width, guidance_scale, generator,
                       init_steps):
        f, L = self.f, self.L
        clip = self.family.sample_clip(prompt_embeds, negative_embeds, height, width, f, init_steps,
                                       guidance_scale, generator)
        idx = (torch.arange(L) - (L - f)).clamp_min(0)
        eps = torch.randn(clip[:, :, idx].shape, generator=generator).to(clip)
        queue = self.family.noise_clean(lv, clip[:, :, idx], torch.arange(1, L + 1, device=clip.device), eps)
        maps = None
        if self._ctx is not None:
            maps = clip.new_zeros(self.context_len + L, *clip.shape[3:])
        context = clip[:, :, :1].repeat(1, 1, self.context_len, 1, 1)
        if self.context_len and self.lookahead_context == "official":
            # the official prepare_latents: the first frame re-noised to t_0 (level 1), fresh noise per frame
            ctx_eps = torch.randn(context.shape, generator=generator).to(clip)
            context = self.family.noise_clean(lv, context, torch.ones(self.context_len, dtype=torch.long,
                                                                      device=clip.device), ctx_eps)
        return QueueState(queue=queue, context=context, decoder_state=None,
                          iteration=0, frames_out=0, rng_state=generator.get_state(), maps=maps, bank=None)

    def _default_size(self):
        return self.family.default_size()

    def _new_tail(self, lv, new, generator):
        eta = torch.randn(new[:, :, :1].shape, generator=generator).to(new)  # FIFO's tail: fresh noise
        if self.ouro is None or not self.ouro.tail_sampling:
            return eta
        z = new[:, :, -1:]                    # second-to-last after the shift, at level L - 1
        k_from = torch.tensor([self.L - 1], device=new.device)
        noise = torch.randn(z.shape, generator=generator).to(new) if not self.family.flow_matching else None
        z = self.family.renoise(lv, z, k_from, k_from + 1, noise)
        o = self.ouro
        return torch.ops.longvideo.lowfreq_mix(z.contiguous(), eta, o.tail_filter, o.tail_d_s, o.tail_d_t, o.tail_order)

    def check_inputs(self, prompt, num_frames, height, width, guidance_scale, negative_prompt, seed, generator,
                     num_inference_steps, init_steps, checkpoint_every, checkpoint_dir,
                     callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)) -> None:
        """ValueError naming the first bad argument of :meth:`generate` (checked before any work)."""
        if isinstance(prompt, str):
            check_prompt(prompt)
        elif not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"prompt must be a string or a non-empty list of (prompt, start_frame) pairs, got "
                             f"{type(prompt).__name__} {prompt!r}")
        check_frame_count(num_frames)
        m = self.size_multiple()
        check_size(height, "height", m)
        check_size(width, "width", m)
        if guidance_scale is not None and (isinstance(guidance_scale, bool)
                                           or not isinstance(guidance_scale, (int, float))):
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        resolve_generator(generator, seed, device="cpu")
        if num_inference_steps is not None and num_inference_steps != self.L:
            raise ValueError(f"num_inference_steps: FIFO denoises with one level per queue slot, L = {self.L} "
                             f"(n = {self.n}, f = {self.f}); got {num_inference_steps}")
        if init_steps is not None:
            check_positive_int(init_steps, "init_steps")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 0 or (checkpoint_every and not checkpoint_dir):
            raise ValueError("checkpoint_every needs a checkpoint_dir and must be >= 0")
        check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, ("latents", "context"))

    def generate(self, prompt, num_frames: int, height: Optional[int] = None, width: Optional[int] = None,
                 guidance_scale: Optional[float] = None, negative_prompt: str = "", seed: int = 0,
                 num_inference_steps: Optional[int] = None, init_steps: Optional[int] = None, writer=None,
                 checkpoint_dir=None, checkpoint_every: int = 0, resume: bool = False,
                 stop_after_iterations: Optional[int] = None, guidance_scale_2: Optional[float] = None,
                 generator=None, image=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> Iterator:
        """Yield output video frames (uint8 (H, W, 3)) as they leave the queue, `num_frames` in all.

        prompt: a string, or a list of (prompt, start_video_frame) pairs (the first start must be 0).
        num_inference_steps: FIFO's step count is the number of levels L (n f, or 2 n floor(f/2) with
            lookahead); None, or L itself. init_steps: steps of the initial clip (default L, as the
            official code).
        seed / generator: every draw (the initial clip, the queue's noise, the tails) comes from one
            CPU generator: `generator` (a CPU torch.Generator, or a list of one), else one seeded
            with `seed`. Its state is part of the checkpoint.
        callback_on_step_end: ``callback(method, iteration, timesteps, callback_kwargs) -> dict``
            after each iteration (diffusers' convention; `timesteps` the (L,) model timesteps of the
            slots). callback_kwargs holds the tensors named in `callback_on_step_end_tensor_inputs`:
            "latents" (the queue (1, C, L, h, w) after the shift and the new tail), "context" (the
            lookahead context); returned tensors replace them. ``method._interrupt = True`` ends the
            run after this iteration's frames.
        writer: optional object with ``write(frame)`` (e.g. longvideo.video.VideoWriter), called for
            each frame before it is yielded.
        checkpoint_dir/checkpoint_every: save the queue state every K iterations (atomically), at the
            end, and when the run is interrupted (KeyboardInterrupt, an error, the generator closed):
            then the state after the last iteration whose frames were all emitted.
        resume: continue from the saved state (frames already emitted are not produced again); the
            run's settings must equal the checkpoint's (ValueError listing the differences), except
            num_frames, so a finished run can also be extended.
        stop_after_iterations: stop early (for tests of interruption).
        guidance_scale_2: the low-noise expert's guidance scale on two-expert Wan 2.2 pipelines
            (None: guidance_scale, as WanPipeline); ValueError on other pipelines.
        image: image-to-video pipelines (Wan 2.1 I2V, Wan 2.2 A14B I2V): the first frame's image (a
            PIL image or a tensor, as the pipeline's ``image``), required there and refused
            elsewhere; it conditions the start of the video, each frame keeping the pipeline's
            condition of its own index (docs/methods.md, "Image-to-video").
        Progress: a bar over the frames, configured by ``set_progress_bar_config`` (default: the
        pipeline's setting).
        """
        self.check_inputs(prompt, num_frames, height, width, guidance_scale, negative_prompt, seed, generator,
                          num_inference_steps, init_steps, checkpoint_every, checkpoint_dir,
                          callback_on_step_end, callback_on_step_end_tensor_inputs)
        dh, dw = self._default_size()
        height, width = height or dh, width or dw
        if guidance_scale is None:
            guidance_scale = self.family.default_guidance_scale
        if guidance_scale_2 is not None and not getattr(self.family, "two_experts", False):
            raise ValueError(f"guidance_scale_2 applies to two-expert Wan 2.2 pipelines, not to {self.family.name}")
        if getattr(self.family, "two_experts", False):
            self.family.set_guidance_scale_2(guidance_scale_2)
        if self.family.image_conditioned and image is None:
            raise ValueError(f"image: {type(self.pipe).__name__} is an image-to-video pipeline; pass the first "
                             "frame's image")
        if image is not None and not self.family.image_conditioned:
            raise ValueError(f"image: {type(self.pipe).__name__} is not an image-to-video pipeline")
        device = self.family.device
        if image is not None:
            with torch.no_grad():
                self.family.set_image(image, height, width, device)
        if generator is not None:
            generator = resolve_generator(generator, seed, device="cpu")[0]
            seed = generator.initial_seed()  # what the run's settings (and a resume) record
        else:
            generator = torch.Generator("cpu").manual_seed(seed)
        ckpt = Path(checkpoint_dir) / "fifo_state.pt" if checkpoint_dir else None
        if resume and (ckpt is None or not ckpt.exists()):
            raise FileNotFoundError(f"resume: no checkpoint at {ckpt}")
        self._interrupt = False
        cfg = guidance_scale > 1.0
        with torch.no_grad():
            schedule = PromptSchedule.parse(prompt, self.family.temporal_compression)
            negative_embeds = None
            schedule.embeds = []
            for text in schedule.prompts:
                pe, negative_embeds = self.family.encode_prompt(text, negative_prompt, cfg, device)
                schedule.embeds.append(pe)
            if self.ouro is not None and self.ouro.needs_processors:
                schedule.subject_ids = [
                    subject_token_positions(self.pipe.tokenizer, text,
                                            self.ouro.subject_words or subject_words_from_prompt(text))
                    for text in schedule.prompts]
            lv = self.levels(device)
        vs = getattr(self.pipe, "vae_scale_factor_spatial", None) or self.pipe.vae_scale_factor
        settings = self._run_settings(schedule, height, width, guidance_scale, negative_prompt, seed, init_steps)
        restore = self._install((height // vs, width // vs))
        restore = _then(self._lean_wan_forward(), restore)
        complete = saved_iteration = bar = None
        try:
            with torch.no_grad():
                if resume:
                    saved = torch.load(ckpt, map_location=device, weights_only=True)
                    _check_run_settings(saved.pop("settings", None), settings, ckpt)
                    state = QueueState(**saved)
                    generator.set_state(state.rng_state)
                else:
                    state = self._initial_state(lv, schedule.embeds[0], negative_embeds, height, width,
                                                guidance_scale, generator, init_steps or self.L)
                    if self._rank_world()[1] > 1:
                        # every rank sampled the same clip from the same seed; rank 0's copy is made
                        # the one truth, so nondeterministic kernels cannot make the ranks' queues differ
                        import torch.distributed as dist

                        for t in (state.queue, state.context):
                            if t.numel():
                                dist.broadcast(t, src=0)
            done = 0
            complete, saved_iteration = state, state.iteration  # last state whose frames were all emitted
            if self._rank_world()[0] == 0:
                bar = self.progress_bar(total=num_frames, initial=min(state.frames_out, num_frames), unit="frame")
            while state.frames_out < num_frames:
                if stop_after_iterations is not None and done >= stop_after_iterations:
                    return
                with torch.no_grad():
                    z = (torch.randn(state.queue.shape, generator=generator).to(state.queue)
                         if self.eta else None)  # DDIM eta: one draw for the whole queue, the same on every rank
                    out = self.step(state, lv, schedule, negative_embeds, guidance_scale, noise=z)
                    new = out.queue
                    head = new[:, :, :1]
                    tail = self._new_tail(lv, new, generator)
                    warming_up = state.iteration < self.warmup  # the head is a copy of the clip's first frame
                    frames, decoder_state = ([], None) if warming_up else self.family.decode(head, state.decoder_state)
                    context = torch.cat([state.context[:, :, 1:], head], dim=2) if self.context_len else state.context
                    maps, bank = state.maps, state.bank
                    if out.maps is not None:  # maps move with their frames; the new tail has none yet
                        moved = torch.cat([state.maps[: self.context_len], out.maps])[1:]
                        maps = torch.cat([moved, moved.new_zeros(1, *moved.shape[1:])])
                    if out.bank_features is not None:
                        bank = self._bank.ema(state.bank, out.bank_features, self.ouro.momentum)
                    state = QueueState(queue=torch.cat([new[:, :, 1:], tail], dim=2), context=context,
                                       decoder_state=decoder_state, iteration=state.iteration + 1,
                                       frames_out=state.frames_out,
                                       rng_state=generator.get_state(), maps=maps, bank=bank)
                    if callback_on_step_end is not None:
                        state = self._step_end(callback_on_step_end, callback_on_step_end_tensor_inputs, state, lv)
                emit = frames[: num_frames - state.frames_out]
                for frame in emit:
                    state.frames_out += 1
                    if writer is not None:
                        writer.write(frame)
                    if bar is not None:
                        bar.update(1)
                    yield frame
                done += 1
                if len(emit) < len(frames):
                    break  # the last iteration, cut short: its state must not be saved (extending re-runs it)
                complete = state
                if checkpoint_every and state.iteration % checkpoint_every == 0:
                    if self._save_checkpoint(ckpt, state, settings, writer):
                        saved_iteration = state.iteration
                if self._interrupt:
                    break
            if checkpoint_every and complete.iteration != saved_iteration:
                # the end: a later run can extend the video
                self._save_checkpoint(ckpt, complete, settings, writer)
        except BaseException as exc:
            # Interrupted (Ctrl-C, SIGTERM turned into KeyboardInterrupt, the consumer closing the
            # generator, an error): keep the work of every fully emitted iteration -- unless the
            # checkpoint itself could not be written (the previous one is intact; trying again
            # would only replace this error by the same one).
            if (checkpoint_every and complete is not None and complete.iteration != saved_iteration
                    and not (isinstance(exc, OutputError) and exc.path == ckpt)):
                try:
                    self._save_checkpoint(ckpt, complete, settings, writer)
                except OutputError:
                    pass  # the error in flight is the one to report; the previous checkpoint stands
            raise
        finally:
            restore()
            if bar is not None:
                bar.close()

    def _step_end(self, callback, names, state: QueueState, lv) -> QueueState:
        """Run ``callback_on_step_end`` on the state after an iteration; returned tensors replace the
        queue ("latents") or the context, checked for shape."""
        tensors = {"latents": state.queue, "context": state.context}
        kwargs = {k: tensors[k] for k in names}
        out = callback(self, state.iteration - 1, lv.t_model[1:], kwargs) or {}
        for key, field in (("latents", "queue"), ("context", "context")):
            if key in out:
                value = out[key]
                old = getattr(state, field)
                if not isinstance(value, torch.Tensor) or value.shape != old.shape:
                    raise ValueError(f"callback_on_step_end returned {key!r} of shape "
                                     f"{getattr(value, 'shape', type(value).__name__)}, expected {tuple(old.shape)}")
                setattr(state, field, value.to(old))
        return state

    def _run_settings(self, schedule, height, width, guidance_scale, negative_prompt, seed, init_steps) -> dict:
        """What a checkpoint's queue depends on: resuming with other settings would continue a
        different video, so resume compares them (num_frames may differ: a run can be extended)."""
        ouro = dataclasses.asdict(self.ouro) if self.ouro is not None else None
        if ouro is not None:
            ouro = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in ouro.items()}
        return {"family": self.family.name, "model": model_fingerprint(self.family.denoiser),
                "fps": getattr(self.family, "fps", None), "n": self.n, "f": self.f, "lookahead": self.lookahead,
                "warmup": self.warmup, "eta": self.eta, "timestep_grid": self.timestep_grid,
                "lookahead_context": self.lookahead_context if self.context_len else "none",
                "height": int(height), "width": int(width), "guidance_scale": float(guidance_scale),
                "negative_prompt": negative_prompt, "seed": int(seed), "init_steps": init_steps,
                "prompts": list(schedule.prompts), "prompt_starts": list(schedule.latent_starts),
                "ouroboros": repr(ouro), **self.family.run_settings()}

    def _save_checkpoint(self, ckpt: Path, state: QueueState, settings: dict, writer=None) -> bool:
        """Save `state` durably (rank 0 only): the frames it claims are made durable first (the
        writer's ``sync()``, if it has one: VideoWriter closes its open segment), then the state is
        serialised in memory and written to a temporary file in the same folder, fsynced, renamed
        over the checkpoint and the folder fsynced (longvideo._io.atomic_write_bytes): a crash or a
        full disk leaves the previous checkpoint intact. Not saved (False) when the writer holds
        fewer durable frames than the state has emitted (a video write failed): the previous
        checkpoint, which the video does cover, stays. OutputError when the file cannot be
        written (naming it and what was kept)."""
        if self._rank_world()[0] != 0:
            return False
        import io

        from .._io import atomic_write_bytes

        sync = getattr(writer, "sync", None)
        if sync is not None:
            durable = sync()
            if isinstance(durable, int) and durable < state.frames_out:
                return False
        data = {k.name: getattr(state, k.name) for k in dataclasses.fields(QueueState)}
        data["settings"] = settings
        buf = io.BytesIO()
        torch.save(data, buf)
        kept = (f"the previous checkpoint {ckpt} (unchanged)" if ckpt.exists() else "no queue checkpoint yet")
        atomic_write_bytes(ckpt, buf.getvalue(), kept=kept)
        return True

    def __call__(self, prompt, num_frames: int, output_type: str = "np", **kwargs) -> VideoOutput:
        """All frames at once, as a :class:`longvideo.methods.outputs.VideoOutput`: ``.frames`` is
        numpy float32 (1, F, H, W, 3) in [0, 1] ("np": the uint8 frames :meth:`generate` yields,
        divided by 255), torch float32 (1, F, 3, H, W) ("pt"), [[PIL images]] ("pil"), or the
        clean latent frames as they left the queue, (1, C, F', h, w) ("latent"; the decoder still
        runs, its cache being part of the queue's state). Keywords: those of :meth:`generate`."""
        import numpy as np

        check_output_type(output_type)
        if output_type == "latent":
            return VideoOutput(frames=self._latents(prompt, num_frames, **kwargs))
        frames = np.stack(list(self.generate(prompt, num_frames, **kwargs)))
        return video_output(frames, output_type)

    def _latents(self, prompt, num_frames, **kwargs) -> torch.Tensor:
        """The clean latent frames in the order they leave the queue (the heads, without decoding),
        enough of them for `num_frames` video frames."""
        heads = []
        decode = self.family.decode

        def keep_head(head, cache):
            heads.append(head.detach().clone())
            return decode(head, cache)

        self.family.decode = keep_head  # an instance attribute over the class method, removed below
        try:
            for _ in self.generate(prompt, num_frames, **kwargs):
                pass
        finally:
            del self.family.decode
        return torch.cat(heads, dim=2) if heads else torch.empty(0)


class OuroborosDiffusion(FIFODiffusion):
    """Ouroboros-Diffusion: FIFO plus coherent tail sampling, SACFA and self-recurrent guidance
    (each switchable; see ``fifo_ouroboros`` for the definitions and defaults). Extra keyword
    arguments are fields of :class:`OuroborosConfig` (subject_words, mask_threshold,
    guidance_scale (of the self-recurrent guidance), momentum, guided_windows, bank_frames,
    feature_layers, tail_filter, tail_d_s, tail_d_t, tail_order, sacfa_tokens)."""

    def __init__(self, pipe, num_partitions: int = 4, frames_per_window: Optional[int] = None, lookahead: bool = True,
                 tail_sampling: bool = True, sacfa: bool = True, self_recurrent_guidance: bool = True,
                 distributed: bool = True, skip_warmup: bool = True, eta: float = 0.0,
                 timestep_grid: str = "official", lookahead_context: str = "official", **options):
        names = {f.name for f in dataclasses.fields(OuroborosConfig)}
        bad = sorted(set(options) - names)
        if bad:
            raise ValueError(f"unknown Ouroboros options {bad}; known: {sorted(names)}")
        config = OuroborosConfig(tail_sampling=tail_sampling, sacfa=sacfa,
                                 self_recurrent_guidance=self_recurrent_guidance, **options)
        super().__init__(pipe, num_partitions=num_partitions, frames_per_window=frames_per_window,
                         lookahead=lookahead, distributed=distributed, ouroboros=config, skip_warmup=skip_warmup,
                         eta=eta, timestep_grid=timestep_grid, lookahead_context=lookahead_context)


class PromptSchedule:
    """Multi-prompt: prompts with the video frame at which each starts, mapped to latent frames."""

    def __init__(self, prompts, latent_starts):
        self.prompts, self.latent_starts = list(prompts), list(latent_starts)
        self.embeds = None
        self.subject_ids = [()] * len(self.prompts)

    @classmethod
    def parse(cls, prompt, temporal_compression: int = 4) -> "PromptSchedule":
        if isinstance(prompt, str):
            return cls([prompt], [0])
        pairs = list(prompt)
        if not pairs or any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pairs):
            raise ValueError("prompt must be a string or a non-empty list of (prompt, start_frame) pairs")
        starts = [int(s) for _, s in pairs]
        if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"prompt start frames must begin at 0 and increase, got {starts}")
        # video frame v lies in latent frame ceil(v / c) (latent 0 is video frame 0 in Wan's causal VAE)
        return cls([t for t, _ in pairs], [-(-s // temporal_compression) for s in starts])

    def index(self, latent_index: int) -> int:
        return max(j for j, s in enumerate(self.latent_starts) if s <= max(latent_index, 0))

    def at(self, latent_index: int):
        return self.embeds[self.index(latent_index)]


def _ouroboros_settings(text):
    """The Ouroboros options of a run's settings (saved as the repr of a dict) as a dict; options
    added later get the value that reproduces the older behaviour (sacfa_tokens: the paper's)."""
    import ast

    if text is None or text == "None":
        return None
    try:
        options = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(options, dict):
        options.setdefault("sacfa_tokens", "paper")
    return options


def _describe_model_difference(saved: str, now: str) -> str:
    """In words: which part of two model fingerprints differs."""
    def parts(fp):
        bits = str(fp).split(":")
        return {"class": bits[0], **{b.split(" ")[0]: b.split(" ", 1)[1] for b in bits[1:] if " " in b}}

    a, b = parts(saved), parts(now)
    if "weights" not in a:
        return ("the checkpoint was written by an older longvideo whose model fingerprint depended on the "
                "process (PYTHONHASHSEED) and the path as typed: it cannot be checked; start a new run")
    what = [w for w in ("class", "config", "weights") if a.get(w) != b.get(w)]
    names = {"class": f"model class ({a.get('class')} vs {b.get('class')})", "config": "model configuration",
             "weights": "weights"}
    return "a different model: " + ", ".join(names[w] for w in what) + " differ" if what else "model"


def _check_run_settings(saved: Optional[dict], now: dict, ckpt) -> None:
    if saved is None:
        return
    saved, now = dict(saved), dict(now)
    # checkpoints written before these options existed: the only behaviour there was then
    saved.setdefault("timestep_grid", "scheduler")
    saved.setdefault("lookahead_context", "clean" if saved.get("lookahead", True) else "none")
    saved["ouroboros"], now["ouroboros"] = _ouroboros_settings(saved.get("ouroboros")), _ouroboros_settings(
        now.get("ouroboros"))
    diff = [(f"model: {_describe_model_difference(saved.get(k), now.get(k))}" if k == "model" else
             f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}")
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        raise ValueError(f"resume: {ckpt} was written by a run with other settings; resume with the same "
                         "prompt, model, size, seed and method options (only the number of frames may change):\n  "
                         + "\n  ".join(diff))
