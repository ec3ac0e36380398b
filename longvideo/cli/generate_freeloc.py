"""``longvideo generate --method freeloc | direct``: one video through a Wan pipeline, with FreeLOC
(``--freeloc-*``) or without it; prints the time per step."""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import _fit, _image
from ._common import (VIDEO_SUFFIXES, UsageError, backend_setting, check_size_multiple, check_sizes_before_loading,
                      checkpoint_family, is_cuda, load_pipeline, nonnegative_int, output_file,
                      pipeline_size_multiple, positive_int, print_settings, torch_dtype, user_errors)


SEMANTICS = ("official", "paper")  # longvideo.methods.freeloc.SEMANTICS (the parser imports no method module)


def add_arguments(p) -> None:
    g = p.add_argument_group("freeloc (--method freeloc | direct)")
    g.add_argument("--freeloc-layers", default=None,
                   help="layer configuration JSON (from `longvideo probe`) or 'wan2.1-1.3b'; default: the published "
                        "list for Wan2.1-1.3B, else VRPR on every layer")
    g.add_argument("--freeloc-layers-2", default=None,
                   help="Wan 2.2 A14B: the low-noise expert's (transformer_2) layer configuration JSON (from "
                        "`longvideo probe --probe-expert transformer_2`); default: the same as --freeloc-layers")
    g.add_argument("--freeloc-semantics", choices=SEMANTICS, default="official",
                   help="'official': the attention layouts of FreeLOC's released code (token-granular bands and "
                        "tiers, the published results); 'paper': the paper's frame-granular rules "
                        "(docs/fidelity.md)")
    g.add_argument("--freeloc-trained-frames", type=positive_int, default=None,
                   help="the model's trained length in latent frames (default 21; tiny model 3)")
    g.add_argument("--freeloc-vrpr", default=None, metavar="W1,W2,G1,G2,CLIP",
                   help="explicit VRPR parameters (default: derived from the length); '-' keeps a derived value")
    g.add_argument("--freeloc-tiers", default=None, metavar="LOCAL,STRIPE",
                   help="TSA tiers in latent frames (default 8,24 scaled to the trained length)")
    g.add_argument("--freeloc-stripe-width", type=positive_int, default=None,
                   help="stripe width in tokens (default 1/8 frame)")
    g.add_argument("--freeloc-sink-frames", type=nonnegative_int, default=None,
                   help="attention-sink frames (default 1)")
    g.add_argument("--freeloc-negative-prompt", default=None, help="negative prompt (default: none)")


def parse_csv(text, names, option) -> dict:
    """'1,-,3' -> {names[0]: 1, names[2]: 3} ('' or '-' keeps a derived value)."""
    if text is None:
        return {}
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != len(names):
        raise UsageError(f"{option} expects {len(names)} comma-separated values {','.join(names)}, got {text!r}")
    out = {}
    for name, p in zip(names, parts):
        if p in ("", "-"):
            continue
        try:
            out[name] = int(p)
        except ValueError:
            raise UsageError(f"{option}: {name} must be an integer, got {p!r}") from None
    return out


def overrides(args) -> dict:
    """FreeLOC's parameter overrides from the --freeloc-* options."""
    ov = parse_csv(args.freeloc_vrpr, ("w1", "w2", "g1", "g2", "clip"), "--freeloc-vrpr")
    ov.update(parse_csv(args.freeloc_tiers, ("local_frames", "stripe_frames"), "--freeloc-tiers"))
    if args.freeloc_stripe_width is not None:
        ov["stripe_width"] = args.freeloc_stripe_width
    if args.freeloc_sink_frames is not None:
        ov["sink_frames"] = args.freeloc_sink_frames
    return ov


def check_frame_count(num_frames: int, temporal: int) -> None:
    """Wan's causal VAE makes temporal*k + 1 frames; the pipeline would round another count with
    only a logged warning (the settings line would then show a number that is not made)."""
    if (num_frames - 1) % temporal:
        lo = num_frames - (num_frames - 1) % temporal
        raise UsageError(f"--num-frames {num_frames}: this model makes {temporal}k + 1 frames "
                         f"(e.g. {max(lo, 1)} or {lo + temporal})")


WAN_ROPE_MAX_SEQ_LEN = 1024  # diffusers' WanTransformer3DModel default (rope_max_seq_len), the tiny models'


def check_frames_before_loading(args) -> None:
    """--num-frames within the positions of the transformer's RoPE table (``rope_max_seq_len`` of
    --model's transformer/config.json, else diffusers' default 1024, over patch_size[0] latent
    frames per position): beyond it diffusers fails inside the transformer with a shape error."""
    if not args.num_frames:
        return
    limit, patch = WAN_ROPE_MAX_SEQ_LEN, 1
    if args.model is not None:
        try:
            config = json.loads((Path(args.model) / "transformer" / "config.json").read_text())
            limit = int(config.get("rope_max_seq_len") or limit)
            patch = int((config.get("patch_size") or [1])[0])
        except (OSError, ValueError, TypeError, AttributeError, IndexError):
            pass  # the loader says what is wrong with the folder
    latent = (args.num_frames - 1) // 4 + 1  # Wan's VAEs: 4 frames per latent frame after the first
    if -(-latent // patch) > limit:
        most = 4 * (limit * patch - 1) + 1
        raise UsageError(f"--num-frames {args.num_frames}: {latent} latent frames, more than the {limit * patch} the "
                         f"transformer's RoPE table covers (rope_max_seq_len = {limit}); at most {most} frames")


def generation_defaults(args, tiny: bool) -> dict:
    return dict(
        num_frames=args.num_frames or (33 if tiny else 161),
        height=args.height or (32 if tiny else 480),
        width=args.width or (32 if tiny else 832),
        steps=args.steps or (4 if tiny else 50),
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else 5.0,
    )


def load_wan(args, command: str, allow_image: bool = False):
    """The Wan pipeline of --model (tiny without), in --dtype (default bfloat16 on CUDA, float32 on
    CPU); used by generate --method freeloc|direct and by probe. A Wan 2.2 TI2V checkpoint
    (expand_timesteps) loads as such (its trained length, 31 latent frames). With `allow_image`
    (generate) also Wan 2.1 / 2.2 A14B image-to-video checkpoints, which need --image, and TI2V
    takes --image as its image mode (WanImageToVideoPipeline); without --model, --image picks the
    tiny Wan 2.1 I2V model."""
    image = getattr(args, "image", None) if allow_image else None
    family = "wan_i2v" if image is not None else "wan"
    if args.model is not None:
        accepted = ("wan", "wan22_ti2v") + (_image.I2V_FAMILIES if allow_image else ())
        family = checkpoint_family(args.model, accepted, command)
    if allow_image:
        _image.check_family(args, family, command)
    check_sizes_before_loading(args, family)
    check_frames_before_loading(args)
    dtype = torch_dtype(args.dtype) or torch_dtype("bfloat16" if is_cuda(args.device) else "float32")
    kind = "i2v" if image is not None and family == "wan22_ti2v" else "t2v"  # TI2V's image mode
    pipe = load_pipeline(args, family, kind, dtype=dtype, seed=args.seed)
    check_size_multiple(args.height, args.width, *pipeline_size_multiple(pipe))
    return pipe


class StepTimer:
    """callback_on_step_end that records the wall time of every denoising step (the first step is
    timed from the first transformer call, so text encoding is not counted)."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.times: list = []
        self._last = None

    def first_call(self, module, args):
        if self._last is None:
            self._last = time.perf_counter()

    def __call__(self, pipe, step, timestep, callback_kwargs):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        return callback_kwargs


def run(args) -> int:
    """One video, written as mp4; prints the FreeLOC parameters and the time per step."""
    import torch

    from ..decode import decode_to
    from ..methods.freeloc import FreeLOC
    from ..parallel import enable_context_parallel, init_from_environment
    from ..video import VideoWriter

    ov = overrides(args)
    path = output_file(args.out, f"{args.method}.mp4", suffixes=VIDEO_SUFFIXES)
    d = generation_defaults(args, tiny=args.model is None)
    rank, world, args.device = init_from_environment(args.device)  # torchrun: context parallel over `world` ranks
    with _fit.host_loading(args, cuda_dtype="bfloat16"):
        pipe = load_wan(args, f"`longvideo generate --method {args.method}`", allow_image=True)
    _fit.lean_wan_forward(pipe)
    image_input = {}
    if getattr(args, "image", None) is not None:  # the first frame; the size keeps its aspect ratio
        image = _image.load(args.image)
        h, w = _image.video_size(image, d["height"] * d["width"], pipeline_size_multiple(pipe)[0])
        d["height"], d["width"] = args.height or h, args.width or w
        image_input = {"image": image}
    check_frame_count(d["num_frames"], int(getattr(pipe, "vae_scale_factor_temporal", None) or 4))
    _fit.choose(args, pipe, args.method, height=d["height"], width=d["width"], num_frames=d["num_frames"],
                num_inference_steps=d["steps"], trained_frames=args.freeloc_trained_frames or
                getattr(pipe, "longvideo_trained_latent_frames", None), freeloc_semantics=args.freeloc_semantics,
                context_parallel=world,  # under torchrun: one rank's share of the split sequence
                image=True if image_input else None)  # the image path planned (TI2V: its image mode)
    pipe.set_progress_bar_config(disable=rank != 0)
    if rank == 0:
        print_settings(method=args.method, size=f"{d['width']}x{d['height']}", frames=d["num_frames"],
                       steps=d["steps"], dtype=pipe.transformer.dtype, device=args.device, backend=backend_setting())
    method = parallel = None
    try:
        with user_errors():
            if world > 1:
                parallel = enable_context_parallel(pipe)  # before FreeLOC, whose dense layers use its processor
                if rank == 0:
                    print(f"context parallel: the sequence split over {world} ranks (Ulysses)")
            if args.method == "freeloc":
                method = FreeLOC(pipe, layer_config=args.freeloc_layers, trained_frames=args.freeloc_trained_frames,
                                 semantics=args.freeloc_semantics, layer_config_2=args.freeloc_layers_2, **ov)
                if rank == 0:
                    print(method.describe(d["num_frames"]))
            timer = StepTimer(args.device)
            hook = pipe.transformer.register_forward_pre_hook(timer.first_call)
            generator = torch.Generator(device="cpu").manual_seed(args.seed)
            t0 = time.perf_counter()
            try:
                result = pipe(**image_input, prompt=args.prompt, negative_prompt=args.freeloc_negative_prompt,
                              num_frames=d["num_frames"], height=d["height"], width=d["width"],
                              num_inference_steps=d["steps"], guidance_scale=d["guidance_scale"], generator=generator,
                              output_type="latent", callback_on_step_end=timer)
            finally:
                hook.remove()
            total = time.perf_counter() - t0
    finally:
        if method is not None:
            method.remove()
        if parallel is not None:
            parallel.remove()
    if rank != 0:  # every rank holds the whole latent video; rank 0 decodes and writes it
        return 0
    # The latent video decoded a few frames at a time, each chunk written before the next is
    # decoded: the same frames as the pipeline's whole decode, with memory flat in the length
    # (longvideo.decode); an interruption keeps the frames written so far (docs/outputs.md).
    t1 = time.perf_counter()
    with VideoWriter(path, fps=args.fps) as writer:
        count = decode_to(pipe, result.frames, writer)
    decode_s = time.perf_counter() - t1
    steps = timer.times
    if steps:
        per = ", ".join(f"{t:.3f}" for t in steps)
        print(f"time per step (s): {per}")
        print(f"mean {sum(steps) / len(steps):.3f} s/step over {len(steps)} steps; total {total:.2f} s "
              f"(incl. text encoding); VAE decoding and writing {decode_s:.2f} s")
    print(f"wrote {path} ({count} frames, {d['width']}x{d['height']})")
    return 0
