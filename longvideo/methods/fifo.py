"""FIFO-Diffusion (Kim et al. 2024): diagonal denoising of an endless queue of latent frames.

Implemented here for Wan-family pipelines (flow matching, 2-D per-token timesteps). The queue
holds ``L = n * f`` latent frames at increasing noise levels (slot 0 cleanest). Noise levels
are the pipeline scheduler's own flow-matching sigmas for ``L`` steps (shift included):
``sigma_0 = 0 < sigma_1 < ... < sigma_L``, and slot ``k`` holds a latent at ``sigma_{k+1}``.
One iteration moves every slot one level down with a flow-matching Euler step per frame,

    x_{sigma_k} = x_{sigma_{k+1}} + (sigma_k - sigma_{k+1}) * v(x, sigma_{k+1}),

which is exactly the scheduler-free Euler update plain sampling makes for every frame at once
(``tests/test_fifo.py`` checks it against FlowMatchEulerDiscreteScheduler.step). The model sees
a window of ``f`` consecutive slots with one timestep per frame (repeated over the frame's tokens:
Wan's transformer takes a ``(B, tokens)`` timestep). After the step slot 0 is clean: it leaves
the queue (decoded and written at once) and a pure-noise frame enters at the tail.

Lookahead denoising (default): windows of ``f`` frames start every ``f/2`` slots over
``[f/2 clean context frames | L noisy slots]``, and only the second half of each window is written
back, so every frame is denoised with ``f/2`` cleaner frames before it (2n model calls per
iteration instead of n). Classifier-free guidance runs both halves in one model call.

Initial queue: a normally sampled clip of ``f`` latent frames (the plain pipeline), frame
``floor(i * f / L)`` re-noised to slot ``i``'s level with fresh noise (``x = (1-s) x0 + s eps``);
the clip's first ``f/2`` frames are the initial clean context (not emitted).

Decoding: Wan's VAE is causal with temporal compression 4. Each popped latent frame is decoded
together with the previous one and the last 4 decoded frames are emitted (the very first popped
latent frame gives 1 frame, as the VAE's first frame), so the output has the model's frame rate.

Ouroboros' coherent tail sampling is the ``coherent_tail`` option (see the class). Not yet
implemented (issue 6): AnimateDiff/DDIM family, Ouroboros' SACFA and self-recurrent guidance.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch


@dataclass
class QueueState:
    """Everything needed to continue a run: saved every K iterations, loaded by resume."""

    queue: torch.Tensor          # (1, C, L, h, w) noisy slots, slot k at sigma_{k+1}
    context: torch.Tensor        # (1, C, f/2, h, w) clean frames before the head (lookahead)
    prev_latent: Optional[torch.Tensor]  # last popped latent frame (for causal decoding)
    iteration: int
    frames_out: int
    rng_state: torch.Tensor      # state of the CPU generator that draws tail noise


class FIFODiffusion:
    """FIFO-Diffusion on a diffusers Wan pipeline (WanPipeline or a pipeline with its components).

    Args:
        pipe: the pipeline (text encoder, transformer, VAE, scheduler are used; the scheduler only
            for its sigma schedule).
        num_partitions: n; the queue holds n * f latent frames and there are n * f noise levels.
        frames_per_window: f, latent frames per model call (default: the model's trained clip
            length, 21 latent frames = 81 video frames for Wan, rounded up to even with
            lookahead). Must be even with lookahead.
        lookahead: lookahead denoising (windows every f/2, second halves written back).
        coherent_tail: Ouroboros' coherent tail latent sampling (its part (a)): the new tail frame
            is ``lowfreq_mix(z, eta, "gaussian", tail_d_s, tail_d_t)`` -- the low frequencies of
            ``z`` and the high frequencies of fresh noise ``eta`` -- where ``z`` is the latent that
            is second-to-last after the shift. Choice for flow matching: Wan's schedule ends at
            sigma_L = 1, where re-noising by the forward relation ``(1 - s) x0 + s eps`` would give
            pure, unrelated noise; ``z`` is taken as it is, at sigma_{L-1} (within one level of the
            tail and of unit variance like the tail), so the tail inherits its low-frequency
            structure (noise included), which is what makes consecutive tails coherent.
        distributed: when torch.distributed is initialised (NCCL on GPUs, gloo on CPU), the
            windows of an iteration are split over the ranks (window i on rank i % world) and the
            queue is assembled with one all_reduce of the per-slot updates: every slot is written
            by exactly one window, so the sum adds zeros to one value and every rank ends with
            bit-identical queues, equal to a single process's. All ranks must use the same seed.
    """

    def __init__(self, pipe, num_partitions: int = 4, frames_per_window: Optional[int] = None, lookahead: bool = True,
                 coherent_tail: bool = False, tail_d_s: float = 0.25, tail_d_t: float = 1.0, distributed: bool = True):
        if not hasattr(pipe, "transformer") or not hasattr(pipe.transformer.config, "patch_size"):
            raise ValueError("pipe: FIFODiffusion supports Wan-family pipelines (WanTransformer3DModel)")
        f = frames_per_window
        if f is None:  # the model's clip length, made even for lookahead's half windows
            f = int(getattr(pipe, "longvideo_trained_latent_frames", 0) or 21)
            f = max(2, f + (f % 2 if lookahead else 0))
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        if f < 2 or (lookahead and f % 2):
            raise ValueError(f"frames_per_window must be >= 2 and even with lookahead, got {f}")
        self.pipe, self.n, self.f, self.lookahead = pipe, num_partitions, f, lookahead
        self.L = num_partitions * f
        if coherent_tail and (tail_d_s <= 0 or tail_d_t <= 0):
            raise ValueError("tail_d_s and tail_d_t must be > 0")
        self.coherent_tail, self.tail_d_s, self.tail_d_t = coherent_tail, tail_d_s, tail_d_t
        self.distributed = distributed

    # ------------------------------------------------------------------------------------------
    def sigmas(self, device) -> torch.Tensor:
        """sigma_0 = 0 < ... < sigma_L: the scheduler's own schedule for L steps, ascending."""
        sched = self.pipe.scheduler
        sched.set_timesteps(self.L, device=device)
        s = sched.sigmas.to(device=device, dtype=torch.float32)
        if s.numel() != self.L + 1:
            s = torch.cat([s[: self.L], s.new_zeros(1)])
        return s.flip(0)

    def _velocity(self, x, sig, prompt_embeds, negative_embeds, guidance_scale):
        """Model velocity for a window x (1, C, F, h, w) at per-frame sigmas sig (F,).

        prompt_embeds: one tensor, or a PromptSchedule already resolved by `step` for the window.
        """
        tr = self.pipe.transformer
        pt, ph, pw = tr.config.patch_size
        F, h, w = x.shape[2], x.shape[3] // ph, x.shape[4] // pw
        t = (sig * self.pipe.scheduler.config.num_train_timesteps).repeat_interleave(h * w)[None]
        cfg = negative_embeds is not None and guidance_scale > 1.0
        xin = torch.cat([x, x]) if cfg else x
        emb = torch.cat([negative_embeds, prompt_embeds]) if cfg else prompt_embeds
        v = tr(hidden_states=xin.to(tr.dtype), timestep=t.expand(xin.shape[0], -1), encoder_hidden_states=emb,
               return_dict=False)[0].float()
        if cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        return v

    def step(self, state: QueueState, sig, prompt_embeds, negative_embeds, guidance_scale) -> torch.Tensor:
        """One FIFO iteration on state.queue; returns the new queue (slot 0 clean)."""
        q, f = state.queue, self.f
        levels_in = sig[1: self.L + 1]           # slot k at sigma_{k+1}
        levels_out = sig[: self.L]               # ... moves to sigma_k
        rank, world = self._rank_world()
        delta = torch.zeros_like(q)
        if self.lookahead:
            half = f // 2
            full = torch.cat([state.context, q], dim=2)
            lv_full = torch.cat([levels_out.new_zeros(half), levels_in])
            for i, s in enumerate(range(0, self.L, half)):  # window [s, s+f) of `full` writes slots [s, s+half)
                if i % world != rank:
                    continue
                # the window's centre is noisy slot s, i.e. latent frame iteration + s of the video
                v = self._velocity(full[:, :, s: s + f], lv_full[s: s + f],
                                   _embeds_at(prompt_embeds, state.iteration + s), negative_embeds, guidance_scale)
                ds = (levels_out[s: s + half] - levels_in[s: s + half]).view(1, 1, -1, 1, 1)
                delta[:, :, s: s + half] = ds * v[:, :, half:]
        else:
            for i, s in enumerate(range(0, self.L, f)):
                if i % world != rank:
                    continue
                v = self._velocity(q[:, :, s: s + f], levels_in[s: s + f],
                                   _embeds_at(prompt_embeds, state.iteration + s + f // 2), negative_embeds,
                                   guidance_scale)
                ds = (levels_out[s: s + f] - levels_in[s: s + f]).view(1, 1, -1, 1, 1)
                delta[:, :, s: s + f] = ds * v
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(delta)
        return q + delta

    def _rank_world(self):
        import torch.distributed as dist

        if self.distributed and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    # ------------------------------------------------------------------------------------------
    def _decode(self, latent, prev):
        """Video frames (uint8 (F, H, W, 3)) for one popped latent frame (see module docstring)."""
        from ..video import to_uint8_frames

        vae = self.pipe.vae
        z = latent if prev is None else torch.cat([prev, latent], dim=2)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
        video = vae.decode((z * std + mean).to(vae.dtype), return_dict=False)[0]  # (1, 3, F, H, W) in [-1, 1]
        if prev is not None:
            video = video[:, :, 1:]
        return to_uint8_frames(((video[0].float() + 1) / 2).clamp(0, 1).permute(1, 0, 2, 3))

    def _initial_state(self, prompt_embeds, negative_embeds, height, width, guidance_scale, generator, sig,
                       init_steps):
        pipe, f = self.pipe, self.f
        clip = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height, width=width,
                    num_frames=(f - 1) * pipe.vae_scale_factor_temporal + 1, num_inference_steps=init_steps,
                    guidance_scale=guidance_scale, generator=generator, output_type="latent").frames.float()
        idx = (torch.arange(self.L) * f) // self.L
        eps = torch.randn(clip[:, :, idx].shape, generator=generator, device=generator.device).to(clip)
        s = sig[1:].view(1, 1, -1, 1, 1)
        queue = (1 - s) * clip[:, :, idx] + s * eps
        return QueueState(queue=queue, context=clip[:, :, : f // 2].clone(), prev_latent=None, iteration=0,
                          frames_out=0, rng_state=generator.get_state())

    def generate(self, prompt, num_frames: int, height: int = 32, width: int = 32, guidance_scale: float = 5.0,
                 negative_prompt: str = "", seed: int = 0, init_steps: Optional[int] = None,
                 checkpoint_dir=None, checkpoint_every: int = 0, resume: bool = False,
                 stop_after_iterations: Optional[int] = None) -> Iterator:
        """Yield output video frames (uint8 (H, W, 3)) as they leave the queue, `num_frames` in all.

        prompt: a string, or a list of (prompt, start_video_frame) pairs (multi-prompt: a window
        uses the prompt in force at its centre frame; the first start must be 0).

        checkpoint_dir/checkpoint_every: save the queue state every K iterations (atomically);
        resume: continue from the saved state (the frames already written are not produced again)
        and produce exactly the frames an uninterrupted run with the same seed produces.
        stop_after_iterations: stop early (for tests of interruption).
        """
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if checkpoint_every < 0 or (checkpoint_every and not checkpoint_dir):
            raise ValueError("checkpoint_every needs a checkpoint_dir and must be >= 0")
        pipe = self.pipe
        device = pipe.transformer.device
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            schedule = PromptSchedule.parse(prompt, getattr(pipe, "vae_scale_factor_temporal", 4))
            embeds, negative_embeds = [], None
            for text in schedule.prompts:
                pe, negative_embeds = pipe.encode_prompt(
                    prompt=text, negative_prompt=negative_prompt, do_classifier_free_guidance=guidance_scale > 1.0,
                    device=device)
                embeds.append(pe)
            schedule.embeds = embeds
            prompt_embeds = embeds[0] if len(embeds) == 1 else schedule
            sig = self.sigmas(device)
            ckpt = Path(checkpoint_dir) / "fifo_state.pt" if checkpoint_dir else None
            if resume:
                if ckpt is None or not ckpt.exists():
                    raise FileNotFoundError(f"resume: no checkpoint at {ckpt}")
                state = QueueState(**torch.load(ckpt, map_location=device, weights_only=True))
                generator.set_state(state.rng_state)
            else:
                state = self._initial_state(embeds[0], negative_embeds, height, width, guidance_scale, generator,
                                            sig, init_steps or max(self.f, 4))
            done = 0
            while state.frames_out < num_frames:
                if stop_after_iterations is not None and done >= stop_after_iterations:
                    return
                new = self.step(state, sig, prompt_embeds, negative_embeds, guidance_scale)
                head = new[:, :, :1]
                tail = torch.randn(head.shape, generator=generator).to(new)  # sigma_L = 1: pure noise
                if self.coherent_tail:
                    tail = torch.ops.longvideo.lowfreq_mix(new[:, :, -1:].contiguous(), tail, "gaussian",
                                                           self.tail_d_s, self.tail_d_t, 4)
                frames = self._decode(head, state.prev_latent)
                context = torch.cat([state.context[:, :, 1:], head], dim=2) if self.lookahead else state.context
                state = QueueState(queue=torch.cat([new[:, :, 1:], tail], dim=2), context=context, prev_latent=head,
                                   iteration=state.iteration + 1, frames_out=state.frames_out,
                                   rng_state=generator.get_state())
                for frame in frames[: num_frames - state.frames_out]:
                    state.frames_out += 1
                    yield frame
                done += 1
                if checkpoint_every and state.iteration % checkpoint_every == 0:
                    ckpt.parent.mkdir(parents=True, exist_ok=True)
                    tmp = ckpt.with_suffix(".tmp")
                    torch.save({k: getattr(state, k) for k in QueueState.__dataclass_fields__}, tmp)
                    os.replace(tmp, ckpt)


class PromptSchedule:
    """Multi-prompt: prompts with the video frame at which each starts, mapped to latent frames."""

    def __init__(self, prompts, latent_starts):
        self.prompts, self.latent_starts, self.embeds = list(prompts), list(latent_starts), None

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

    def at(self, latent_index: int):
        i = max(j for j, s in enumerate(self.latent_starts) if s <= max(latent_index, 0))
        return self.embeds[i]


def _embeds_at(prompt_embeds, latent_index):
    return prompt_embeds.at(latent_index) if isinstance(prompt_embeds, PromptSchedule) else prompt_embeds


# ----------------------------------------------------------------------------------------------
# CLI: longvideo generate --method fifo
def add_generate_arguments(parser) -> None:
    g = parser.add_argument_group("fifo")
    g.add_argument("--fifo-partitions", type=int, default=4, help="n: queue of n*f latent frames")
    g.add_argument("--fifo-window", type=int, default=None, help="f: latent frames per model call")
    g.add_argument("--fifo-no-lookahead", action="store_true")
    g.add_argument("--fifo-checkpoint-every", type=int, default=0, help="save the queue state every K iterations")
    g.add_argument("--fifo-prompt-schedule", default=None,
                   help='multi-prompt: "0=a cat walking;120=a cat sleeping" (video frame = prompt; overrides --prompt)')
    g.add_argument("--fifo-coherent-tail", action="store_true",
                   help="Ouroboros' coherent tail latent sampling (lowfreq_mix, gaussian d_s 0.25, d_t 1.0)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted fifo run from its checkpoint")


def run_generate(args) -> int:
    from tqdm import tqdm

    from ..models import load_pipeline
    from ..video import VideoWriter

    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: one rank per GPU (or CPU process)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    pipe = load_pipeline("wan", "t2v", model=args.model, device=args.device, dtype=args.dtype)
    fifo = FIFODiffusion(pipe, num_partitions=args.fifo_partitions, frames_per_window=args.fifo_window,
                         lookahead=not args.fifo_no_lookahead, coherent_tail=args.fifo_coherent_tail)
    out = Path(args.out or "out/fifo.mp4")
    num_frames = args.num_frames or 48
    prompt = args.prompt
    if args.fifo_prompt_schedule:
        try:
            prompt = [(text.strip(), int(start)) for start, text in
                      (item.split("=", 1) for item in args.fifo_prompt_schedule.split(";") if item.strip())]
        except ValueError:
            raise SystemExit(f"--fifo-prompt-schedule: expected 'FRAME=prompt;FRAME=prompt', got {args.fifo_prompt_schedule!r}")
    ckpt_dir = out.with_suffix(".fifo_state")
    start_frame = 0
    if args.resume and (ckpt_dir / "fifo_state.pt").exists():
        start_frame = int(torch.load(ckpt_dir / "fifo_state.pt", weights_only=True)["frames_out"])
    t0 = time.perf_counter()
    # On resume the frames written before the checkpoint stay in the old file; new ones go to a part file.
    target = out if start_frame == 0 else out.with_name(f"{out.stem}.from{start_frame}{out.suffix}")
    if rank != 0:  # every rank runs the queue; rank 0 writes the video and the checkpoints
        for _ in fifo.generate(prompt, num_frames, height=args.height or 32, width=args.width or 32,
                               guidance_scale=args.guidance_scale if args.guidance_scale is not None else 5.0,
                               seed=args.seed, checkpoint_dir=ckpt_dir, checkpoint_every=0, resume=args.resume):
            pass
        return 0
    with VideoWriter(target, fps=args.fps) as writer, tqdm(total=num_frames, initial=start_frame, unit="frame") as bar:
        for frame in fifo.generate(prompt, num_frames, height=args.height or 32, width=args.width or 32,
                                   guidance_scale=args.guidance_scale if args.guidance_scale is not None else 5.0,
                                   seed=args.seed, checkpoint_dir=ckpt_dir,
                                   checkpoint_every=args.fifo_checkpoint_every, resume=args.resume):
            writer.write(frame)
            bar.update(1)
    dt = time.perf_counter() - t0
    made = num_frames - start_frame
    print(f"wrote {target} ({made} frames, {made / dt:.2f} frames/s)")
    return 0
