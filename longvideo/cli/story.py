"""``longvideo story PROMPTS.txt``: a StoryDiffusion comic from a story file: the panels,
comic.png and story.json in --out (default story_out/)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from . import _fit
from ._common import (UsageError, add_common_generation, apply_backend, check_folder, checkpoint_family, input_file,
                      is_cuda, load_pipeline, nonnegative_int, output_folder, positive_int, resolve_device,
                      torch_dtype, unit_interval, user_errors, backend_setting, check_size_multiple,
                      check_sizes_before_loading, memory_size, pipeline_size_multiple, print_settings,
                      refuse_inapplicable)

HELP = "StoryDiffusion comic from a story file"
SCHEDULES = ("official_app", "low_vram")   # longvideo.processors.consistent.SCHEDULES
LAYERS = ("up", "up+mid", "all")


_PERCENT = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*%\s*", re.IGNORECASE)
_ZERO_SIZE = re.compile(r"\s*0*\.?0*\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)\s*", re.IGNORECASE)  # memory_size: > 0


def bank_budget(text):
    """argparse type: the auto id bank's GPU budget, a size with its unit ("2GiB", "512MB"; 0 keeps
    every entry in host memory) or a percentage of the GPU's memory in [0, 100] ("10%"); a bare
    number is refused (it would be bytes, never what is meant: the --fit rule)."""
    m = _PERCENT.fullmatch(str(text))
    if m is not None:
        if not 0 <= float(m.group(1)) <= 100:
            raise argparse.ArgumentTypeError(f"a percentage of the GPU's memory must be in [0, 100], got {text!r} "
                                             "(StoryDiffusion's bank_gpu_budget)")
        return text
    if _ZERO_SIZE.fullmatch(str(text)):
        return text
    try:
        return memory_size(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, or a percentage such as 10% (StoryDiffusion's "
                                         "bank_gpu_budget)") from None


bank_budget.__name__ = "budget"


def check_bank_options(args) -> None:
    """--story-bank is auto, none, a device or a .safetensors file, and --story-bank-budget goes
    with auto only: refused before loading (the library refused them after the settings line,
    naming its own arguments)."""
    bank = str(args.story_bank).strip()
    device = re.fullmatch(r"cpu|cuda(:\d+)?", bank)
    if not (bank in ("auto", "none", "") or device or bank.lower().endswith(".safetensors")):
        raise UsageError(f"--story-bank {args.story_bank!r}: expected auto, cpu, cuda, cuda:N, none or a "
                         ".safetensors file")
    if args.story_bank_budget is not None and bank != "auto":
        raise UsageError(f"--story-bank-budget applies to --story-bank auto only (the budget of its GPU part), "
                         f"not to --story-bank {args.story_bank}")


def add_arguments(p) -> None:
    add_common_generation(p)
    p.add_argument("story_file", help="story text file: one prompt per line, [Name] characters, [NC] none, "
                                      "'#' comments (see `longvideo.methods.storydiffusion`)")
    p.add_argument("--story-kind", default="sd15", choices=["sd15", "sdxl"],
                   help="pipeline family for the built-in tiny model or a single-file checkpoint")
    p.add_argument("--story-id-length", type=positive_int, default=4,
                   help="id images per character (written together)")
    p.add_argument("--story-sampling-rate", type=unit_interval, default=0.5,
                   help="share of the id tokens each image reads")
    p.add_argument("--story-schedule", default="official_app", choices=list(SCHEDULES),
                   help="official_app (default: the official app.py; consistent attention from step 5, read "
                        "images attend to the whole id bank before it) or low_vram (the official low-VRAM "
                        "app: from step 1, plain attention at step 0); see docs/fidelity.md")
    p.add_argument("--story-start-step", type=nonnegative_int, default=None,
                   help="first step of sampled consistent attention (default: 5 for official_app, 1 for "
                        "low_vram); the steps before it follow --story-schedule")
    p.add_argument("--story-prob-early", type=unit_interval, default=0.7,
                   help="probability of consistent attention per layer before --story-late-step")
    p.add_argument("--story-prob-late", type=unit_interval, default=0.9,
                   help="probability of consistent attention per layer from --story-late-step on")
    p.add_argument("--story-late-step", type=nonnegative_int, default=20,
                   help="the step where --story-prob-late takes over")
    p.add_argument("--story-layers", default="up", choices=list(LAYERS),
                   help="the UNet's self-attention layers that get consistent attention")
    p.add_argument("--story-bank", default="auto",
                   help="where id banks live: auto (default: on the GPU up to --story-bank-budget, the rest "
                        "in pinned host memory), cuda, cpu, or a .safetensors file")
    p.add_argument("--story-bank-budget", type=bank_budget, default=None,
                   help="GPU budget of the auto id bank: a size with its unit, e.g. 2GiB / 512MB, or a percentage "
                        "of the GPU's memory, e.g. 10%% (default 10%%)")
    p.add_argument("--story-save-bank", default=None, help="save the id banks here (.safetensors)")
    p.add_argument("--story-load-bank", default=None, help="continue a story: load id banks from this file")
    p.add_argument("--story-negative-prompt", default=None, help="negative prompt (default: none)")
    p.add_argument("--story-style", default="{prompt}", help="prompt template, e.g. 'comic book, {prompt}'")
    _fit.add_argument(p)
    p.add_argument("--story-columns", type=positive_int, default=3, help="panels per row of the comic grid")


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "panel"


def _load(args):
    """The SD1.5/SDXL pipeline (tiny without --model) and its default step count."""
    import torch

    dtype = torch_dtype(args.dtype)
    if args.model is None:
        from ..models.sd import tiny_pipeline

        return tiny_pipeline(args.story_kind, seed=args.seed, dtype=dtype or torch.float32).to(args.device), 10
    model = Path(args.model)
    if model.is_file():
        if model.suffix not in (".safetensors", ".ckpt"):
            raise UsageError(f"--model {model}: a single-file checkpoint is a .safetensors or .ckpt file")
    else:
        checkpoint_family(model, ("sd15", "sdxl"), "`longvideo story`")
    dtype = dtype or (torch.float16 if is_cuda(args.device) else torch.float32)
    return load_pipeline(args, "sd", args.story_kind, dtype=dtype), 50


def _story_plan_kwargs(args, pipe, story, steps, bank_location) -> dict:
    """What the planner needs of this story: sizes, id images, characters, images read alone."""
    characters = {c for p in story.prompts for c in p.characters}
    id_images = args.story_id_length * max(1, len(characters))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor   # the pipeline's default image size
    return dict(height=args.height or size, width=args.width or size, id_length=args.story_id_length, num_inference_steps=steps,
                sampling_rate=args.story_sampling_rate, start_step=args.story_start_step,
                schedule=args.story_schedule, characters=len(characters),
                read_images=max(0, len(story.prompts) - id_images), bank_location=bank_location,
                bank_budget=args.story_bank_budget)


def run(args) -> int:
    """Generate the story, write the panels, comic.png and story.json."""
    from ..methods.storydiffusion import StoryDiffusion, bank_memory_line, comic_grid, read_story_file

    refuse_inapplicable(args, add_arguments, lambda dest: dest != "num_frames",
                        "`longvideo story` (one image per story line)")
    check_bank_options(args)
    args.device = resolve_device(args.device)
    apply_backend(args.backend, args.device)
    with user_errors():
        story = read_story_file(args.story_file)
    if "{prompt}" not in args.story_style:
        raise UsageError(f"--story-style must contain '{{prompt}}', got {args.story_style!r}")
    if args.story_load_bank:
        input_file(args.story_load_bank, "--story-load-bank")
    if args.story_save_bank:
        check_folder(Path(args.story_save_bank).parent, "--story-save-bank")
    out = output_folder(args.out, "story_out")
    check_sizes_before_loading(args, "sd")
    with _fit.host_loading(args, cuda_dtype="float16"):
        pipe, steps = _load(args)
    check_size_multiple(args.height, args.width, *pipeline_size_multiple(pipe))
    if not args.story_load_bank:  # each character writes its bank from its own id prompts (before the run)
        for c in story.characters:
            have = sum(1 for p in story.prompts if list(p.characters) == [c])
            if have < args.story_id_length:
                raise UsageError(f"--story-id-length {args.story_id_length}: character [{c}] has {have} id prompt(s) "
                                 f"(lines naming only [{c}]) in {args.story_file}; lower it or add lines")
    steps = args.steps or steps
    default_side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    print_settings(size=f"{args.width or default_side}x{args.height or default_side}", images=len(story.prompts),
                   steps=steps, dtype=pipe.unet.dtype, device=args.device, backend=backend_setting())
    bank_location = None if args.story_bank in (None, "", "none") else args.story_bank
    if args.fit:  # the planner's offload / VAE / bank choice for this story (bank: its budget too)
        chosen_by_user = bank_location not in ("auto", "cpu") and not str(bank_location).startswith("cuda")
        planned = ("cpu" if chosen_by_user or bank_location is None  # a file, or none: nothing on the device
                   else "device" if str(bank_location).startswith("cuda") else bank_location)
        st = _fit.choose(args, pipe, "story", **_story_plan_kwargs(args, pipe, story, steps, planned))
        if not chosen_by_user and bank_location is not None:
            bank_location = args.device if st.bank_location == "device" else st.bank_location
        if args.story_bank_budget is None and bank_location == "auto":
            # the planner's budget of the auto bank: 10% of --fit unless given (not 10% of a larger card)
            args.story_bank_budget = st.bank_budget or int(0.1 * _fit.parse_size(args.fit))
    with user_errors():
        method = StoryDiffusion(pipe, sampling_rate=args.story_sampling_rate, start_step=args.story_start_step,
                                prob_early=args.story_prob_early, prob_late=args.story_prob_late,
                                late_step=args.story_late_step, layers=args.story_layers,
                                bank_location=bank_location, bank_gpu_budget=args.story_bank_budget,
                                schedule=args.story_schedule)
        if args.story_load_bank:
            loaded = method.load_bank(args.story_load_bank)
            print(f"loaded id banks of {loaded} from {args.story_load_bank}")
        result = method.generate_story(story, id_length=args.story_id_length, num_inference_steps=steps,
                                       guidance_scale=5.0 if args.guidance_scale is None else args.guidance_scale,
                                       height=args.height, width=args.width, seed=args.seed,
                                       negative_prompt=args.story_negative_prompt, style=args.story_style,
                                       output_type="pil", progress=True)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (img, p) in enumerate(zip(result.images, result.prompts)):
        f = out / f"{i:03d}_{slug(p.caption)}.png"
        img.save(f)
        files.append(f.name)
    comic_grid(result.images, [p.caption for p in result.prompts], columns=args.story_columns).save(out / "comic.png")
    (out / "story.json").write_text(json.dumps({
        "story_file": str(args.story_file), "model": args.model or f"tiny-{args.story_kind}", "steps": steps,
        "seed": args.seed, "panels": [{"file": f, "prompt": p.text, "caption": p.caption,
                                       "characters": list(p.characters), "role": r, "seed": s}
                                      for f, p, r, s in zip(files, result.prompts, result.roles, result.seeds)],
    }, indent=1))
    print(bank_memory_line(method.bank.memory_summary()))
    if args.story_save_bank:
        print(f"saved id banks to {method.save_bank(args.story_save_bank)}")
    print(f"wrote {len(files)} panels and {out / 'comic.png'}")
    return 0
