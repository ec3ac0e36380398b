"""``longvideo enhance IN.mp4 --out OUT.mp4``: StreamingT2V randomized blending over a video; writes
the video and its seam metric (OUT.seams.json)."""
from __future__ import annotations

import json

from . import _fit
from ._common import (VIDEO_SUFFIXES, UsageError, add_common_generation, apply_backend, checkpoint_family,
                      first_line, input_file, load_pipeline, nonnegative_int, output_file, positive_int, real,
                      resolve_device, torch_dtype, user_errors, backend_setting,
                      check_sizes_before_loading, print_settings)

HELP = "StreamingT2V randomized-blending enhancement"
FAMILIES = ("wan", "animatediff", "cogvideox", "wan22")
VARIANTS = ("x0", "xt")                            # longvideo.methods.blending.VARIANTS
MODES = ("blend", "independent", "shared_noise")   # longvideo.methods.blending.MODES


def add_arguments(p) -> None:
    add_common_generation(p)
    for action in p._actions:  # the written video keeps the input's frame rate unless told otherwise
        if action.dest == "fps":
            action.default = None
            action.help = "frames per second of the video written (default: the input video's, else 8)"
    p.add_argument("input", help="input video file (mp4, gif, ...)")
    p.add_argument("--blend-family", default=None, choices=FAMILIES,
                   help="pipeline family (default: from the checkpoint's model_index.json, else wan)")
    p.add_argument("--blend-chunk-frames", type=positive_int, default=None,
                   help="chunk length in video frames (default 24; tiny model: 9)")
    p.add_argument("--blend-overlap-frames", type=nonnegative_int, default=None,
                   help="overlap in video frames (default 8; tiny model: 4)")
    p.add_argument("--blend-strength", type=real(0, 1, low_open=True), default=0.6, help="SDEdit strength (paper: 0.6)")
    p.add_argument("--blend-variant", default="x0", choices=VARIANTS,
                   help="x0: blend x0 predictions; xt: blend x_{t-1}")
    p.add_argument("--blend-mode", default="blend", choices=MODES,
                   help="blend (StreamingT2V) or a baseline: independent chunks, shared noise without blending")
    p.add_argument("--blend-chunk-batch", type=positive_int, default=None,
                   help="chunks per model call (default: all)")
    p.add_argument("--guidance-scale-2", type=real(0), default=None,
                   help="Wan 2.2 A14B (wan22): guidance scale of the low-noise expert (default: --guidance-scale)")
    _fit.add_argument(p)
    p.add_argument("--blend-compare", action="store_true",
                   help="also run the two baselines and report their seam metrics (videos OUT.<mode>.mp4)")


def _load_pipe(args, family):
    if family == "cogvideox":
        if args.model is None:
            raise UsageError("--model: CogVideoX has no built-in tiny model; pass a local checkpoint")
        import torch
        from diffusers import CogVideoXVideoToVideoPipeline

        dt = torch_dtype(args.dtype) if args.dtype in ("float16", "bfloat16") else torch.float32
        with user_errors(ValueError, RuntimeError, OSError):
            return CogVideoXVideoToVideoPipeline.from_pretrained(args.model, torch_dtype=dt,
                                                                 local_files_only=True).to(args.device)
    return load_pipeline(args, family, "v2v", dtype=torch_dtype(args.dtype))


def run(args) -> int:
    """Refine a video, write it and its seam metric JSON."""
    import numpy as np

    from ..methods.blending import RandomizedBlending, load_frames
    from ..methods.seam_metric import seam_metric
    from ..video import VideoWriter, video_fps

    args.device = resolve_device(args.device)
    apply_backend(args.backend, args.device)
    src = input_file(args.input, "input video")
    tiny = args.model is None
    chunk = args.blend_chunk_frames or (9 if tiny else 24)
    overlap = args.blend_overlap_frames if args.blend_overlap_frames is not None else (4 if tiny else 8)
    steps = args.steps or (10 if tiny else 50)
    if int(steps * args.blend_strength) < 1:  # SDEdit denoises the last int(steps * strength) steps
        raise UsageError(f"--steps {steps} with --blend-strength {args.blend_strength:g} runs no denoising step "
                         f"(it runs int(steps x strength) = {int(steps * args.blend_strength)}): raise either")
    default_name = src.stem + "_enhanced.mp4"
    out = output_file(args.out or src.with_name(default_name), default_name, suffixes=VIDEO_SUFFIXES)
    family = args.blend_family or (checkpoint_family(args.model, FAMILIES, "`longvideo enhance`") if args.model
                                   else "wan")
    try:
        frames = load_frames(str(src))
    except Exception as exc:  # noqa: BLE001 - a file that does not decode is the user's input
        raise UsageError(f"input video {src}: cannot be read as a video ({type(exc).__name__}: "
                         f"{first_line(exc)})") from exc
    if args.num_frames:
        frames = frames[:args.num_frames]
    fps = args.fps or video_fps(src) or 8.0
    check_sizes_before_loading(args, family)
    with _fit.host_loading(args):
        pipe = _load_pipe(args, family)
    _fit.lean_wan_forward(pipe)
    if args.fit:  # the planner's offload / VAE / chunks-per-call choice for this video
        st = _fit.choose(args, pipe, "enhance", height=args.height or frames.shape[1], width=args.width or frames.shape[2],
                         num_frames=len(frames), chunk_frames=chunk, overlap_frames=overlap,
                         chunk_batch=args.blend_chunk_batch, num_inference_steps=steps)
        args.blend_chunk_batch = st.chunk_batch
    pipe.set_progress_bar_config(disable=False)
    guidance = args.guidance_scale if args.guidance_scale is not None else (5.0 if family != "animatediff" else 7.5)
    modes = [args.blend_mode] + ([m for m in MODES if m != args.blend_mode] if args.blend_compare else [])
    report = {"input": str(args.input), "output": str(out), "family": family, "model": args.model or "tiny",
              "chunk_frames": chunk, "overlap_frames": overlap, "strength": args.blend_strength,
              "variant": args.blend_variant, "steps": steps, "guidance_scale": guidance,
              "guidance_scale_2": args.guidance_scale_2, "seed": args.seed,
              "fps": fps}
    results = {}
    for mode in modes:
        with user_errors():
            method = RandomizedBlending(pipe, chunk_frames=chunk, overlap_frames=overlap,
                                        strength=args.blend_strength, blend=args.blend_variant, mode=mode,
                                        chunk_batch=args.blend_chunk_batch)
            lay = method.layout(len(frames))
            if mode == modes[0]:
                h, w = method._size(frames, args.height, args.width)
                denoiser = getattr(pipe, "transformer", None) or pipe.unet
                print_settings(size=f"{w}x{h}", frames=len(frames), steps=steps, window=f"{chunk}/{overlap}",
                               dtype=denoiser.dtype, device=args.device, backend=backend_setting())
            latents = method(frames, prompt=args.prompt, height=args.height, width=args.width,
                             num_inference_steps=steps, guidance_scale=guidance, seed=args.seed, progress=True,
                             output_type="latent", guidance_scale_2=args.guidance_scale_2).frames
        path = out if mode == args.blend_mode else out.with_suffix(f".{mode}.mp4")
        # decoded chunk by chunk, each written before the next (longvideo.decode); the frames are
        # also kept for the seam metric
        parts = []
        with VideoWriter(path, fps=fps) as writer:
            for decoded in method.iter_decoded(latents, lay.num_frames):
                writer.write(decoded)
                parts.append(decoded)
        result = np.concatenate(parts)
        results[mode] = seam_metric(result, lay.seam_transitions()) if len(result) > 1 else None
        print(f"[{mode}] wrote {path}")
    report["layout"] = lay.to_dict()
    if len(frames) > 1:  # the same seam positions, measured on the input
        report["input_seam_metric"] = seam_metric(frames, lay.seam_transitions())
    report["seam_metric"] = results[args.blend_mode]
    if args.blend_compare:
        report["seam_metric_by_mode"] = results
    metric_path = out.with_suffix(".seams.json")
    metric_path.write_text(json.dumps(report, indent=2))
    print(json.dumps({m: r and {k: r[k] for k in ("boundary", "interior", "ratio", "peak_ratio", "flow_ratio")}
                      for m, r in results.items()}, indent=2))
    print(f"seam metric: {metric_path}")
    return 0
