"""``longvideo generate --method fifo | ouroboros``: FIFO-Diffusion / Ouroboros-Diffusion on the
command line: options (``--fifo-*``, ``--ouroboros-*``, ``--resume``), the output video, the queue
checkpoints next to it (OUT.fifo_state/), Ctrl-C / SIGTERM, resume and torchrun."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import _fit, _image
from ._common import (VIDEO_SUFFIXES, UsageError, backend_setting, check_folder, check_size_multiple,
                      check_sizes_before_loading, checkpoint_family, first_line, load_pipeline, nonnegative_int,
                      output_file, pipeline_size_multiple, positive_int, print_settings, real, torch_dtype,
                      unit_interval, user_errors)
from .._io import OutputError
from ._signals import interrupts_raise

FAMILIES = ("wan", "skyreels", "animatediff", "wan22", "wan22_ti2v", "wan_i2v", "wan22_i2v")
# the families whose denoiser is diffusers' WanTransformer3DModel, which longvideo.parallel splits
# (SkyReels-V2's transformer builds per-token timesteps and its mask inside its forward; AnimateDiff
# is a UNet): --context-parallel N > 1 is refused on the others
CONTEXT_PARALLEL_FAMILIES = ("wan", "wan22", "wan22_ti2v", "wan_i2v", "wan22_i2v")
TIMESTEP_GRIDS = ("official", "scheduler")      # longvideo.methods.families.TIMESTEP_GRIDS
LOOKAHEAD_CONTEXTS = ("official", "clean")      # longvideo.methods.fifo.LOOKAHEAD_CONTEXTS
SACFA_TOKENS = ("paper", "official_demo")       # longvideo.methods.fifo_ouroboros.SACFA_TOKENS


def add_arguments(p) -> None:
    g = p.add_argument_group("fifo / ouroboros")
    g.add_argument("--fifo-family", choices=FAMILIES, default=None,
                   help="model family (default: wan for the tiny model, wan_i2v with --image, else read from the "
                        "checkpoint)")
    g.add_argument("--guidance-scale-2", type=real(0), default=None,
                   help="Wan 2.2 A14B (wan22, wan22_i2v): guidance scale of the low-noise expert (default: --guidance-scale)")
    g.add_argument("--fifo-partitions", type=positive_int, default=4, help="n: queue of n*f latent frames")
    g.add_argument("--fifo-window", type=positive_int, default=None,
                   help="f: latent frames per model call (default: the model's trained length)")
    g.add_argument("--fifo-no-lookahead", action="store_true", help="without lookahead denoising")
    g.add_argument("--fifo-eta", type=unit_interval, default=0.0,
                   help="DDIM eta (AnimateDiff family; the official FIFO code uses 1.0)")
    g.add_argument("--fifo-timestep-grid", choices=TIMESTEP_GRIDS, default="official",
                   help="official (default: linspace(0, 999, L) as the official FIFO code on the DDIM family; the "
                        "scheduler's sigmas on flow matching) or scheduler (the pipeline scheduler's timesteps)")
    g.add_argument("--fifo-lookahead-context", choices=LOOKAHEAD_CONTEXTS, default="official",
                   help="official (default: context frames noised to t_0, as the official code) or clean")
    g.add_argument("--fifo-emit-warmup", action="store_true",
                   help="also write the first L - f frames out of the queue (copies of the initial clip's first frame)")
    g.add_argument("--fifo-init-steps", type=positive_int, default=None,
                   help="steps of the initial clip (default: L, the number of levels)")
    g.add_argument("--fifo-checkpoint-every", type=nonnegative_int, default=10,
                   help="save the queue state every K iterations (and when interrupted) next to --out, in "
                        "OUT.fifo_state/; 0: never")
    g.add_argument("--fifo-png-dir", default=None, help="also write every frame as a PNG here")
    g.add_argument("--fifo-prompt-schedule", default=None,
                   help='multi-prompt: "0=a cat walking;120=a cat sleeping" (video frame = prompt; overrides --prompt)')
    g.add_argument("--fifo-coherent-tail", action="store_true",
                   help="(fifo) Ouroboros' coherent tail latent sampling only")
    g.add_argument("--resume", action="store_true", help="continue an interrupted fifo/ouroboros run from its checkpoint")
    g.add_argument("--ouroboros-no-tail", action="store_true", help="ouroboros: plain Gaussian tail")
    g.add_argument("--ouroboros-no-sacfa", action="store_true", help="ouroboros: no subject-aware cross-frame attention")
    g.add_argument("--ouroboros-no-guidance", action="store_true", help="ouroboros: no self-recurrent guidance")
    g.add_argument("--ouroboros-subject", default=None, help="subject words, comma separated (default: from the prompt)")
    g.add_argument("--ouroboros-guidance-scale", type=real(0), default=0.1,
                   help="ouroboros: step size of self-recurrent guidance")
    g.add_argument("--ouroboros-momentum", type=real(0, 1, high_open=True), default=0.9,
                   help="ouroboros: momentum of the subject feature bank")
    g.add_argument("--ouroboros-guided-windows", default=None,
                   help="comma-separated window indices to guide (default: 1, the window after the head's)")
    g.add_argument("--ouroboros-tail-ds", type=real(0, low_open=True), default=0.25,
                   help="ouroboros: spatial cut-off of the tail's low-pass filter")
    g.add_argument("--ouroboros-tail-dt", type=real(0, low_open=True), default=1.0,
                   help="ouroboros: temporal cut-off of the tail's low-pass filter")
    g.add_argument("--ouroboros-sacfa-tokens", choices=SACFA_TOKENS, default="paper",
                   help="SACFA keys: paper (default: the other frames' subject tokens) or official_demo (every "
                        "frame's subject tokens, its own included a second time); see docs/fidelity.md")


def guided_windows(args):
    if args.ouroboros_guided_windows is None:
        return None
    try:
        return tuple(int(x) for x in args.ouroboros_guided_windows.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--ouroboros-guided-windows: expected comma-separated integers, "
                         f"got {args.ouroboros_guided_windows!r}") from None


def subject_words(args):
    """--ouroboros-subject as a list of words (None: from the prompt); a blank word is refused here,
    before loading (the method would refuse it only after the model is loaded)."""
    if args.ouroboros_subject is None:
        return None
    words = [w.strip() for w in args.ouroboros_subject.split(",")]
    if not all(words):
        raise UsageError(f"--ouroboros-subject {args.ouroboros_subject!r}: expected comma-separated words, "
                         "one of them is empty")
    return words


def prompt_schedule(args):
    """--fifo-prompt-schedule as [(prompt, start frame), ...], else the prompt. Checked here, before
    anything is loaded: start frames from 0, increasing; no empty prompt."""
    prompt = args.prompt
    if not args.fifo_prompt_schedule:
        return prompt
    option, given = "--fifo-prompt-schedule", args.fifo_prompt_schedule
    try:
        schedule = [(text.strip(), int(start)) for start, text in
                    (item.split("=", 1) for item in given.split(";") if item.strip())]
    except ValueError:
        raise UsageError(f"{option}: expected 'FRAME=prompt;FRAME=prompt', got {given!r}") from None
    starts = [start for _, start in schedule]
    if not schedule or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise UsageError(f"{option}: start frames must begin at 0 and increase, got {starts}")
    empty = [start for text, start in schedule if not text]
    if empty:
        raise UsageError(f"{option}: the prompt from frame {empty[0]} is empty")
    return schedule


def _fit_fifo(args, pipe, method, num_frames) -> None:
    """--fit: the planner's settings for this queue (offload applied; a smaller window, which the
    planner offers last as it changes the output, goes to --fifo-window)."""
    if not args.fit:
        return
    from ..methods.families import family_for

    with user_errors():
        dh, dw = family_for(pipe, "fifo").default_size()
    st = _fit.choose(args, pipe, method, height=args.height or dh, width=args.width or dw, num_frames=num_frames,
                     frames_per_window=args.fifo_window, num_partitions=args.fifo_partitions,
                     tail=not getattr(args, "ouroboros_no_tail", False), sacfa=not getattr(args, "ouroboros_no_sacfa", False),
                     guidance=not getattr(args, "ouroboros_no_guidance", False),
                     # one rank's share of each window under --context-parallel N (torchrun)
                     context_parallel=getattr(args, "context_parallel", None) or 1,
                     image=True if getattr(args, "image", None) is not None else None)  # TI2V: its image mode
    if st.frames_per_window:
        args.fifo_window = st.frames_per_window


def _context_parallel(args, pipe, family: str, rank: int):
    """--context-parallel N > 1 (under torchrun): the world split into contiguous groups of N
    ranks, each window's token sequence split over a group (Ulysses), the windows over the
    groups. Returns the installed split (None when N is 1)."""
    size = getattr(args, "context_parallel", None) or 1
    if size == 1:
        return None
    from ..parallel import context_parallel_groups, enable_context_parallel

    with user_errors(what=f"--context-parallel {size}"):
        groups = context_parallel_groups(size)
        parallel = enable_context_parallel(pipe, groups)
    if rank == 0:
        print(f"context parallel: each window's sequence split over {size} ranks (Ulysses), the windows over "
              f"{groups.count} group{'s' if groups.count > 1 else ''} of ranks")
    return parallel


def _check_window_tokens(fifo, args, size: int) -> None:
    """A window's token sequence (frames x tokens per frame) must split evenly over the ranks. On
    two-expert pipelines (Wan 2.2 A14B) a window straddling the boundary is split into the experts'
    sub-windows of any frame count, so a frame's tokens must split evenly."""
    dh, dw = fifo.family.default_size()
    ph, pw = fifo.family.denoiser.config.patch_size[1:]
    vs = fifo.family.spatial
    per_frame = ((args.height or dh) // vs // ph) * ((args.width or dw) // vs // pw)
    if getattr(fifo.family, "two_experts", False) and per_frame % size:
        raise UsageError(f"--context-parallel {size}: a latent frame holds {per_frame} tokens, not divisible by "
                         f"{size} ranks (a two-expert window runs each expert on a sub-window of any frame count); "
                         "choose --height or --width so that it is")
    tokens = fifo.f * per_frame
    if tokens % size:
        raise UsageError(f"--context-parallel {size}: a window of {fifo.f} latent frames holds {tokens} tokens, not "
                         f"divisible by {size} ranks; choose --fifo-window, --height or --width so that it is")


# Every scheduler of the supported checkpoints (and of the tiny models) has 1000 training timesteps.
DEFAULT_TRAIN_TIMESTEPS = 1000


def trained_latent_frames(model, family: str) -> int:
    """The latent frames of the clips the model was trained on, known before loading it: the
    built-in tiny models' (3; the tiny AnimateDiff's 4), else the family's (Wan 2.1 / 2.2 A14B 21,
    Wan 2.2 TI2V 31, SkyReels-V2 25, AnimateDiff 16): what FIFO's default window is."""
    if model is None:
        from ..models import animatediff, wan

        return animatediff.TINY_TRAINED_FRAMES if family == "animatediff" else wan.TINY_TRAINED_LATENT_FRAMES
    from ..methods.families import FAMILIES as FAMILY_CLASSES

    return next(cls.trained_latent_frames for cls in FAMILY_CLASSES if cls.name == family)


def train_timesteps(model) -> int:
    """The scheduler's num_train_timesteps (from scheduler/scheduler_config.json; 1000 where the
    checkpoint does not say, and for the tiny models)."""
    if model is None:
        return DEFAULT_TRAIN_TIMESTEPS
    try:
        config = json.loads((Path(model) / "scheduler" / "scheduler_config.json").read_text())
        return int(config.get("num_train_timesteps") or DEFAULT_TRAIN_TIMESTEPS)
    except (OSError, ValueError, TypeError, AttributeError):
        return DEFAULT_TRAIN_TIMESTEPS


def longest_window(model, family: str):
    """The longest clip the denoiser takes at all, known before loading, or None where no limit
    applies (Wan's RoPE covers 1024 latent frames, beyond the level limit below): AnimateDiff's
    motion modules' ``motion_max_seq_length`` (the unet's config.json; the tiny model's 32)."""
    if family != "animatediff":
        return None
    if model is None:
        from ..models.animatediff import TINY_MOTION_MAX_SEQ_LENGTH

        return TINY_MOTION_MAX_SEQ_LENGTH
    try:
        return int(json.loads((Path(model) / "unet" / "config.json").read_text())["motion_max_seq_length"])
    except (OSError, ValueError, TypeError, KeyError):
        return None  # checked on the loaded pipeline (AnimateDiffFamily.check_window)


def check_queue(window, partitions: int, *, lookahead: bool, trained: int, num_frames, per_latent: int,
                longest=None, timesteps: int = DEFAULT_TRAIN_TIMESTEPS, family: str = "",
                options=("--fifo-window", "--fifo-partitions")):
    """FIFO's window f (None: the trained clip) and partitions n against what the method needs
    (docs/methods.md, "The queue"): a UsageError naming `options` for what cannot be right, else
    the text of a note to print (or None). The window is the latent frames of one model call,
    meant to be the model's trained clip (`trained`, the default). Refused: f < 2 with lookahead
    (half of a window is context); f beyond the longest clip the denoiser takes at all
    (`longest`); f longer than both the trained clip and the whole video (`num_frames` video
    frames, None: not known; `per_latent` video frames per latent frame: one call would cover more
    than the video, beyond what the model was trained on); a queue of more levels L (= denoising steps per frame:
    2 n floor(f/2) with lookahead, n f without) than the scheduler's training `timesteps`. A
    window longer than the trained clip but within those limits gets the note."""
    window_option, partitions_option = options
    f, note = window, None
    if f is not None and lookahead and f < 2:
        hint = ", or add --fifo-no-lookahead" if window_option == "--fifo-window" else ""
        raise UsageError(f"{window_option} {f}: lookahead denoising needs windows of at least 2 latent frames (the "
                         f"first half of a window is context); give 2 or more{hint}")
    if f is not None and longest is not None and f > longest:
        raise UsageError(f"{window_option} {f}: AnimateDiff's motion modules take clips of at most {longest} frames "
                         f"(motion_max_seq_length); the model was trained on {trained}: give at most {trained} "
                         "(the default)")
    if f is not None and f > trained:
        # latent frames FIFO emits for the video (None: no video length given, as in `plan`)
        video_latents = None if num_frames is None else -(-(num_frames - 1) // per_latent) + 1
        if video_latents is not None and f > video_latents:
            video = f"--num-frames {num_frames}" + (f" = {video_latents} latent frames" if per_latent > 1 else "")
            raise UsageError(f"{window_option} {f}: longer than the model's trained clip ({trained} latent frames) "
                             f"and than the whole video ({video}); FIFO calls the model on windows of its trained "
                             f"length: give at most {trained} (the default)")
        note = (f"note: {window_option} {f} is longer than the model's trained clip of {trained} latent frames: every "
                "model call runs beyond the length it was trained on (what FIFO's windows are meant to avoid; right "
                "only for a checkpoint trained on longer clips)")
    window = f if f is not None else max(trained, 2 if lookahead else 1)
    levels = 2 * partitions * (window // 2) if lookahead else partitions * window
    if levels > timesteps:
        raise UsageError(f"{partitions_option} {partitions} with a window of {window} latent frame"
                         f"{'s' * (window != 1)}: a queue of {levels} levels, i.e. {levels} denoising steps per "
                         f"frame, more than the scheduler's {timesteps} training timesteps; use fewer partitions "
                         "(default 4) or a smaller window")
    return note


def check_queue_before_loading(args, family: str, num_frames: int, rank: int = 0) -> None:
    """:func:`check_queue` for the generate options, before the model is loaded: the trained clip,
    the longest clip and the scheduler's timesteps read from the checkpoint's files (or the tiny
    models' constants); the note printed (rank 0)."""
    note = check_queue(args.fifo_window, args.fifo_partitions, lookahead=not args.fifo_no_lookahead,
                       trained=trained_latent_frames(args.model, family), num_frames=num_frames,
                       per_latent=1 if family == "animatediff" else 4,  # video frames per latent (Wan's VAEs: 4)
                       longest=longest_window(args.model, family), timesteps=train_timesteps(args.model))
    if note and rank == 0:
        print(note)


def build_from_args(args, pipe):
    """The FIFODiffusion / OuroborosDiffusion (args.method) the options describe, on `pipe`."""
    from ..methods.fifo import FIFODiffusion, OuroborosDiffusion

    method = getattr(args, "method", "fifo")
    common = dict(num_partitions=args.fifo_partitions, frames_per_window=args.fifo_window,
                  lookahead=not args.fifo_no_lookahead, skip_warmup=not args.fifo_emit_warmup, eta=args.fifo_eta,
                  timestep_grid=args.fifo_timestep_grid, lookahead_context=args.fifo_lookahead_context)
    with user_errors():
        if method == "ouroboros":
            subjects = subject_words(args)
            return OuroborosDiffusion(pipe, tail_sampling=not args.ouroboros_no_tail,
                                      sacfa=not args.ouroboros_no_sacfa,
                                      self_recurrent_guidance=not args.ouroboros_no_guidance, subject_words=subjects,
                                      guidance_scale=args.ouroboros_guidance_scale,
                                      momentum=args.ouroboros_momentum, guided_windows=guided_windows(args),
                                      tail_d_s=args.ouroboros_tail_ds, tail_d_t=args.ouroboros_tail_dt,
                                      sacfa_tokens=args.ouroboros_sacfa_tokens, **common)
        return FIFODiffusion(pipe, coherent_tail=args.fifo_coherent_tail, **common)


def check_checkpoint_folder(out: Path, ckpt_dir: Path) -> None:
    """The queue checkpoints' folder next to the video (OUT.fifo_state/) can be written: checked
    before anything is loaded (an existing folder of another user's run, or a file of that name,
    would otherwise fail only at the first checkpoint)."""
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise UsageError(f"--out {out}: the checkpoint folder {ckpt_dir} is a file")
    if ckpt_dir.exists() and not os.access(ckpt_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the checkpoint folder {ckpt_dir} is not writable")


def _saved_frames(ckpt: Path) -> int:
    """Frames a run's checkpoint has emitted (a checkpoint that cannot be read is a UsageError)."""
    import torch

    if not ckpt.exists():
        raise UsageError(f"--resume: no checkpoint at {ckpt} (checkpoints are written every "
                         "--fifo-checkpoint-every iterations and when a run is interrupted)")
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["frames_out"])
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the user's file, not a bug
        detail = first_line(exc)  # torch's unpickling errors go on about weights_only=False: not for this file
        detail = f"{type(exc).__name__}: {detail}" if detail and len(detail) < 120 and "weights_only" not in detail \
            else type(exc).__name__
        raise UsageError(f"--resume: {ckpt} is not a readable queue checkpoint ({detail}); delete {ckpt.parent} "
                         "to start afresh") from exc


def run(args) -> int:
    import torch

    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: one rank per GPU (or CPU process)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    method = getattr(args, "method", "fifo")
    prompt = prompt_schedule(args)
    guided_windows(args)  # checked before anything is loaded
    subject_words(args)
    out = output_file(args.out, f"{method}.mp4", suffixes=VIDEO_SUFFIXES)
    if args.fifo_png_dir is not None:
        if not str(args.fifo_png_dir).strip():  # "" would silently write no PNGs
            raise UsageError("--fifo-png-dir: must not be empty (omit it to write no PNG frames)")
        check_folder(args.fifo_png_dir, "--fifo-png-dir")
    num_frames = args.num_frames or 48
    ckpt_dir = out.with_suffix(".fifo_state")
    every = args.fifo_checkpoint_every
    if every or args.resume:
        check_checkpoint_folder(out, ckpt_dir)
    start_frame = 0
    if args.resume:
        start_frame = _saved_frames(ckpt_dir / "fifo_state.pt")
        every = every or 10
        if start_frame >= num_frames:
            print(f"the checkpoint in {ckpt_dir} has emitted {start_frame} frames already; nothing to do "
                  "(ask for more with --num-frames to extend the video)")
            return 0
    family = args.fifo_family or (
        checkpoint_family(args.model, FAMILIES, f"`longvideo generate --method {method}`") if args.model
        else "wan_i2v" if getattr(args, "image", None) is not None else "wan")
    _image.check_family(args, family, f"`longvideo generate --method {method}`")
    cp = getattr(args, "context_parallel", None) or 1
    if cp > 1 and family not in CONTEXT_PARALLEL_FAMILIES:
        raise UsageError(f"--context-parallel {cp}: runs on Wan transformers ({', '.join(CONTEXT_PARALLEL_FAMILIES)}), "
                         f"not on {family}; omit it to split only the windows over the ranks")
    check_sizes_before_loading(args, family)
    check_queue_before_loading(args, family, num_frames, rank)
    with _fit.host_loading(args):
        pipe = load_pipeline(args, family, "t2v", dtype=torch_dtype(args.dtype))
    check_size_multiple(args.height, args.width, *pipeline_size_multiple(pipe))
    image = None
    if getattr(args, "image", None) is not None:  # the first frame; the size keeps its aspect ratio (--fit plans it)
        from ..methods.families import family_for

        with user_errors():
            family_obj = family_for(pipe, method)
        dh, dw = family_obj.default_size()
        image = _image.load(args.image)
        h, w = _image.video_size(image, dh * dw, family_obj.size_multiple())
        args.height, args.width = args.height or h, args.width or w
    _fit.lean_wan_forward(pipe)
    _fit_fifo(args, pipe, method, num_frames)
    fifo = build_from_args(args, pipe)
    if cp > 1:
        _check_window_tokens(fifo, args, cp)
    # before generate installs Ouroboros' processors; installed for the whole run
    parallel = _context_parallel(args, pipe, family, rank)  # noqa: F841
    fifo.set_progress_bar_config(disable=True)  # the command's own bar counts the frames written
    dh, dw = fifo.family.default_size()
    if rank == 0:
        print_settings(method=method, size=f"{args.width or dw}x{args.height or dh}", frames=num_frames,
                       steps=fifo.L, window=fifo.f, partitions=fifo.n, dtype=fifo.family.denoiser.dtype,
                       device=args.device, backend=backend_setting())
    kwargs = dict(height=args.height, width=args.width, guidance_scale=args.guidance_scale, seed=args.seed or 0,
                  num_inference_steps=None, init_steps=args.fifo_init_steps, checkpoint_dir=ckpt_dir,
                  resume=args.resume, checkpoint_every=every)
    if args.guidance_scale_2 is not None:
        kwargs["guidance_scale_2"] = args.guidance_scale_2
    if image is not None and fifo.family.name == "wan22_ti2v":
        fifo.family.set_image(image)  # TI2V's image mode (longvideo.methods.families.wan22_ti2v)
    elif image is not None:
        kwargs["image"] = image
    if args.steps is not None and args.steps != fifo.L:
        print(f"note: --steps ignored: {method} denoises with one level per queue slot ({fifo.L} levels)")
    t0 = time.perf_counter()
    with sigterm_as_interrupt():
        if rank != 0:  # every rank runs the queue; rank 0 writes the video and the checkpoints
            with user_errors():
                for _ in fifo.generate(prompt, num_frames, **kwargs):
                    pass
            return 0
        writer = open_output(out, start_frame, args)
        try:
            _write(fifo, prompt, num_frames, kwargs, writer, start_frame)
        except ValueError as exc:  # a setting the method refuses, or resume with other settings
            raise UsageError(str(exc)) from exc
        except OutputError as exc:
            if exc.path.parent == ckpt_dir and writer.joined:
                # the checkpoint could not be written; the video was still joined: say what it holds
                held = (f"frames {writer.first_frame_index}..{writer.first_frame_index + writer.frames_written - 1} "
                        f"in {writer.path}")
                exc.set_kept("; ".join(x for x in (exc.kept, held, writer.describe_pngs()) if x))
            raise
        except KeyboardInterrupt as exc:
            from . import _signals

            saved = (ckpt_dir / "fifo_state.pt").exists()
            video = (f"{writer.path} holds frames {writer.first_frame_index}.."
                     f"{writer.first_frame_index + writer.frames_written - 1}" if writer.joined
                     else "no new frames were written")
            print(f"\ninterrupted by {_signals.signal_name(exc)}; {video}; " +
                  (f"the queue state is saved in {ckpt_dir}: run the same command with --resume to continue"
                   if saved and every else "no queue state was saved" +
                   (" (--fifo-checkpoint-every 0)" if not every else " (stopped before the first iteration ended)")))
            return _signals.exit_status(exc)
    dt = time.perf_counter() - t0
    made = num_frames - start_frame
    print(f"wrote {writer.path} ({made} new frames, {num_frames} in all, {made / dt:.2f} frames/s)")
    if writer.path != out and writer.first_frame_index:
        print(f"frames before {writer.first_frame_index} are not in {writer.path} (see the note above)")
    return 0


def _write(fifo, prompt, num_frames, kwargs, writer, start_frame) -> None:
    from tqdm import tqdm

    with writer, tqdm(total=num_frames, initial=start_frame, unit="frame") as bar:
        for _ in fifo.generate(prompt, num_frames, writer=writer, **kwargs):
            bar.update(1)


def open_output(out: Path, start_frame: int, args):
    """The VideoWriter a (resumed) run writes with (docs/outputs.md).

    A fresh run writes `out` (through segment files in OUT.segments/, joined into `out` at the
    end). A resumed run keeps the first `start_frame` frames of the interrupted video as they are
    -- its closed segments, or the file `out` itself, cut to `start_frame` frames by copying
    packets if it holds more -- and appends: nothing is encoded again. When the old video holds
    fewer frames (deleted, or killed before a segment was closed), those frames are lost: what it
    holds is joined into `out`, and the new frames go to OUT.from<N>.mp4."""
    from ..video import VideoWriter

    writer = VideoWriter(out, fps=args.fps, png_dir=args.fifo_png_dir, keep_frames=start_frame)
    if writer.frames_written >= start_frame:
        return writer
    have = writer.frames_written
    if have:  # what the old video holds, as one file again
        writer.sync()
        writer.close()
    part = out.with_name(f"{out.stem}.from{start_frame}{out.suffix}")
    held = f"holds frames 0..{have - 1}" if have else "is missing or unreadable"
    print(f"note: {out} {held}, fewer than the {start_frame} frames the checkpoint has emitted (frames "
          f"{have}..{start_frame - 1} are lost with the old video); the frames from {start_frame} on go to {part}")
    return VideoWriter(part, fps=args.fps, png_dir=args.fifo_png_dir, first_frame_index=start_frame)


class sigterm_as_interrupt(interrupts_raise):
    """SIGTERM (a job scheduler, `timeout`, `kill`) and SIGINT raise KeyboardInterrupt in the main
    thread, so the video file is closed and the queue state saved (longvideo.cli._signals; the
    same handling ``longvideo.cli.main`` installs, kept for callers of ``run`` outside main)."""
