"""StreamingT2V's randomized blending: seamless chunked video-to-video refinement of a long video.

StreamingT2V (Henschel et al. 2024; docs/methods.md) enhances a long video with a short-clip
video-to-video model by cutting the video into overlapping chunks (24 frames, overlap 8) and
denoising all chunks at every solver step, SDEdit-style from strength 0.6 (t = 600 of 1000):

    x_T = add_noise(E(video), eps, T_strength)      eps drawn ONCE for the whole video, so the
                                                     frames two chunks share start from one noise
    for every solver step t:
        for every chunk k:  y_k = model(x_t[chunk k], t)          (batched over chunks)
        for every boundary k (chunk k-1 | chunk k), overlap o_k latent frames:
            f_thr ~ Uniform{0, ..., o_k - 1}                       (new draw per boundary per step)
            the overlap takes chunk k-1's value for its first f_thr frames, chunk k's for the rest
        x_{t-1} = the stitched result

Two variants of what is blended (both in the paper's code base):

* ``blend="x0"`` (ModelScope branch) blends the x0 predictions and takes ONE solver step on the
  whole video. Implementation: for every scheduler family the x0 prediction is an affine function
  of the model output with coefficients that depend on t only, x0 = a(t) x_t + b(t) y (epsilon:
  a = 1/sqrt(abar), b = -sqrt(1-abar)/sqrt(abar); v: a = sqrt(abar), b = -sqrt(1-abar); flow
  matching: a = 1, b = -sigma). Because x_t is one tensor for the whole video, every chunk sees the
  same x_t on an overlap frame, so blending the x0 predictions by frame selection is exactly
  blending the model outputs y_k by the same selection; the blended y then goes through the
  pipeline's own scheduler once, on the whole latent video. This works unchanged for single- and
  multistep schedulers (DDIM, Euler, flow-matching Euler, UniPC, DPM-Solver): the multistep history
  is that of the blended, globally consistent outputs.
* ``blend="xt"`` (StreamingSVD branch) steps every chunk with its OWN copy of the scheduler
  (per-chunk solver state: step index, multistep history, CogVideoX-DPM's previous x0) and blends
  the resulting x_{t-1}. For a first-order deterministic step (DDIM eta=0, flow-matching Euler)
  x_{t-1} is affine in y with chunk-independent coefficients, so both variants coincide; they
  differ for multistep solvers (each chunk's history is its own) and stochastic steps.

Baselines in the same object (``mode``):

* ``"independent"``: every chunk is its own SDEdit run with its own noise (the noise of an overlap
  is redrawn for the later chunk) and its own trajectory; chunks are stitched at the middle of each
  overlap at the end.
* ``"shared_noise"``: as independent, but the noise is the one whole-video draw (overlap frames
  start identical, then evolve separately); stitched the same way.
  The noise of ``"independent"`` equals that of ``"shared_noise"`` outside overlaps, so with
  overlap 0 all three modes compute the same thing.

Chunking happens in latent frames. Chunk and overlap sizes are given in video frames and
converted by the VAE's temporal compression t (Wan, CogVideoX: t = 4 and causal, i.e. latent frame
0 holds one video frame and every later one t frames, so a chunk of 1 + t*k frames is k + 1 latent
frames; AnimateDiff: t = 1): ``chunk_latent = (chunk_frames - 1) // t + 1``,
``overlap_latent = ceil(overlap_frames / t)``. The whole video is encoded once (a causal VAE needs
1 + t*k frames: the last frame is repeated to get there and the extra frames are cut off the
output) and decoded once. Chunks start every ``chunk - overlap`` latent frames; the last chunk is
aligned to the end of the video (it overlaps its predecessor by more than ``overlap``), so every
chunk has the same length (one batch) and no frame is dropped. With a causal VAE a chunk that
starts inside the video begins with a t-frame latent where the model was trained on a one-frame
latent: the model sees it as an ordinary frame (its temporal positions are relative).

Supported pipelines: diffusers' ``WanVideoToVideoPipeline`` (and ``WanPipeline``, same
components; Wan 2.2 A14B's two-expert ``WanPipeline``, each step on the expert of its timestep), ``AnimateDiffVideoToVideoPipeline`` (and ``AnimateDiffPipeline``),
``CogVideoXVideoToVideoPipeline``. The pipeline's own ``encode_prompt``, VAE, video processor,
scheduler class and classifier-free guidance are used (through the family layer,
``longvideo.methods.families``); only the denoising loop is ours.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .families import family_for
from .outputs import (
    ProgressBarMixin,
    VideoOutput,
    check_callback,
    check_output_type,
    check_positive_int,
    check_prompt,
    resolve_generator,
)

VARIANTS = ("x0", "xt")
MODES = ("blend", "independent", "shared_noise")
OUTPUT_TYPES = ("np", "pt", "pil", "latent")


# --------------------------------------------------------------------------------------------
# Chunk layout (pure functions of the sizes; no model involved)
# --------------------------------------------------------------------------------------------


def latent_sizes(chunk_frames: int, overlap_frames: int, temporal_factor: int, causal: bool) -> tuple[int, int]:
    """Chunk and overlap in latent frames for a VAE with temporal compression `temporal_factor`."""
    if causal:
        chunk = (chunk_frames - 1) // temporal_factor + 1
    else:
        chunk = max(1, chunk_frames // temporal_factor)
    overlap = math.ceil(overlap_frames / temporal_factor)
    return chunk, overlap


def chunk_starts(latent_frames: int, chunk: int, overlap: int) -> list[int]:
    """First latent frame of every chunk: stride ``chunk - overlap``, last chunk aligned to the end."""
    if latent_frames <= chunk:
        return [0]
    stride = chunk - overlap
    if stride < 1:  # the chunks would not advance (the loop below would never end)
        raise ValueError(f"overlap ({overlap} latent frames) must be smaller than the chunk ({chunk} latent frames)")
    starts = [0]
    while starts[-1] + chunk < latent_frames:
        starts.append(min(starts[-1] + stride, latent_frames - chunk))
    return starts


@dataclass(frozen=True)
class ChunkLayout:
    """Where the chunks lie, in latent and in video frames.

    num_frames      frames of the input video (= frames of the output)
    padded_frames   frames given to the VAE (a causal VAE needs 1 + t*k)
    latent_frames   L, frames of the latent video
    chunk, overlap  chunk length and nominal overlap in latent frames (chunk = min(chunk, L))
    starts          first latent frame of every chunk; chunk k covers [starts[k], starts[k] + chunk)
    """

    num_frames: int
    padded_frames: int
    latent_frames: int
    temporal_factor: int
    causal: bool
    chunk: int
    overlap: int
    starts: tuple

    @property
    def num_chunks(self) -> int:
        return len(self.starts)

    def boundary_overlaps(self) -> list[int]:
        """Actual overlap (latent frames) of chunk k-1 and chunk k, for k = 1..n-1."""
        return [self.starts[k - 1] + self.chunk - self.starts[k] for k in range(1, self.num_chunks)]

    def video_frame(self, latent_index: int) -> int:
        """First video frame held by a latent frame."""
        if latent_index <= 0:
            return 0
        return 1 + self.temporal_factor * (latent_index - 1) if self.causal else self.temporal_factor * latent_index

    def seam_regions(self) -> list[tuple[int, int]]:
        """Per boundary, the video frames [a, z) of the overlap (z = a + 1 for a zero overlap)."""
        regions = []
        for k, o in zip(range(1, self.num_chunks), self.boundary_overlaps()):
            a = min(self.video_frame(self.starts[k]), self.num_frames - 1)
            z = min(self.video_frame(self.starts[k] + o), self.num_frames)
            regions.append((a, max(z, a + 1)))
        return regions

    def seam_transitions(self) -> list[int]:
        """Frame transitions i (frame i-1 -> frame i) where a chunk seam can lie: every transition
        into and inside an overlap region. Independent chunks cut in the middle of this range,
        randomized blending anywhere inside it, so it is the fair place to measure seams."""
        out = []
        for a, z in self.seam_regions():
            out.extend(i for i in range(a, z) if 1 <= i < self.num_frames)
        return sorted(set(out))

    def to_dict(self) -> dict:
        return {"num_frames": self.num_frames, "padded_frames": self.padded_frames,
                "latent_frames": self.latent_frames, "temporal_factor": self.temporal_factor,
                "chunk_latent": self.chunk, "overlap_latent": self.overlap, "starts": list(self.starts),
                "seam_regions": self.seam_regions()}


def draw_cuts(starts: Sequence[int], chunk: int, mode: str, generator: Optional[torch.Generator]) -> list[int]:
    """Latent frame from which chunk k supplies the video, for every chunk (cut[0] = 0).

    Randomized blending: cut_k = start_k + f_thr, f_thr ~ Uniform{0..o_k-1} (o_k the actual
    overlap), drawn from `generator`. Baselines: a fixed hard cut in the middle of the overlap.
    """
    cuts = [0]
    for k in range(1, len(starts)):
        o = starts[k - 1] + chunk - starts[k]
        if mode == "blend":
            f_thr = int(torch.randint(0, o, (1,), generator=generator)) if o > 0 else 0
        else:
            f_thr = o // 2
        cuts.append(starts[k] + f_thr)
    return cuts


def stitch(chunks: torch.Tensor, starts: Sequence[int], cuts: Sequence[int], latent_frames: int) -> torch.Tensor:
    """Compose per-chunk tensors (n, C, chunk, h, w) into one video tensor (1, C, L, h, w).

    Latent frame j comes from the last chunk k with cut_k <= j (that chunk covers j: its successor
    starts taking over at cut_{k+1} <= end of chunk k).
    """
    owner = torch.zeros(latent_frames, dtype=torch.long)
    for k, c in enumerate(cuts):
        owner[c:] = k
    starts_t = torch.as_tensor(list(starts), dtype=torch.long)
    local = torch.arange(latent_frames) - starts_t[owner]
    if (local < 0).any() or (local >= chunks.shape[2]).any():  # pragma: no cover - guarded by draw_cuts
        raise RuntimeError("internal error: a latent frame is not covered by its chunk")
    owner, local = owner.to(chunks.device), local.to(chunks.device)
    picked = chunks[owner, :, local]  # (L, C, h, w)
    return picked.permute(1, 0, 2, 3).unsqueeze(0)


# --------------------------------------------------------------------------------------------
# Input video
# --------------------------------------------------------------------------------------------


def load_frames(video) -> np.ndarray:
    """Frames as float32 (F, H, W, 3) in [0, 1] from a path, uint8/float arrays, tensors or PIL lists."""
    if isinstance(video, (str, os.PathLike)):
        if not Path(video).exists():
            raise ValueError(f"video: file not found: {video}")
        from ..video import read_video

        video = read_video(video)
    if isinstance(video, (list, tuple)) and len(video) == 0:
        raise ValueError("video: empty video (no frames)")
    if isinstance(video, (list, tuple)) and hasattr(video[0], "convert"):
        arr = np.stack([np.asarray(im.convert("RGB")) for im in video])
    elif isinstance(video, torch.Tensor):
        from ..video import to_uint8_frames

        t = video.detach().cpu()
        t = t if t.dtype == torch.uint8 else t.float()
        if t.ndim == 5 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 4 and t.shape[0] == 0:
            raise ValueError("video: empty video (no frames)")
        if t.ndim != 4:
            raise ValueError(f"video: expected a tensor (F, 3, H, W) or (F, H, W, 3), got shape {tuple(video.shape)}")
        if t.shape[-1] == 3:
            arr = t.numpy()
        elif t.shape[1] == 3:
            arr = t.permute(0, 2, 3, 1).numpy()
        else:
            arr = to_uint8_frames(video)
        if arr.dtype != np.uint8 and arr.size and arr.min() < 0:  # [-1, 1] tensors
            arr = (arr + 1) / 2
    else:
        arr = np.asarray(video)
    if arr.ndim == 5 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"video: expected frames (F, H, W, 3), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("video: empty video (no frames)")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


class RandomizedBlending(ProgressBarMixin):
    """StreamingT2V's randomized blending around a diffusers video-to-video pipeline.

    Args:
        pipe: a Wan / AnimateDiff / CogVideoX (video-to-video) diffusers pipeline.
        chunk_frames: chunk length in video frames (converted to latent frames, module docstring).
        overlap_frames: overlap of consecutive chunks in video frames; 0 <= overlap < chunk.
        strength: SDEdit strength in (0, 1]: the fraction of the schedule that is run (0.6 in the paper).
        blend: "x0" (blend x0 predictions, one global solver step) or "xt" (blend x_{t-1} of per-chunk steps).
        mode: "blend" (shared noise + randomized blending), "independent" or "shared_noise" (baselines).
        chunk_batch: chunks per model call (None: all at once); with CFG the model batch is up to twice that.

    Calling it returns a :class:`longvideo.methods.outputs.VideoOutput` (``.frames``: numpy float32
    (1, F, H, W, 3) in [0, 1] for ``output_type="np"``). A pipeline of another family is refused
    here (ValueError naming `pipe`).
    """

    def __init__(self, pipe, chunk_frames: int = 24, overlap_frames: int = 8, strength: float = 0.6,
                 blend: str = "x0", mode: str = "blend", chunk_batch: Optional[int] = None):
        if not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive int, got {chunk_frames!r}")
        if not isinstance(overlap_frames, int) or overlap_frames < 0:
            raise ValueError(f"overlap_frames must be a non-negative int, got {overlap_frames!r}")
        if overlap_frames >= chunk_frames:
            raise ValueError(f"overlap_frames ({overlap_frames}) must be smaller than chunk_frames ({chunk_frames})")
        if not (0.0 < float(strength) <= 1.0):
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        if blend not in VARIANTS:
            raise ValueError(f"blend must be one of {VARIANTS}, got {blend!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if chunk_batch is not None and (not isinstance(chunk_batch, int) or chunk_batch < 1):
            raise ValueError(f"chunk_batch must be a positive int or None, got {chunk_batch!r}")
        self.pipe = pipe
        self.family = family_for(pipe, "blending")
        self.chunk_frames, self.overlap_frames = chunk_frames, overlap_frames
        self.strength, self.blend, self.mode, self.chunk_batch = float(strength), blend, mode, chunk_batch
        self.chunk_latent, self.overlap_latent = latent_sizes(chunk_frames, overlap_frames,
                                                              self.family.temporal_compression, self.family.causal)
        if self.overlap_latent >= self.chunk_latent:
            raise ValueError(f"overlap_frames={overlap_frames} is {self.overlap_latent} latent frames, not less than "
                             f"the {self.chunk_latent} latent frames of chunk_frames={chunk_frames} "
                             f"(temporal compression {self.family.temporal_compression}); use a longer chunk")

    # layout ------------------------------------------------------------------------------------
    def layout(self, num_frames: int) -> ChunkLayout:
        """Chunk layout for a video of `num_frames` frames."""
        if num_frames < 1:
            raise ValueError("video: empty video (no frames)")
        t, causal = self.family.temporal_compression, self.family.causal
        if causal:
            latent = (num_frames - 1 + t - 1) // t + 1
            padded = 1 + t * (latent - 1)
        else:
            latent = num_frames // t if num_frames % t == 0 else num_frames // t + 1
            padded = latent * t
        chunk = min(self.chunk_latent, latent)
        self.family.check_window(chunk, "chunk_frames")
        return ChunkLayout(num_frames=num_frames, padded_frames=padded, latent_frames=latent, temporal_factor=t,
                           causal=causal, chunk=chunk, overlap=self.overlap_latent,
                           starts=tuple(chunk_starts(latent, chunk, self.overlap_latent)))

    def _size(self, frames, height, width):
        m = self.family.size_multiple()
        h = height if height is not None else frames.shape[1]
        w = width if width is not None else frames.shape[2]
        if height is not None and height % m or width is not None and width % m:
            raise ValueError(f"height/width must be multiples of {m} for this pipeline, got {height}x{width}")
        h, w = max(m, h // m * m), max(m, w // m * m)  # the input's own size, rounded down to a valid one
        return h, w

    # denoising ---------------------------------------------------------------------------------
    def _predict_chunks(self, run: "_Run", xs: torch.Tensor, t) -> torch.Tensor:
        """Model outputs for chunk inputs xs (n, C, l, h, w), `chunk_batch` chunks per call."""
        n = xs.shape[0]
        bs = self.chunk_batch or n
        outs = []
        for b0 in range(0, n, bs):
            outs.append(self.family.predict(run.schedulers[b0], xs[b0:b0 + bs], t, run.cond, run.guidance_scale))
            if run.bar is not None:
                run.bar.update(1)
        return torch.cat(outs)

    @torch.no_grad()
    def prepare(self, video, prompt: str = "", negative_prompt: Optional[str] = None, height: Optional[int] = None,
                width: Optional[int] = None, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                generator: Optional[torch.Generator] = None, seed: Optional[int] = None, eta: float = 0.0,
                max_sequence_length: Optional[int] = None, guidance_scale_2: Optional[float] = None) -> "_Run":
        """Everything before the first solver step: frames, prompt embeddings, timesteps, the encoded
        video, the noise and the noisy start latents (arguments as in ``__call__``)."""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        self._set_guidance_scale_2(guidance_scale_2)
        frames = load_frames(video)
        lay = self.layout(frames.shape[0])
        h, w = self._size(frames, height, width)
        if lay.padded_frames > lay.num_frames:  # causal VAE: repeat the last frame up to 1 + t*k
            frames = np.concatenate([frames, np.repeat(frames[-1:], lay.padded_frames - lay.num_frames, 0)])
        fam = self.family
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
        cond = fam.encode_prompt(prompt, negative_prompt, guidance_scale > 1.0, fam.execution_device,
                                max_sequence_length or fam.pipeline_max_sequence_length)

        # Timesteps: the pipeline's scheduler class and config, on a private copy; the SDEdit start
        # as in the pipelines' get_timesteps (skip the first (1 - strength) of the schedule).
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=fam.execution_device)
        init = min(int(num_inference_steps * self.strength), num_inference_steps)
        t_start = max(num_inference_steps - init, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        if len(timesteps) == 0:
            raise ValueError(f"strength={self.strength} with num_inference_steps={num_inference_steps} runs no step")
        t0 = timesteps[:1]

        # Encode the whole video once; one noise draw for the whole latent video.
        x0 = fam.encode(fam.preprocess(frames, h, w), generator)
        if x0.shape[2] != lay.latent_frames:
            raise RuntimeError(f"VAE gave {x0.shape[2]} latent frames, expected {lay.latent_frames}")
        noise = fam.draw_noise(x0.shape, generator)
        # The thresholds get their own CPU generator, seeded from the seed of `generator` without
        # consuming its stream (stochastic schedulers draw from it later, as in the pipeline).
        blend_gen = torch.Generator(device="cpu").manual_seed((generator.initial_seed() + 0x5EA4) % 2**63)
        n = lay.num_chunks
        per_chunk = self.mode != "blend" or self.blend == "xt"
        run = _Run(layout=lay, cond=cond, guidance_scale=float(guidance_scale), timesteps=timesteps,
                   scheduler=scheduler, extra=fam.step_kwargs(scheduler, generator, eta), blend_generator=blend_gen,
                   schedulers=[copy.deepcopy(scheduler) for _ in range(n)] if per_chunk else [scheduler] * n,
                   states=[fam.new_state() for _ in range(n)] if per_chunk else [fam.new_state()] * n)
        if self.mode == "blend":
            run.x = fam.add_noise(scheduler, x0, noise, t0)
        else:
            noises = run.chunks_of(noise)
            if self.mode == "independent":
                # Redraw the noise of every overlap for the later chunk: no frame shares noise.
                for k, o in enumerate(lay.boundary_overlaps(), start=1):
                    if o > 0:
                        noises[k:k + 1, :, :o] = fam.draw_noise((1, x0.shape[1], o) + tuple(x0.shape[3:]), generator)
            run.xs = fam.add_noise(scheduler, run.chunks_of(x0), noises, t0)
        return run

    def _set_guidance_scale_2(self, value: Optional[float]) -> None:
        """The low-noise expert's guidance scale on a two-expert Wan 2.2 pipeline (None: the same
        as guidance_scale, as WanPipeline); ValueError naming ``guidance_scale_2`` elsewhere."""
        if getattr(self.family, "two_experts", False):
            self.family.set_guidance_scale_2(value)
        elif value is not None:
            raise ValueError(f"guidance_scale_2 applies to two-expert Wan 2.2 pipelines, not to {self.family.name}")

    @torch.no_grad()
    def step(self, run: "_Run", i: int) -> None:
        """Solver step i (of ``run.timesteps``): every chunk denoised, overlaps blended (module docstring)."""
        fam, t = self.family, run.timesteps[i]
        starts, c, L, n = list(run.layout.starts), run.layout.chunk, run.layout.latent_frames, run.layout.num_chunks
        if self.mode == "blend":
            xs = run.chunks_of(run.x)
            ys = self._predict_chunks(run, xs, t)
            cuts = draw_cuts(starts, c, "blend", run.blend_generator)
            if self.blend == "x0":
                # blend(x0_k) = a(t) x_t + b(t) blend(y_k) for a shared x_t: blend the outputs, step once.
                y = stitch(ys, starts, cuts, L)
                run.x = fam.step(run.scheduler, y, t, run.x, run.states[0], i, run.timesteps, run.extra)
            else:
                x_prev = torch.cat([fam.step(run.schedulers[k], ys[k:k + 1], t, xs[k:k + 1], run.states[k], i,
                                            run.timesteps, run.extra) for k in range(n)])
                run.x = stitch(x_prev, starts, cuts, L)
        else:
            ys = self._predict_chunks(run, run.xs, t)
            run.xs = torch.cat([fam.step(run.schedulers[k], ys[k:k + 1], t, run.xs[k:k + 1], run.states[k], i,
                                        run.timesteps, run.extra) for k in range(n)])

    @torch.no_grad()
    def finish(self, run: "_Run", output_type: str = "np"):
        """Stitch (baselines), decode, cut the padding frames off. The decode is streamed
        (longvideo.decode: chunk by chunk, memory flat in the length) and equals the VAE's whole
        decode bit for bit; :meth:`iter_decoded` hands the chunks out one by one instead."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        x = self.final_latents(run)
        if output_type == "latent":
            return x
        from ..decode import decode_whole

        out = decode_whole(self.pipe, self._pipeline_latents(x), run.layout.num_frames, self._decode_chunk_size(),
                           output_type="pt" if output_type == "pt" else "np")
        if output_type == "pt":
            return out
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in out]
        return out.astype(np.float32)

    def final_latents(self, run: "_Run") -> torch.Tensor:
        """The refined latent video (1, C, L, h, w): the blended trajectory, or the baselines'
        chunks stitched at the middle of each overlap."""
        lay = run.layout
        return run.x if self.mode == "blend" else stitch(run.xs, lay.starts, draw_cuts(lay.starts, lay.chunk,
                                                                                       self.mode, None),
                                                         lay.latent_frames)

    def iter_decoded(self, latents: torch.Tensor, num_frames: Optional[int] = None):
        """Decode refined `latents` (1, C, L, h, w) chunk by chunk: float32 numpy chunks (n, H, W, 3)
        in [0, 1] whose concatenation is ``finish(run, "np")`` (stop after `num_frames`: the input's
        length, without the causal VAE's padding frames). Each chunk can be written before the
        next is decoded (longvideo.decode.decode_to)."""
        from ..decode import iter_frames

        for frames in iter_frames(self.pipe, self._pipeline_latents(latents), num_frames,
                                  self._decode_chunk_size()):
            yield frames.astype(np.float32)

    def _pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        # the blending loop keeps (1, C, L, h, w); a CogVideoX pipeline's latents are (1, L, C, h, w)
        return x.permute(0, 2, 1, 3, 4) if self.family.name == "cogvideox" else x

    def _decode_chunk_size(self) -> int:
        return int(getattr(self.family, "decode_chunk_size", 16))

    def check_inputs(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, generator,
                     seed, eta, output_type, callback_on_step_end=None,
                     callback_on_step_end_tensor_inputs=("latents",)) -> None:
        """ValueError naming the first bad argument of ``__call__`` (before any work)."""
        check_prompt(prompt, allow_empty=True)
        if negative_prompt is not None:
            check_prompt(negative_prompt, "negative_prompt", allow_empty=True)
        m = self.family.size_multiple()
        for name, value in (("height", height), ("width", width)):
            if value is not None and check_positive_int(value, name) % m:
                raise ValueError(f"height/width must be multiples of {m} for this pipeline, got {name}={value}")
        check_positive_int(num_inference_steps, "num_inference_steps")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
        if generator is not None:
            resolve_generator(generator, None)
        elif seed is not None:
            resolve_generator(None, seed)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        check_output_type(output_type)
        check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs,
                       ("latents",) if self.mode == "blend" else ("latents", "chunk_latents"))

    @torch.no_grad()
    def __call__(self, video, prompt: str = "", negative_prompt: Optional[str] = None, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 generator=None, seed: Optional[int] = None, eta: float = 0.0,
                 max_sequence_length: Optional[int] = None, output_type: str = "np", progress: Optional[bool] = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 guidance_scale_2: Optional[float] = None) -> VideoOutput:
        """Refine `video` (path, frames (F, H, W, 3) uint8/float, tensor or PIL list).

        height/width: output size (the video is resized first: the "upscale" of the enhancer);
        default: the input's size rounded down to what the model accepts. Randomness: `generator`
        (a torch.Generator or a list of one; else `seed`, else seed 0) draws the VAE posterior
        samples (AnimateDiff, CogVideoX) and the noise, exactly like the pipeline; the blend
        thresholds come from a CPU generator seeded from its seed, so a seed reproduces the run on
        any device. callback_on_step_end: ``callback(method, i, t, callback_kwargs) -> dict`` after
        each solver step i; callback_kwargs holds "latents" (the whole latent video (1, C, L, h, w)
        in mode "blend"; in the baselines the chunks' stitched latents, read-only) and, for the
        baselines, "chunk_latents" (n, C, chunk, h, w); returned tensors replace them; setting
        ``method._interrupt = True`` skips the remaining steps (the video is decoded from the
        latents reached). `progress`: None follows ``set_progress_bar_config`` (by default the
        pipeline's setting), True/False force it. `guidance_scale_2`: on a two-expert Wan 2.2
        pipeline, the low-noise expert's guidance scale (None: `guidance_scale`, as WanPipeline);
        each solver step goes to the expert of its timestep (``families.wan22``).

        Returns a :class:`longvideo.methods.outputs.VideoOutput`: ``.frames`` (1, F, H, W, 3)
        float32 in [0, 1] ("np"); (1, F, 3, H, W) tensor ("pt"); [[PIL images]] ("pil");
        (1, C, L, h, w) latents ("latent").
        """
        self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, generator,
                          seed, eta, output_type, callback_on_step_end, callback_on_step_end_tensor_inputs)
        if generator is not None:
            generator = resolve_generator(generator, None)[0]
        run = self.prepare(video, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           generator=generator, seed=seed, eta=eta, max_sequence_length=max_sequence_length,
                           guidance_scale_2=guidance_scale_2)
        n = run.layout.num_chunks
        calls = math.ceil(n / (self.chunk_batch or n))
        self._interrupt = False
        with self._bar(len(run.timesteps) * calls, progress) as bar:
            run.bar = bar
            for i in range(len(run.timesteps)):
                if self._interrupt:
                    break
                self.step(run, i)
                if callback_on_step_end is not None:
                    self._step_end(callback_on_step_end, callback_on_step_end_tensor_inputs, run, i)
            run.bar = None
        out = self.finish(run, output_type)
        if output_type == "pil":
            return VideoOutput(frames=[out])
        return VideoOutput(frames=out if output_type == "latent" else out[None])

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    def _bar(self, total, progress):
        if progress is None:
            return self.progress_bar(total=total, desc="enhance")
        from tqdm.auto import tqdm

        return tqdm(total=total, disable=not progress, desc="enhance")

    def _step_end(self, callback, names, run: "_Run", i: int) -> None:
        if self.mode == "blend":
            tensors = {"latents": run.x}
        else:
            lay = run.layout
            tensors = {"chunk_latents": run.xs,
                       "latents": stitch(run.xs, lay.starts, draw_cuts(lay.starts, lay.chunk, self.mode, None),
                                         lay.latent_frames)}
        out = callback(self, i, run.timesteps[i], {k: tensors[k] for k in names}) or {}
        target = {"latents": "x"} if self.mode == "blend" else {"chunk_latents": "xs"}
        for key, value in out.items():
            if key not in target:
                raise ValueError(f"callback_on_step_end returned {key!r}; it may replace only {list(target)}")
            old = getattr(run, target[key])
            if not isinstance(value, torch.Tensor) or value.shape != old.shape:
                raise ValueError(f"callback_on_step_end returned {key!r} of shape "
                                 f"{getattr(value, 'shape', type(value).__name__)}, expected {tuple(old.shape)}")
            setattr(run, target[key], value.to(old))


@dataclass
class _Run:
    """State of one enhancement between ``prepare`` and ``finish``."""

    layout: ChunkLayout
    cond: tuple
    guidance_scale: float
    timesteps: torch.Tensor
    scheduler: object          # the global scheduler ("blend" + "x0")
    extra: dict                # extra scheduler.step kwargs (eta, generator) where the pipeline passes them
    blend_generator: torch.Generator
    schedulers: list           # per chunk (copies), or the global one n times
    states: list               # per-trajectory solver state the scheduler object does not keep
    x: Optional[torch.Tensor] = None    # (1, C, L, h, w): mode "blend"
    xs: Optional[torch.Tensor] = None   # (n, C, chunk, h, w): baselines, one trajectory per chunk
    bar: object = None

    def chunks_of(self, x: torch.Tensor) -> torch.Tensor:
        c = self.layout.chunk
        return torch.cat([x[:, :, s:s + c] for s in self.layout.starts])
