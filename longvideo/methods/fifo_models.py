"""Model families for FIFO-Diffusion: noise levels, per-frame model calls, per-frame updates, decoding.

FIFO's queue holds frames at *different* noise levels, so each family needs (a) a way to give the
model one noise level per frame and (b) the scheduler's update written per frame. Levels are
indexed ``0 .. L`` (0 clean, L the tail); queue slot ``k`` sits at level ``k + 1`` and one
iteration moves it to level ``k``.

Timestep grids (``FIFODiffusion(timestep_grid=...)``; docs/fidelity.md). The official FIFO code
is a DDIM sampler on VideoCrafter2 whose L timesteps are ``linspace(0, 999, L).round()`` (DDIM
index 0 at t = 0, and the last step of the head goes to ``alphas_cumprod[0]``, the official
``alphas_prev[0]``). ``"official"`` reproduces that grid where it is defined, on the DDIM family
(AnimateDiff), whatever the pipeline scheduler's ``timestep_spacing`` and ``set_alpha_to_one``;
``"scheduler"`` takes the pipeline scheduler's own timesteps for L steps (equal to the official
grid only with "linspace" spacing and ``set_alpha_to_one=False``; "leading" gives 0..945 for 64
steps). A linspace over DDPM's discrete timesteps is not defined for flow matching (continuous
sigmas with a shift); the official code's other branch (Open-Sora Plan, a diffusers pipeline)
takes the diffusers scheduler's own timesteps, so on the flow-matching families (Wan,
SkyReels-V2) ``"official"`` IS the scheduler's grid: both names give the same levels
(:meth:`WanFamily.resolve_grid`).

``WanFamily`` (flow matching; WanTransformer3DModel)
    Levels are the pipeline scheduler's own flow sigmas for L steps (shift included), ascending:
    ``sigma_0 = 0 < ... < sigma_L`` (both timestep grids, see above). Per-frame update (Euler,
    what FlowMatchEulerDiscreteScheduler.step does for one frame):
    ``x_{sigma'} = x_sigma + (sigma' - sigma) * v(x, sigma)``.
    Per-frame timesteps: diffusers' WanTransformer3DModel accepts a 2-D timestep ``(B, seq)``
    (one per token, flattened through the time embedding and unflattened to per-token modulation),
    so a frame's timestep ``1000 * sigma`` is repeated over its ``(h/2) * (w/2)`` patch tokens.
    Frames are *latent* frames: Wan's causal VAE compresses time by 4, latent frame 0 decodes to 1
    video frame, every later latent frame to 4. Popped latent frames are decoded as a stream the
    way the VAE decodes a whole video (``AutoencoderKLWan._decode``: one latent frame per decoder
    call, the causal convolutions' cache carried from call to call, the first call marked
    ``first_chunk``), so the streamed frames equal the VAE's decode of all popped latents at once.
    The cache is part of the queue state (and of the checkpoint). N emitted latent frames give
    ``1 + 4 (N - 1)`` video frames.

``AnimateDiffFamily`` (DDIM, epsilon prediction; UNetMotionModel)
    Levels: ``timestep_grid="official"``: ``t_k = round(linspace(0, T - 1, L))[k - 1]`` for level
    k >= 1 (T = num_train_timesteps), level 0 ``alphas_cumprod[0]`` (so the head's last step, from
    t = 0, is the identity, as in the official sampler); ``"scheduler"``: the scheduler's timesteps
    for L steps, ascending, with level 0 the scheduler's final alpha (``final_alpha_cumprod``).
    Per-frame update (DDIM; shown for eta = 0):
    ``x0 = (x - sqrt(1 - a) eps) / sqrt(a)``, ``x' = sqrt(a') x0 + sqrt(1 - a') eps`` with
    ``a = abar(t_k)``, ``a' = abar(t_{k-1})``: consecutive timesteps of the schedule, as FIFO's
    official DDIM sampler does. (diffusers' DDIMScheduler.step steps to ``t - 1000 // L``, which is
    the next schedule timestep for "leading"/"trailing" spacing but not always for "linspace";
    the tests compare with DDIMScheduler.step on a "leading" schedule.) ``eta`` (FIFODiffusion's
    option): 0 (default, diffusers' DDIM default) is deterministic; the official FIFO code runs
    eta = 1, which adds ``sigma z`` to every frame at every step (DDIM Eq. 12), with z drawn for the
    whole queue once per iteration from the run's CPU generator (the same on every rank and after
    a resume).
    Per-frame timesteps: UNetMotionModel computes ONE time embedding per video and repeats it over
    the frames folded into the batch; :func:`per_frame_time_embedding` computes the embedding of a
    ``(B * F,)`` timestep vector (same frame-major order as that repeat) and hands it to every
    down/mid/up block in place of the repeated one (forward pre-hooks; nothing is patched in
    diffusers' code). With equal timesteps it is exactly the model's own call.
    Frames are latent frames 1:1 with video frames (AnimateDiff's VAE is per image).

``SkyReelsFamily`` (flow matching; SkyReelsV2Transformer3DModel, a Wan-architecture transformer)
    Everything but the model call is Wan's: the same flow-matching levels (the pipeline scheduler's
    sigmas; SkyReels-V2 ships UniPC with flow shift 8), the same Euler update, the same Wan VAE and
    causal decoding. Per-frame timesteps: SkyReelsV2Transformer3DModel does NOT take Wan's per-token
    2-D timestep (its blocks would read a ``(B, seq, 6, D)`` modulation as ``(B, 6, seq, D)``); it
    takes one timestep per latent frame, ``timestep`` of shape ``(B, F)`` with
    ``enable_diffusion_forcing=True`` (the diffusion-forcing path its DF checkpoints were trained
    with), and repeats each frame's modulation over that frame's patch tokens itself. With equal
    timesteps this is exactly its ordinary ``(B,)`` call, and with distinct ones exactly Wan's
    per-token call with the same weights (tests/test_fifo_skyreels.py checks both).
    ``inject_sample_info`` checkpoints (SkyReels-V2-DF-1.3B) add an fps embedding (index 0 for
    16 fps, 1 otherwise, as the pipelines map it; ``SkyReelsFamily.fps``, default 24) to the
    modulation. It is passed as a one-element list: the transformer repeats the fps term over frames
    as ``(F, 6, D)``, which broadcasts over a CFG batch of 2 only when it was computed for one row
    (a per-row list would not broadcast), and every row shares the same fps anyway.
    ``num_frame_per_block = b > 1`` makes the transformer attend block-causally (each block of b
    frames sees itself and the blocks before it). FIFO's windows are ordered cleanest first, the
    direction diffusion forcing denoises in, so this is supported when the window f is a multiple of
    b (the mask is built for whole blocks); otherwise ``ValueError`` (``frames_per_window``).
    Image-conditioned transformers (``image_dim`` / ``added_kv_proj_dim``) are rejected (FIFO here
    is text-to-video). Initial clip: the pipeline itself with ``output_type="latent"`` when its
    ``__call__`` can sample from text embeddings alone (SkyReelsV2DiffusionForcingPipeline, run
    synchronously: every frame at the same timestep, ``base_num_frames`` = the clip so no long-video
    chunking); otherwise (the DF video-/image-to-video pipelines need a video/image, the plain
    SkyReelsV2Pipeline passes no fps to an inject_sample_info transformer) a flow-matching Euler loop
    over the family's own levels and model call, all frames at one level, from Gaussian noise drawn
    exactly as the DF pipeline draws it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


TIMESTEP_GRIDS = ("official", "scheduler")


def _check_grid(grid: str) -> str:
    if grid not in TIMESTEP_GRIDS:
        raise ValueError(f"timestep_grid must be one of {TIMESTEP_GRIDS}, got {grid!r}")
    return grid


@dataclass
class Levels:
    """Noise levels 0 (clean) .. L (tail) and the model timestep of each."""

    t_model: torch.Tensor            # (L+1,) float: the timestep the model is told at each level
    sigma: Optional[torch.Tensor] = None   # flow matching: (L+1,) ascending, sigma[0] = 0
    abar: Optional[torch.Tensor] = None    # DDIM: (L+1,) descending alphas_cumprod


def _is_skyreels_v2(model) -> bool:
    try:
        from diffusers import SkyReelsV2Transformer3DModel
    except ImportError:  # a diffusers without SkyReels-V2
        return False
    return isinstance(model, SkyReelsV2Transformer3DModel)


def family_of(pipe) -> str:
    """'skyreels', 'wan' or 'animatediff' from the pipeline's denoiser. SkyReels-V2 is checked first:
    its transformer has Wan's config (patch_size) but takes per-frame, not per-token, timesteps."""
    if _is_skyreels_v2(getattr(pipe, "transformer", None)):
        return "skyreels"
    if hasattr(pipe, "transformer") and hasattr(getattr(pipe.transformer, "config", None), "patch_size"):
        return "wan"
    if hasattr(pipe, "unet") and hasattr(pipe.unet, "down_blocks"):
        return "animatediff"
    raise ValueError("pipe: FIFO supports Wan-family pipelines (WanTransformer3DModel), SkyReels-V2 pipelines "
                     "(SkyReelsV2Transformer3DModel) and AnimateDiff pipelines (UNetMotionModel); "
                     f"got {type(pipe).__name__}")


def make_family(pipe):
    return {"wan": WanFamily, "skyreels": SkyReelsFamily, "animatediff": AnimateDiffFamily}[family_of(pipe)](pipe)


def _to_uint8(video):
    from ..video import to_uint8_frames

    return to_uint8_frames(((video.float() + 1) / 2).clamp(0, 1))


class _Family:
    """What the families share: the denoiser's device and the window of the trained clip length
    (a pipeline's ``longvideo_trained_latent_frames`` overrides the class default, as the tiny
    models do)."""

    trained_latent_frames: int  # latent frames of the clips the checkpoints were trained on

    @property
    def device(self):
        return self.denoiser.device

    def trained_window(self) -> int:
        return int(getattr(self.pipe, "longvideo_trained_latent_frames", 0) or self.trained_latent_frames)

    def default_window(self) -> int:
        return self.trained_window()


class WanFamily(_Family):
    name = "wan"
    temporal_compression = 4
    flow_matching = True           # levels are flow sigmas (Ouroboros' tail keeps z; see renoise)
    default_guidance_scale = 5.0   # the Wan pipelines' default
    full_size = (480, 832)         # Wan 2.1 480p
    trained_latent_frames = 21     # 81 video frames

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = pipe.transformer

    def default_size(self):
        """(height, width): 32x32 on the built-in tiny model (trained length 3), else full_size."""
        tiny = getattr(self.pipe, "longvideo_trained_latent_frames", None) == 3
        return (32, 32) if tiny else self.full_size

    @staticmethod
    def resolve_grid(grid: str) -> str:
        """The grid in effect: flow matching has no DDPM-timestep linspace; the official code's
        diffusers branch uses the scheduler's grid, so "official" is "scheduler" here."""
        _check_grid(grid)
        return "scheduler"

    def levels(self, L: int, device, grid: str = "scheduler") -> Levels:
        """The scheduler's flow sigmas for L steps, ascending (`grid`: both names, see the module
        docstring)."""
        self.resolve_grid(grid)
        sched = self.pipe.scheduler
        sched.set_timesteps(L, device=device)
        s = sched.sigmas.to(device=device, dtype=torch.float32)
        if s.numel() != L + 1:
            s = torch.cat([s[:L], s.new_zeros(1)])
        s = s.flip(0)
        return Levels(t_model=s * sched.config.num_train_timesteps, sigma=s)

    def encode_prompt(self, text, negative, cfg, device):
        return self.pipe.encode_prompt(prompt=text, negative_prompt=negative, do_classifier_free_guidance=cfg,
                                       device=device)

    def model_output(self, x, t_frames, prompt_embeds, negative_embeds, guidance_scale):
        """Velocity for window x (1, C, F, h, w) at per-frame model timesteps t_frames (F,)."""
        tr = self.denoiser
        _, ph, pw = tr.config.patch_size
        tokens = (x.shape[3] // ph) * (x.shape[4] // pw)
        t = t_frames.repeat_interleave(tokens)[None]  # (1, F * tokens): one timestep per token
        cfg = negative_embeds is not None and guidance_scale > 1.0
        xin = torch.cat([x, x]) if cfg else x
        emb = torch.cat([negative_embeds, prompt_embeds]) if cfg else prompt_embeds
        v = tr(hidden_states=xin.to(tr.dtype), timestep=t.expand(xin.shape[0], -1), encoder_hidden_states=emb,
               return_dict=False)[0].float()
        if cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        return v

    @staticmethod
    def _b(t):
        return t.view(1, 1, -1, 1, 1)

    def update(self, lv: Levels, x, out, k_in, k_out, eta: float = 0.0, noise=None):
        """Euler step of every frame from level k_in to level k_out (index tensors (F,)). `eta` and
        `noise` are DDIM's (FIFODiffusion rejects eta > 0 for flow matching): unused here."""
        return x + self._b(lv.sigma[k_out] - lv.sigma[k_in]) * out

    def noise_clean(self, lv: Levels, x0, k, noise):
        """Forward process from clean: x = (1 - sigma) x0 + sigma eps."""
        s = self._b(lv.sigma[k])
        return (1 - s) * x0 + s * noise

    def renoise(self, lv: Levels, z, k_from, k_to, noise):
        """Tail re-noising for Ouroboros (see OuroborosConfig): Wan's schedule ends at sigma_L = 1,
        where the forward relation would return pure, unrelated noise, so z is kept as it is
        (one level below the tail, unit variance like the tail); noise is not used."""
        return z

    def guidance_coefficient(self, lv: Levels, k_in, k_out, eta: float = 0.0):
        """Self-recurrent guidance step size per frame: sigma_out * sigma_in (the flow-matching
        analogue of DDIM's sqrt(1 - abar_prev) sqrt(1 - abar_t))."""
        return self._b(lv.sigma[k_out] * lv.sigma[k_in])

    def sample_clip(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        pipe = self.pipe
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height, width=width,
                    num_frames=(f - 1) * pipe.vae_scale_factor_temporal + 1, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generator, output_type="latent").frames.float()

    def decode(self, latent, cache):
        """Video frames of one popped latent frame, as uint8 (F, H, W, 3), and the decoder cache to
        pass with the next one (``cache=None`` for the first frame of the video; see the module
        docstring). The VAE's own cache is not touched: a list of ours is handed to its decoder."""
        vae = self.pipe.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latent)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latent)
        x = vae.post_quant_conv((latent * std + mean).to(vae.dtype))
        first = cache is None
        if first:
            vae.clear_cache()  # sizes the cache: one slot per causal convolution of the decoder
            cache = [None] * len(vae._feat_map)
        cache = list(cache)    # the decoder replaces entries: the state passed in stays as it was
        video = vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first)
        if getattr(vae.config, "patch_size", None) is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=vae.config.patch_size)
        video = video.clamp(-1.0, 1.0)                      # (1, 3, 1 or 4, H, W) in [-1, 1]
        return _to_uint8(video[0].permute(1, 0, 2, 3)), cache


class SkyReelsFamily(WanFamily):
    """SkyReels-V2 (see the module docstring): Wan's levels, Euler update, re-noising and causal VAE
    decoding; the model is told one timestep per latent frame (diffusion forcing)."""

    name = "skyreels"
    default_guidance_scale = 6.0   # the SkyReels-V2 text-to-video pipelines' default
    full_size = (544, 960)         # SkyReels-V2 540P
    trained_latent_frames = 25     # the DF pipelines' base_num_frames = 97 video frames
    fps = 24                       # fps conditioning of inject_sample_info checkpoints (16 or 24)

    def __init__(self, pipe):
        super().__init__(pipe)
        cfg = self.denoiser.config
        if getattr(cfg, "image_dim", None) is not None or getattr(cfg, "added_kv_proj_dim", None) is not None:
            raise ValueError("pipe: FIFO runs SkyReels-V2 text-to-video transformers; this one is image-conditioned "
                             f"(image_dim={cfg.image_dim}, added_kv_proj_dim={cfg.added_kv_proj_dim})")

    @property
    def block_size(self) -> int:
        """num_frame_per_block: latent frames per causal attention block (1: full attention)."""
        return int(getattr(self.denoiser.config, "num_frame_per_block", 1) or 1)

    def default_window(self) -> int:
        f = self.trained_window()
        b = self.block_size
        return max(b, f // b * b)

    def check_window(self, f: int) -> int:
        """Raise ValueError unless a window of f latent frames is whole causal blocks."""
        b = self.block_size
        if b > 1 and f % b:
            raise ValueError(f"frames_per_window: the SkyReels-V2 transformer attends block-causally in blocks of "
                             f"num_frame_per_block = {b} latent frames, so FIFO's window must be a multiple of {b}; "
                             f"got f = {f}")
        return f

    def _fps_kwargs(self) -> dict:
        if not getattr(self.denoiser.config, "inject_sample_info", False):
            return {}
        # One entry, broadcast over the batch by the transformer (see the module docstring); the
        # pipelines' mapping: 16 fps -> embedding 0, anything else -> 1.
        return {"fps": [0 if int(self.fps) == 16 else 1]}

    def model_output(self, x, t_frames, prompt_embeds, negative_embeds, guidance_scale):
        """Velocity for window x (1, C, F, h, w) at per-frame model timesteps t_frames (F,):
        ``timestep`` (B, F) with ``enable_diffusion_forcing=True``; CFG halves in one call."""
        tr = self.denoiser
        self.check_window(x.shape[2])
        cfg = negative_embeds is not None and guidance_scale > 1.0
        xin = torch.cat([x, x]) if cfg else x
        emb = torch.cat([negative_embeds, prompt_embeds]) if cfg else prompt_embeds
        t = t_frames.to(device=x.device, dtype=torch.float32)[None].repeat(xin.shape[0], 1)  # (B, F)
        v = tr(hidden_states=xin.to(tr.dtype), timestep=t, encoder_hidden_states=emb, enable_diffusion_forcing=True,
               return_dict=False, **self._fps_kwargs())[0].float()
        if cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        return v

    def pipeline_can_sample(self) -> bool:
        """Whether the pipeline's own __call__ can sample the initial clip from text embeddings alone
        (latent output, no image/video input, and fps conditioning where the transformer needs it)."""
        import inspect

        try:
            params = inspect.signature(type(self.pipe).__call__).parameters
        except (TypeError, ValueError):
            return False
        needed = {"prompt_embeds", "negative_prompt_embeds", "output_type", "num_frames", "height", "width",
                  "num_inference_steps", "guidance_scale", "generator"}
        if not needed <= set(params):
            return False
        required = [n for n, p in params.items() if n not in ("self", "prompt") and p.default is p.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if required:
            return False
        return "fps" in params or not self._fps_kwargs()

    def sample_clip(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        """Initial clip of f latent frames (1, C, f, h, w), float32 (see the module docstring)."""
        self.check_window(f)
        if not self.pipeline_can_sample():
            return self.sample_clip_euler(prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale,
                                          generator)
        import inspect

        pipe = self.pipe
        num_frames = (f - 1) * self.temporal_compression + 1
        params = inspect.signature(type(pipe).__call__).parameters
        extra = {}
        if "fps" in params:
            extra["fps"] = self.fps
        if "base_num_frames" in params:  # one chunk: no long-video overlap logic
            extra["base_num_frames"] = num_frames
        return pipe(prompt=None, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height,
                    width=width, num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=generator, output_type="latent", **extra).frames.float()

    def sample_clip_euler(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        """Plain flow-matching Euler sampling of f latent frames over the family's own levels for
        `steps` steps (every frame at the same level), starting from noise drawn as the SkyReels-V2
        DF pipelines draw it (float32 on the CPU generator, shape (1, C, f, H / s, W / s))."""
        self.check_window(f)
        s = getattr(self.pipe, "vae_scale_factor_spatial", None) or 8
        shape = (1, self.denoiser.config.in_channels, f, height // s, width // s)
        x = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        lv = self.levels(steps, self.device)
        for k in range(steps, 0, -1):
            v = self.model_output(x, lv.t_model[k].repeat(f), prompt_embeds, negative_embeds, guidance_scale)
            x = x + (lv.sigma[k - 1] - lv.sigma[k]) * v
        return x


@contextlib.contextmanager
def per_frame_time_embedding(unet, timesteps: torch.Tensor):
    """Inside the block, every block of a UNetMotionModel gets the time embedding of ``timesteps``
    (B * F,), one per frame in the batch-major / frame-minor order the UNet folds frames in,
    instead of the per-video embedding repeated over frames."""
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype), None)

    def swap(module, args, kwargs):
        if "temb" in kwargs:
            kwargs["temb"] = emb
        elif len(args) > 1:  # mid block: called as mid_block(sample, emb, ...)
            args = (args[0], emb) + tuple(args[2:])
        return args, kwargs

    blocks = list(unet.down_blocks) + list(unet.up_blocks) + ([unet.mid_block] if unet.mid_block is not None else [])
    handles = [b.register_forward_pre_hook(swap, with_kwargs=True) for b in blocks]
    try:
        yield emb
    finally:
        for h in handles:
            h.remove()


class AnimateDiffFamily(_Family):
    name = "animatediff"
    temporal_compression = 1
    flow_matching = False
    default_guidance_scale = 7.5
    trained_latent_frames = 16     # the motion modules' training clips (the tiny model says 4)

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = pipe.unet
        if getattr(pipe.scheduler.config, "prediction_type", "epsilon") != "epsilon":
            raise ValueError("pipe: FIFO's DDIM update needs an epsilon-prediction scheduler, got "
                             f"{pipe.scheduler.config.prediction_type!r}")


    def default_size(self):
        s = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return s, s

    @staticmethod
    def resolve_grid(grid: str) -> str:
        return _check_grid(grid)

    def levels(self, L: int, device, grid: str = "scheduler") -> Levels:
        """L + 1 levels (see the module docstring): the official linspace grid or the scheduler's."""
        sched = self.pipe.scheduler
        if _check_grid(grid) == "official":
            import numpy as np

            T = int(sched.config.num_train_timesteps)
            ts = torch.from_numpy(np.linspace(0, T - 1, L).round().astype(np.int64))   # ascending (L,)
            ac = sched.alphas_cumprod.to(torch.float32)
            abar = torch.cat([ac[:1], ac[ts]])  # level 0: the official alphas_prev[0] = alphas_cumprod[0]
            t_model = torch.cat([ts.new_zeros(1), ts]).to(torch.float32)
            return Levels(t_model=t_model.to(device), abar=abar.to(device))
        sched.set_timesteps(L, device="cpu")
        if sched.timesteps.numel() != L:
            raise ValueError(f"pipe.scheduler: FIFO needs one timestep per level, but {type(sched).__name__} gives "
                             f"{sched.timesteps.numel()} timesteps for {L} steps (use DDIMScheduler)")
        ts = sched.timesteps.flip(0).to(torch.float32)                    # ascending (L,)
        ac = sched.alphas_cumprod.to(torch.float32)
        final = getattr(sched, "final_alpha_cumprod", ac[0])
        abar = torch.cat([torch.as_tensor(final, dtype=torch.float32).view(1), ac[ts.long()]])
        return Levels(t_model=torch.cat([ts.new_zeros(1), ts]).to(device), abar=abar.to(device))

    def encode_prompt(self, text, negative, cfg, device):
        return self.pipe.encode_prompt(text, device, 1, cfg, negative_prompt=negative)

    def model_output(self, x, t_frames, prompt_embeds, negative_embeds, guidance_scale):
        """Noise prediction for window x (1, C, F, h, w) at per-frame timesteps t_frames (F,)."""
        unet = self.denoiser
        F = x.shape[2]
        cfg = negative_embeds is not None and guidance_scale > 1.0
        xin = torch.cat([x, x]) if cfg else x
        emb = torch.cat([negative_embeds, prompt_embeds]) if cfg else prompt_embeds
        emb = emb.repeat_interleave(F, dim=0)  # the pipeline's own per-frame text embeddings
        t_vec = t_frames.repeat(xin.shape[0])  # (B * F,), frame index fastest
        with per_frame_time_embedding(unet, t_vec):
            eps = unet(xin.to(unet.dtype), t_frames[0], encoder_hidden_states=emb).sample.float()
        if cfg:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance_scale * (e_c - e_u)
        return eps

    @staticmethod
    def _b(t):
        return t.view(1, 1, -1, 1, 1)

    def _sigma(self, lv: Levels, k_in, k_out, eta: float):
        """DDIM's sigma_t (Song et al. Eq. 16): eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')."""
        a, a_prev = self._b(lv.abar[k_in]), self._b(lv.abar[k_out])
        return eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()

    def update(self, lv: Levels, x, eps, k_in, k_out, eta: float = 0.0, noise=None):
        """DDIM step of every frame from level k_in to level k_out:
        x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z (sigma = 0 for eta = 0)."""
        a, a_prev = self._b(lv.abar[k_in]), self._b(lv.abar[k_out])
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if not eta:
            return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        sigma = self._sigma(lv, k_in, k_out, eta)
        return a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps + sigma * noise

    def noise_clean(self, lv: Levels, x0, k, noise):
        a = self._b(lv.abar[k])
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def renoise(self, lv: Levels, z, k_from, k_to, noise):
        """DDPM forward from level k_from to the noisier k_to in one step:
        z' = sqrt(abar_to / abar_from) z + sqrt(1 - abar_to / abar_from) eps (Ouroboros' tail)."""
        r = self._b(lv.abar[k_to] / lv.abar[k_from])
        return r.sqrt() * z + (1 - r).sqrt() * noise

    def guidance_coefficient(self, lv: Levels, k_in, k_out, eta: float = 0.0):
        """sqrt(1 - abar_prev - sigma^2) sqrt(1 - abar_t) (the eps term's coefficient times the
        eps <- eps + sqrt(1 - abar_t) grad of classifier guidance)."""
        s2 = self._sigma(lv, k_in, k_out, eta) ** 2 if eta else 0.0
        return (self._b(1 - lv.abar[k_out]) - s2).clamp_min(0).sqrt() * self._b((1 - lv.abar[k_in]).sqrt())

    def sample_clip(self, prompt_embeds, negative_embeds, height, width, f, steps, guidance_scale, generator):
        return self.pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height,
                         width=width, num_frames=f, num_inference_steps=steps, guidance_scale=guidance_scale,
                         generator=generator, output_type="latent").frames.float()

    def decode(self, latent, cache):
        """One image per latent frame (AnimateDiff's VAE is per image): no state between frames."""
        vae = self.pipe.vae
        img = vae.decode((latent[:, :, 0] / vae.config.scaling_factor).to(vae.dtype)).sample  # (1, 3, H, W)
        return _to_uint8(img), None
