"""Benchmark suite ``blending`` (issue 8): StreamingT2V randomized blending on a Wan-shaped model.

Full size (GPU): a 240-frame 480p video (832x480; 241 frames through Wan's causal VAE = 61 latent
frames of 60x104) enhanced with chunks of 24 frames / overlap 8 (6 / 2 latent frames: 15 chunks)
by a random-weight Wan2.1-T2V-1.3B-shaped transformer (30 layers, 12 heads x 128, FFN 8960, bf16)
with the real-size Wan VAE (float32, diffusers' default AutoencoderKLWan config) and the Wan2.1
scheduler (UniPC, flow prediction, shift 3). FEWER STEPS than a real run: 10 inference steps at
strength 0.6, i.e. 6 denoising steps (a real enhancement uses 50 x 0.6 = 30: the step case below
scales linearly). Classifier-free guidance on (two model calls per chunk and step). The text
encoder is a one-layer UMT5 of width 4096 (the real 5.7B UMT5-XXL runs once per video and is not
what this measures).

Cases:
  step / blend_x0, blend_xt, independent   one solver step over all chunks (all model calls,
                                           blending, scheduler), timed by the harness
  vae_decode                               decoding the whole latent video once
  The setup runs ONE complete enhancement (encode, 6 steps, decode) and records in `extra`:
  full_run_s, s_per_frame, peak_mem_GiB (torch.cuda.max_memory_allocated over that run),
  and the sizes. The harness' own repeats make a complete run per case too slow at this size.

Profile ``budget`` (one GPU slot): one short video, 80 frames (21 latent frames: 4 chunks), 4
inference steps (2 denoising steps at strength 0.6), the same model, VAE and chunking.

quick=True: the built-in tiny Wan pipeline (same scheduler class), 17 frames at 32x32.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch

from longvideo.benchmarking import Case

SUITE = "blending"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unipc():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=3.0)


def _wan_1_3b_random(device):
    """WanVideoToVideoPipeline with random weights: Wan2.1-T2V-1.3B transformer, real-size VAE."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel, WanVideoToVideoPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from longvideo.models.tokenizers import char_tokenizer

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                            in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                                            ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                                            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
        vae = AutoencoderKLWan()  # diffusers' default config is Wan2.1's VAE
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=100, d_model=4096, d_kv=64, d_ff=256, num_layers=1,
                                                   num_heads=2))
    transformer = transformer.to(torch.bfloat16).eval()
    text_encoder = text_encoder.to(torch.bfloat16).eval()
    pipe = WanVideoToVideoPipeline(tokenizer=char_tokenizer(512), text_encoder=text_encoder, transformer=transformer,
                                   vae=vae.eval(), scheduler=_unipc())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _video(frames, height, width):
    """A smooth moving pattern, uint8 (F, H, W, 3)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for f in range(frames):
        s = 2.0 * f
        out[f, ..., 0] = 127 + 100 * np.sin((xx - s) / 37.0)
        out[f, ..., 1] = 127 + 100 * np.cos((yy + 0.5 * s) / 29.0)
        out[f, ..., 2] = 127 + 80 * np.sin((xx + yy - s) / 53.0)
    return out


def _fresh(run, pristine):
    """A copy of a prepared run with untouched solver state (so step 0 can be timed repeatedly)."""
    if run.schedulers and run.schedulers[0] is run.scheduler:  # one global scheduler (x0 blend)
        sched = copy.deepcopy(pristine)
        return dataclasses.replace(run, scheduler=sched, schedulers=[sched] * len(run.schedulers),
                                   states=[{}] * len(run.states))
    return dataclasses.replace(run, scheduler=copy.deepcopy(pristine),
                               schedulers=[copy.deepcopy(pristine) for _ in run.schedulers],
                               states=[{} for _ in run.states])


def cases(device: torch.device, quick: bool, profile: str = "full") -> list[Case]:
    from longvideo.methods.blending import RandomizedBlending

    if quick:
        from longvideo.models import wan

        pipe = wan.tiny_pipeline(kind="v2v").to(device)
        pipe.scheduler = _unipc()
        frames, height, width, chunk, overlap, steps = 17, 32, 32, 9, 4, 4
    else:
        pipe = _wan_1_3b_random(device)
        frames, height, width, chunk, overlap, steps = 240, 480, 832, 24, 8, 10
        if profile == "budget":
            frames, steps = 80, 4
    strength, guidance = 0.6, 5.0
    video = _video(frames, height, width)
    kw = dict(prompt="a red panda walking through a bamboo forest", num_inference_steps=steps,
              guidance_scale=guidance, seed=0)

    # One complete enhancement: the headline numbers (seconds per frame, peak memory).
    method = RandomizedBlending(pipe, chunk_frames=chunk, overlap_frames=overlap, strength=strength)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    run = method.prepare(video, **kw)
    _sync(device)
    t_prepare = time.perf_counter() - t0
    start_latents = run.x.clone()
    pristine = copy.deepcopy(run.scheduler)  # before any step: no solver history
    for i in range(len(run.timesteps)):
        method.step(run, i)
    _sync(device)
    t_steps = time.perf_counter() - t0 - t_prepare
    latents = run.x.clone()
    method.finish(run, output_type="np")
    _sync(device)
    full = time.perf_counter() - t0
    lay = run.layout
    extra = {
        "frames": frames, "height": height, "width": width, "latent_frames": lay.latent_frames,
        "chunks": lay.num_chunks, "chunk_latent": lay.chunk, "overlap_latent": lay.overlap,
        "inference_steps": steps, "denoising_steps_run": len(run.timesteps), "strength": strength,
        "cfg": guidance > 1, "full_run_s": full, "s_per_frame": full / frames, "prepare_s": t_prepare,
        "denoise_s": t_steps, "decode_s": full - t_prepare - t_steps,
        "peak_mem_GiB": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        "model": "tiny wan" if quick else "Wan2.1-1.3B-shaped, random weights, bf16; VAE fp32",
    }
    params = {"frames": frames, "size": f"{width}x{height}", "chunk": chunk, "overlap": overlap}

    flops = _step_flops(pipe, lay, tuple(latents.shape[-2:]), guidance > 1)
    run.x = start_latents
    out = []
    # The three ways of stepping, from the same prepared state (no second VAE encode): the x0 blend
    # (one global scheduler), the x_{t-1} blend (per-chunk schedulers) and independent chunks
    # (per-chunk trajectories; the start latents' values do not matter for the timing).
    variants = {
        "blend_x0": (method, run),
        "blend_xt": (RandomizedBlending(pipe, chunk_frames=chunk, overlap_frames=overlap, strength=strength,
                                        blend="xt"),
                     dataclasses.replace(run, schedulers=[None] * len(run.schedulers))),
        "independent": (RandomizedBlending(pipe, chunk_frames=chunk, overlap_frames=overlap, strength=strength,
                                           mode="independent"),
                        dataclasses.replace(run, schedulers=[None] * len(run.schedulers), xs=run.chunks_of(run.x),
                                            x=None)),
    }
    for impl, (m, prepared) in variants.items():
        def fn(m=m, prepared=prepared):
            m.step(_fresh(prepared, pristine), 0)

        out.append(Case(suite=SUITE, name="step", impl=impl, fn=fn, params=params, flops=flops,
                        extra=extra if impl == "blend_x0" else {"chunks": lay.num_chunks}))

    # Decoding is linear in the frames (causal, frame by frame): time at most 21 latent frames (81
    # video frames, Wan's clip length) and report per video frame.
    part = latents[:, :, :21]
    decoded_frames = lay.video_frame(part.shape[2] - 1) + (lay.temporal_factor if lay.causal else 1)

    def decode():
        # without inference mode the VAE's activations are kept for a backward that never comes:
        # the first GPU run held 134 GiB and ran out of memory here
        with torch.inference_mode():
            method.family.decode_video(part)

    out.append(Case(suite=SUITE, name="vae_decode", impl="wan_vae", fn=decode, params=params,
                    extra={"latent_frames": part.shape[2], "video_frames": decoded_frames}))
    return out


def _step_flops(pipe, lay, latent_hw, cfg: bool) -> float:
    """Transformer flops of one step over all chunks (matmuls only; 2 flops per multiply-add):
    per layer and chunk, self-attention projections 4 d^2 and cross-attention q/o 2 d^2 per token,
    FFN 2 d f per token, cross-attention k/v 2 d^2 per text token, attention 4 S^2 d (self) and
    4 S T d (cross)."""
    cfg_t = pipe.transformer.config
    d = cfg_t.num_attention_heads * cfg_t.attention_head_dim
    p = cfg_t.patch_size
    lat_h, lat_w = latent_hw
    s = lay.chunk // p[0] * (lat_h // p[1]) * (lat_w // p[2])
    t = 512  # text tokens (Wan pads the prompt to 512)
    per_layer = 2 * s * (6 * d * d + 2 * d * cfg_t.ffn_dim) + 2 * t * 2 * d * d + 4 * s * s * d + 4 * s * t * d
    return float(per_layer * cfg_t.num_layers * lay.num_chunks * (2 if cfg else 1))

