"""``longvideo plan``: the memory planner on the command line: predicted peak GPU memory by phase
and component, and with ``--fit SIZE`` the fastest settings that fit::

    longvideo plan --method fifo --model wan2.1-t2v-1.3b --height 480 --width 832 --num-frames 241
    longvideo plan --method freeloc --model /ckpt/Wan2.1-T2V-14B-Diffusers --num-frames 161 --fit 24GB
    longvideo plan --method story --model sdxl --dtype float16 --fit 24GiB --json
    longvideo plan --method freeloc --model wan2.1-t2v-14b --num-frames 161 --context-parallel 4   # per rank
    longvideo plan --method direct --model wan2.1-i2v-14b-480p --num-frames 81 --image first.png --fit 24GB

``--model`` is a known config name (``--list-models``) or a local diffusers checkpoint folder
(config files only). Exit status 1 when the settings do not fit.
"""
from __future__ import annotations

import json

from . import _image
from ._common import (UsageError, add_common_generation, check_size_multiple, config_size_multiple, memory_size,
                      nonnegative_int, positive_int, real, refuse_inapplicable, user_errors)

HELP = "predicted peak GPU memory by component, settings that fit"
METHODS = ("direct", "freeloc", "fifo", "ouroboros", "story", "enhance")   # longvideo.planner.METHODS
OFFLOAD_MODES = ("none", "text", "model", "group", "sequential")          # longvideo.planner.OFFLOAD_MODES
_DEFAULT_MODEL = {"direct": "wan2.1-t2v-1.3b", "freeloc": "wan2.1-t2v-1.3b", "fifo": "wan2.1-t2v-1.3b",
                  "ouroboros": "wan2.1-t2v-1.3b", "story": "sdxl", "enhance": "wan2.1-t2v-1.3b"}


def add_arguments(parser) -> None:
    add_common_generation(parser)
    g = parser.add_argument_group("plan")
    g.add_argument("--method", default="fifo", choices=METHODS + ("blending",),
                   help="what to plan (blending = enhance)")
    g.add_argument("--fit", type=memory_size, default=None, metavar="SIZE",
                   help="GPU memory to fit, e.g. 24GB (1e9 bytes) or 24GiB: choose the fastest settings that fit")
    g.add_argument("--headroom", type=real(0, 1, high_open=True), default=0.05,
                   help="fraction of --fit kept free for what is not modelled (CUDA context, workspaces, "
                        "fragmentation); default 0.05")
    g.add_argument("--kernels", default="cuda", choices=["cuda", "cpu"],
                   help="whose kernels' allocations to model (default cuda, whatever machine plans)")
    g.add_argument("--offload", default="none", choices=OFFLOAD_MODES, help="starting offload mode")
    g.add_argument("--vae-tiling", action="store_true", help="decode the video in VAE tiles")
    g.add_argument("--vae-slicing", action="store_true", help="decode the video one slice at a time")
    g.add_argument("--window", type=positive_int, default=None, help="fifo/ouroboros: latent frames per window f")
    g.add_argument("--partitions", type=positive_int, default=4, help="fifo/ouroboros: n")
    g.add_argument("--no-tail", action="store_true", help="ouroboros: without coherent tail sampling")
    g.add_argument("--no-sacfa", action="store_true", help="ouroboros: without SACFA")
    g.add_argument("--no-guidance", action="store_true", help="ouroboros: without self-recurrent guidance")
    g.add_argument("--id-length", type=positive_int, default=4, help="story: id images written together")
    g.add_argument("--read-images", type=nonnegative_int, default=2, help="story: images read alone")
    g.add_argument("--characters", type=nonnegative_int, default=1, help="story: characters with an id bank")
    g.add_argument("--bank", default="auto", choices=["auto", "device", "cpu"], help="story: id bank location")
    g.add_argument("--bank-budget", type=memory_size, default=None, metavar="SIZE", help="story: device budget of the auto bank (default 10%% of --fit)")
    g.add_argument("--schedule", default="official_app", help="story: StoryDiffusion schedule")
    g.add_argument("--story-kernel", default="consistent", choices=["consistent", "dense_mask"],
                   help="story: longvideo's consistent_attention, or the official (B*N)^2 dense-mask path")
    g.add_argument("--chunk-frames", type=positive_int, default=24, help="enhance: chunk length in video frames")
    g.add_argument("--overlap-frames", type=nonnegative_int, default=8, help="enhance: overlap in video frames")
    g.add_argument("--chunk-batch", type=positive_int, default=None, help="enhance: chunks per transformer call")
    g.add_argument("--latent-only", action="store_true", help="direct/freeloc/story: no VAE decode")
    g.add_argument("--decode", default="streamed", choices=["streamed", "whole"],
                   help="direct/freeloc/enhance on Wan: how the video is decoded -- streamed (default, what "
                        "`longvideo generate` / `enhance` run: one latent frame per VAE call, each chunk written "
                        "before the next, flat in the length) or whole (diffusers' vae.decode of the whole video, "
                        "a pipeline called from Python)")
    g.add_argument("--context-parallel", type=positive_int, default=1, metavar="N",
                   help="direct/freeloc/fifo/ouroboros on Wan: predict one rank of Ulysses context parallelism over "
                        "N ranks (torchrun --nproc-per-node N for direct/freeloc; generate's --context-parallel N "
                        "for fifo/ouroboros windows); --fit is then one rank's GPU")
    g.add_argument("--image", nargs="?", const=True, default=None, type=_image.image_file, metavar="IMG",
                   help="direct/freeloc/fifo: plan an image-to-video run (the image encoder, the VAE encode of the "
                        "condition, the condition held in every step): Wan 2.1 / 2.2 A14B I2V models always are, "
                        "Wan 2.2 TI2V-5B in its image mode. With IMG and no --height/--width the video keeps the "
                        "image's aspect ratio at the model's default area, as `generate --image IMG`")
    g.add_argument("--json", action="store_true", help="print the plan as JSON")
    g.add_argument("--list-models", action="store_true", help="list the known model configs and exit")


# the plan options that describe one method's run: refused with another --method
METHOD_OPTIONS = {
    "window": ("fifo", "ouroboros"), "partitions": ("fifo", "ouroboros"),
    "no_tail": ("ouroboros",), "no_sacfa": ("ouroboros",), "no_guidance": ("ouroboros",),
    "id_length": ("story",), "read_images": ("story",), "characters": ("story",), "bank": ("story",),
    "bank_budget": ("story",), "schedule": ("story",), "story_kernel": ("story",),
    "chunk_frames": ("enhance",), "overlap_frames": ("enhance",), "chunk_batch": ("enhance",),
    "latent_only": ("direct", "freeloc", "story"),
    "image": ("direct", "freeloc", "fifo"),
}
# generation options `plan` shares with generate but does not read: refused rather than ignored
NOT_PLANNED = {
    "prompt": "", "seed": "", "fps": "", "out": "", "backend": "",
    "device": "; --kernels says whose kernels' allocations are modelled",
    "guidance_scale": "; the plan assumes classifier-free guidance, as the pipelines run it",
}


def check_options(args, method: str) -> None:
    """Options that do not apply to this plan refused in one line (a plan that silently ignored
    --window under --method direct, or --device, would look like an answer to another question)."""
    if args.list_models:
        refuse_inapplicable(args, add_arguments, lambda dest: dest in ("list_models", "debug"), "--list-models")
    for dest, why in NOT_PLANNED.items():
        refuse_inapplicable(args, add_arguments, lambda d, dest=dest: d != dest,
                            f"`longvideo plan` (it predicts memory and runs nothing{why})")
    refuse_inapplicable(args, add_arguments, lambda d: method in METHOD_OPTIONS.get(d, (method,)),
                        f"--method {args.method}")


def check_sizes(args, method: str, spec) -> None:
    """What `generate` would refuse before running, refused here too: --height / --width not
    multiples of the model's (VAE scale x patch), FIFO's window and queue (generate_fifo's
    check_queue), blending's overlap not shorter than its chunk (the planner would loop)."""
    comps = spec.components
    vae = comps["vae"].config if "vae" in comps else None
    transformer = comps["transformer"].config if "transformer" in comps else None
    found = config_size_multiple(vae, transformer)
    if found is not None:
        check_size_multiple(args.height, args.width, *found)
    per_latent = 1 if spec.family == "animatediff" else 4  # video frames per latent frame (Wan's VAEs: 4)
    if method in ("fifo", "ouroboros"):
        from .generate_fifo import check_queue

        trained = int(spec.trained_latent_frames)
        unet = comps["unet"].config if "unet" in comps else {}
        longest = unet.get("motion_max_seq_length") if spec.family == "animatediff" else None
        note = check_queue(args.window, args.partitions, lookahead=True, trained=trained,
                           num_frames=args.num_frames, per_latent=per_latent,  # FIFO's memory: any length
                           longest=longest, options=("--window", "--partitions"))
        if note:
            print(note)
    if method == "enhance":
        from ..methods.blending import latent_sizes

        chunk, overlap = args.chunk_frames, args.overlap_frames
        if overlap >= chunk:
            raise UsageError(f"--overlap-frames {overlap}: must be smaller than --chunk-frames {chunk}")
        chunk_latent, overlap_latent = latent_sizes(chunk, overlap, per_latent, True)
        if overlap_latent >= chunk_latent:
            raise UsageError(f"--overlap-frames {overlap} is {overlap_latent} latent frames, not less than the "
                             f"{chunk_latent} latent frames of --chunk-frames {chunk}; use a longer chunk")


def run(args) -> int:
    """Print the plan (exit status 1 when it does not fit --fit)."""
    from ..planner.estimate import plan
    from ..planner.models import known_model_names, load_model_spec

    method = "enhance" if args.method == "blending" else args.method
    check_options(args, method)
    if args.list_models:
        print("\n".join(known_model_names()))
        return 0
    model = args.model or _DEFAULT_MODEL[method]
    with user_errors():
        spec = load_model_spec(model)
    check_sizes(args, method, spec)
    dtype = args.dtype or ("float16" if method == "story" else "bfloat16")
    kw = dict(gpu_memory=args.fit, device=args.kernels, offload=args.offload, vae_tiling=args.vae_tiling,
              vae_slicing=args.vae_slicing, frames_per_window=args.window, num_partitions=args.partitions,
              tail=not args.no_tail, sacfa=not args.no_sacfa, guidance=not args.no_guidance,
              id_length=args.id_length, read_images=args.read_images, characters=args.characters,
              bank_location=args.bank, bank_budget=args.bank_budget, schedule=args.schedule,
              story_kernel=args.story_kernel, chunk_frames=args.chunk_frames, overlap_frames=args.overlap_frames,
              chunk_batch=args.chunk_batch, headroom=args.headroom, context_parallel=args.context_parallel,
              output_type="latent" if args.latent_only else "np", decode=args.decode)
    if args.steps:
        kw["num_inference_steps"] = args.steps
    height, width = args.height, args.width
    with user_errors():
        if args.image is not None:
            kw["image"] = True
            if isinstance(args.image, str) and height is None and width is None:
                height, width = _image_size(model, args.image)
        p = plan(method, spec, height, width, args.num_frames, dtype, **kw)
    print(json.dumps(p.to_dict(), indent=1, default=str) if args.json else p.summary())
    return 0 if p.fits in (None, True) else 1


def _image_size(model, path) -> tuple:
    """(height, width) of the video for the image at `path` on `model`, as ``generate --image``
    chooses it: the image's aspect ratio at the model's default area, each side a multiple of the
    VAE's spatial factor times the patch size."""
    from ..planner.estimate import _vae_scale
    from ..planner.models import load_model_spec

    spec = load_model_spec(model)
    dh, dw = spec.default_size or (480, 832)
    tr = spec.components.get("transformer") or spec.components.get("transformer_2")
    patch = int((tr.config.get("patch_size") or (1, 2, 2))[1]) if tr is not None else 1
    return _image.video_size(_image.load(path), dh * dw, _vae_scale(spec)[0] * patch)
