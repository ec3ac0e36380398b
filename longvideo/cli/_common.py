"""What the ``longvideo`` commands share: the error convention, checked option types, the
common generation options, device, dtype, backend, output paths and checkpoint families.

Error convention: a user mistake (a bad option value, a missing or unreadable input, a model of
the wrong kind, an output path that cannot be written, ``--device cuda`` without a GPU ...)
raises :class:`UsageError`; ``longvideo.cli.main`` prints it as ONE line ``longvideo: error:
...`` on stderr and returns exit status 2 (after the traceback with ``--debug``). Any other
exception is a bug and keeps its traceback.

Importing this module imports neither torch nor a method module: the parser is built from this
module and the command modules alone; what a command needs is imported when it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Optional


class UsageError(Exception):
    """A user mistake: printed as one line ``longvideo: error: ...``, exit status 2."""


def one_line(text) -> str:
    """`text` on one line: its lines joined by '; ' (by a space after a line ending in ':')."""
    out = ""
    for line in str(text).splitlines():
        line = line.strip()
        if line:
            out = line if not out else out + (" " if out.endswith(":") else "; ") + line
    return out


def first_line(exc) -> str:
    """The first non-empty line of an exception's message (long library messages go on to advice)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


@contextlib.contextmanager
def user_errors(*types, what: Optional[str] = None):
    """Turn the exceptions `types` (default ValueError: what the library raises for bad inputs)
    raised inside the block into a UsageError, prefixed with `what`."""
    types = types or (ValueError,)
    try:
        yield
    except UsageError:
        raise
    except types as exc:
        text = one_line(exc) or type(exc).__name__
        raise UsageError(f"{what}: {text}" if what else text) from exc


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors (one line, exit status 2, via main)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes only plain negative numbers as values: `--fit -24GB` or `--story-bank-budget
        # -5%` were "expected one argument". No option here starts with a dash and a digit, so
        # such a word is a value, and the option's own check says what is wrong with it.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows every option's default (unless its help already
    names one, or there is none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


# ----------------------------------------------------------------------------------------------
# checked option types: a bad value is refused while parsing, naming the option
def at_least(minimum: int):
    """argparse type: an integer >= `minimum`."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = at_least(1)
nonnegative_int = at_least(0)


def real(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
         high_open: bool = False):
    """argparse type: a finite float in the interval given (open or closed at either end)."""
    if low is not None and high is not None:
        need = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        need = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        need = f"{'<' if high_open else '<='} {high:g}"
    else:
        need = "finite"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value

    parse.__name__ = f"number {need}"
    return parse


positive_float = real(0, low_open=True)
nonnegative_float = real(0)
unit_interval = real(0, 1)
_FPS_RANGE = real(0.001, 1000)


def frame_rate(text):
    """argparse type: a video's frame rate, 0.001 .. 1000 frames/s (ffmpeg codes it as a fraction
    with a bounded denominator: 1e-9 would become 0, 1e300 an overflow, after the whole run)."""
    return _FPS_RANGE(positive_float(text))


frame_rate.__name__ = "frame rate"

def model_path(text):
    """argparse type: a non-empty path (an empty --model would silently mean the tiny model)."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("must not be empty (leave --model out for the built-in tiny model)")
    return text


model_path.__name__ = "path"


def text_prompt(text):
    """argparse type: a prompt with at least one non-blank character (an empty --prompt would
    otherwise be replaced by a method's own default prompt, or condition on nothing, silently)."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


text_prompt.__name__ = "prompt"

SEED_MAX = 2 ** 64 - 1  # torch.Generator.manual_seed takes 64 bits


def seed(text):
    """argparse type: a random seed, an integer in [0, 2**64 - 1] (what torch.Generator takes;
    a negative seed would be silently wrapped around)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1], got {text}")
    return value


seed.__name__ = "seed"

_SIZE = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib|k|m|g|t)\s*",
                   re.IGNORECASE)


def memory_size(text):
    """argparse type: an amount of memory WITH its unit ("24GB" = 24e9 bytes, "24GiB" = 24 * 2**30,
    "512MB", "1e9B"), positive and finite; returned as typed (the planner parses it). A bare number
    is refused: "24" would be 24 bytes, never what is meant."""
    m = _SIZE.fullmatch(str(text))
    if m is None:
        hint = " (bytes? write e.g. 24GB or 24GiB)" if re.fullmatch(r"\s*[\d.e+-]+\s*", str(text)) else ""
        raise argparse.ArgumentTypeError(f"expected a size with its unit such as 24GB or 80GiB, got {text!r}{hint}")
    if not (math.isfinite(float(m.group(1))) and float(m.group(1)) > 0):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text!r}")
    return text


memory_size.__name__ = "size"


# ----------------------------------------------------------------------------------------------
# the options every generating command has
DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("auto", "triton", "cuda", "reference")  # longvideo.ops.BACKEND_NAMES
DEFAULT_PROMPT = "a red panda walking through a bamboo forest, cinematic"


def add_common_generation(p) -> None:
    """--model --prompt --num-frames --height --width --steps --guidance-scale --seed --device
    --dtype --out --fps --backend (each command reads those that apply to it)."""
    p.add_argument("--model", type=model_path, default=None,
                   help="local diffusers checkpoint folder (default: built-in tiny model)")
    p.add_argument("--prompt", type=text_prompt, default=DEFAULT_PROMPT, help="text prompt")
    p.add_argument("--num-frames", type=positive_int, default=None,
                   help="video frames to generate (default: per method and model)")
    p.add_argument("--height", type=positive_int, default=None, help="height in pixels (default: per model)")
    p.add_argument("--width", type=positive_int, default=None, help="width in pixels (default: per model)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: per method and model)")
    p.add_argument("--guidance-scale", type=real(), default=None, help="classifier-free guidance scale "
                                                                         "(default: per method and model)")
    p.add_argument("--seed", type=seed, default=0, help="random seed, 0 .. 2**64 - 1")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: per method and device)")
    p.add_argument("--out", default=None, help="output file or folder (default: per command)")
    p.add_argument("--fps", type=frame_rate, default=8, help="frames per second of the video written "
                                                               "(0.001 .. 1000)")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="kernel backend of the longvideo ops (default: $LONGVIDEO_BACKEND if set, else auto)")


# ----------------------------------------------------------------------------------------------
# device, dtype, backend
def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(value: Optional[str], option: str = "--device") -> str:
    """`value` checked (None: cuda if available, else cpu): a device torch knows, and a CUDA
    device only where one is present."""
    import torch

    if value is None:
        return default_device()
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"{option} {value!r}: not a device ({one_line(exc)})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise UsageError(f"{option} {value}: no CUDA device is available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {value}: there are {torch.cuda.device_count()} CUDA device(s)")
    return value


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def torch_dtype(name: Optional[str], default=None):
    """The torch dtype named by --dtype (`default` when not given)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, default) \
        if name else default


def apply_backend(name: Optional[str], device) -> None:
    """Set the ops' backend from --backend (None: keep $LONGVIDEO_BACKEND or auto), refusing a
    backend that cannot run on `device` before anything is loaded."""
    from .. import ops

    option = "--backend"
    if name is None:
        name = os.environ.get("LONGVIDEO_BACKEND")
        option = "LONGVIDEO_BACKEND"
        if name is None:
            return
        if name not in BACKENDS:
            raise UsageError(f"LONGVIDEO_BACKEND={name!r}: must be one of {', '.join(BACKENDS)}")
    if name not in ("auto", "reference"):
        dev_type = "cuda" if is_cuda(device) else str(device).split(":")[0]
        if name == "cuda" and dev_type != "cuda":
            raise UsageError(f"{option} cuda: the CUDA extension runs on CUDA devices only, the device is {device}")
        if name == "triton" and dev_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise UsageError(f"{option} triton on {device}: Triton kernels run on CPU only under TRITON_INTERPRET=1 "
                             "(or use --backend reference / auto)")
        missing = {op: table[name]["reason"] for op, table in ops.report().items()
                   if name in table and not table[name]["available"]}
        if missing:
            op, why = next(iter(missing.items()))
            raise UsageError(f"{option} {name}: unavailable for {', '.join(missing)} ({op}: {why})")
    ops.set_backend(name)


# ----------------------------------------------------------------------------------------------
# output paths
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi")  # containers for longvideo.video's libx264 stream


def check_folder(folder, option: str = "--out", given=None) -> Path:
    """`folder` exists as a writable folder or can be created (nothing is created here); the
    message names `option` with `given` (what the user typed; default `folder`)."""
    folder = Path(folder)
    given = folder if given is None else given
    probe = folder.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{option} {given}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {given}: the folder {probe} is not writable")
    return folder


def output_file(out, default_name: str, suffixes=None, option: str = "--out") -> Path:
    """The file a command writes: `out` (default `default_name`); a folder, or a name without a
    suffix, gets `default_name` inside it. Checked before any work: the suffix (one of `suffixes`,
    if given) and that the file can be written."""
    path = Path(out) if out else Path(default_name)
    if suffixes and not path.is_dir() and path.name.lower() in suffixes:  # "dir/.mp4": a name that is only a suffix
        raise UsageError(f"{option} {out}: the file name is only a suffix; name the file, e.g. "
                         f"{path.with_name('video' + path.name)}")
    if path.is_dir() or not path.suffix:
        path = path / default_name
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {path}: a video needs one of the suffixes {' '.join(suffixes)}")
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder")
    check_folder(path.parent, option, given=path)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path}: the file is not writable")
    return path


def output_folder(out, default: str, option: str = "--out") -> Path:
    """The folder a command writes into (`out`, default `default`), checked as output_file."""
    path = Path(out or default)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, not a folder")
    return check_folder(path, option)


def input_file(path, option: str) -> Path:
    """A file the user names as input: it must exist and be a readable file."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {path}: no such file")
    if p.is_dir():
        raise UsageError(f"{option} {path}: is a folder, not a file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{option} {path}: not readable")
    return p


# ----------------------------------------------------------------------------------------------
# checkpoint families (model_index.json's _class_name)
PIPELINE_FAMILIES = (  # (family, pipeline class-name prefix), the more specific prefix first
    ("skyreels", "SkyReelsV2"), ("wan", "Wan"), ("animatediff", "AnimateDiff"), ("cogvideox", "CogVideoX"),
    ("sdxl", "StableDiffusionXL"), ("sd15", "StableDiffusion"))
FAMILY_NAMES = {"skyreels": "SkyReels-V2", "wan": "Wan", "wan22": "Wan 2.2 A14B (two experts)",
                "wan22_ti2v": "Wan 2.2 TI2V-5B (per-token timesteps)",
                "wan_i2v": "Wan 2.1 I2V", "wan22_i2v": "Wan 2.2 A14B I2V",
                "animatediff": "AnimateDiff", "cogvideox": "CogVideoX", "sdxl": "SDXL", "sd15": "SD1.5"}


def pipeline_class(model, option: str = "--model") -> str:
    """The pipeline class named by the checkpoint folder's model_index.json."""
    return str(model_index(model, option).get("_class_name") or "")


def model_index(model, option: str = "--model") -> dict:
    """The checkpoint folder's model_index.json as a dict (UsageError naming `option` if unreadable)."""
    folder = Path(model)
    if not folder.exists():
        raise UsageError(f"{option} {model}: no such folder (only local diffusers checkpoints are loaded)")
    if not folder.is_dir():
        raise UsageError(f"{option} {model}: not a diffusers checkpoint folder")
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except OSError as exc:
        raise UsageError(f"{option} {model}: no readable model_index.json ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UsageError(f"{option} {model}: model_index.json is not valid JSON ({exc})") from None
    if not isinstance(index, dict):
        raise UsageError(f"{option} {model}: model_index.json is not a JSON object")
    return index


def checkpoint_family(model, accepted, command: str, option: str = "--model") -> str:
    """The family of the checkpoint folder `model` (one of `accepted`), from its model_index.json;
    a UsageError naming what `command` runs otherwise. A Wan pipeline whose index names a
    ``transformer_2`` and a ``boundary_ratio`` is Wan 2.2 A14B ("wan22"); where `accepted` has no
    "wan22" but has "wan", it is loaded as "wan" (the same WanPipeline loading, both experts). One
    whose index has ``expand_timesteps`` true is Wan 2.2 TI2V ("wan22_ti2v"), refused where
    `accepted` has no "wan22_ti2v" (the Wan 2.1 loaders would take it with the wrong trained length,
    and WanVideoToVideoPipeline reads its 16x VAE as 8x). A
    ``WanImageToVideoPipeline`` (without ``expand_timesteps``) is "wan_i2v" (Wan 2.1 I2V) or, with two
    experts, "wan22_i2v"."""
    from ..models.wan22 import is_two_expert_index
    from ..models.wan22_ti2v import is_ti2v_index

    index = model_index(model, option)
    cls = str(index.get("_class_name") or "")
    family = next((fam for fam, prefix in PIPELINE_FAMILIES if cls.startswith(prefix)), None)
    if family == "wan" and is_ti2v_index(index):
        family = "wan22_ti2v"
    elif cls == "WanImageToVideoPipeline":  # image-to-video: never loaded as a text-to-video pipeline
        family = "wan22_i2v" if is_two_expert_index(index) else "wan_i2v"
    elif family == "wan" and is_two_expert_index(index):
        family = "wan22" if "wan22" in accepted or "wan" not in accepted else "wan"
    if family not in accepted:
        runs = ", ".join(FAMILY_NAMES[f] for f in accepted)
        what = f"{FAMILY_NAMES[family]} ({cls})" if family == "wan22_ti2v" else (cls or "unnamed")
        raise UsageError(f"{option} {model}: holds a {what} pipeline; {command} runs {runs} checkpoints")
    return family


def load_pipeline(args, family: str, kind: str, dtype=None, seed: int = 0):
    """longvideo.models.load_pipeline for --model (None: the built-in tiny model) on args.device;
    a checkpoint that cannot be loaded is a UsageError."""
    from ..models import load_pipeline as load

    errors = (ValueError,) if args.model is None else (ValueError, RuntimeError, OSError)
    with user_errors(*errors):
        return load(family, kind, model=args.model, device=args.device, dtype=dtype, seed=seed)


# ----------------------------------------------------------------------------------------------
# what a run uses, said before it starts; options that do not apply; sizes the model accepts
def backend_setting() -> str:
    """The ops' backend setting in force (--backend / $LONGVIDEO_BACKEND / auto): one name, or
    op=name pairs where the ops differ."""
    from ..ops import _registry

    ops_ = ("lowfreq_mix", "consistent_attention", "tiered_sparse_attention")
    names = {op: _registry.current_setting(op) for op in ops_}
    if len(set(names.values())) == 1:
        return next(iter(names.values()))
    return ",".join(f"{op}={name}" for op, name in names.items())


def settings_line(**settings) -> str:
    """ONE line with the settings a run actually uses (defaults resolved), printed before it
    starts: ``settings: size=WxH frames=... steps=... window=... dtype=... device=... backend=...``
    (a None value is left out)."""
    def text(value):
        return str(value).replace("torch.", "")

    return "settings: " + " ".join(f"{k}={text(v)}" for k, v in settings.items() if v is not None)


def print_settings(**settings) -> None:
    print(settings_line(**settings), flush=True)


def refuse_inapplicable(args, parser_builder, applies, what: str) -> None:
    """UsageError for an option given with a value other than its default that does not apply.

    parser_builder(p) adds the command's options to a parser p (the command's add_arguments);
    applies(dest) -> bool says whether the option with that destination applies to the run;
    `what` names the run in the message (e.g. "--method direct")."""
    p = argparse.ArgumentParser(add_help=False)
    parser_builder(p)
    for action in p._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        if getattr(args, action.dest, action.default) != action.default and not applies(action.dest):
            raise UsageError(f"{action.option_strings[0]} does not apply to {what}")


def check_size_multiple(height, width, multiple: int, why: str) -> None:
    """--height / --width divisible by the model's `multiple` (VAE scale x patch size), else a
    UsageError naming the option (before any denoising)."""
    for option, value in (("--height", height), ("--width", width)):
        if value is not None and value % multiple:
            raise UsageError(f"{option} {value}: must be divisible by {multiple} for this model ({why})")


def checkpoint_size_multiple(model, family: str) -> Optional[tuple]:
    """(multiple, why) of a local checkpoint folder, read from its config files before any weight is
    loaded: Wan / SkyReels-V2: the VAE's scale_factor_spatial (else 2^len(temperal_downsample)) x
    transformer patch_size[1];
    AnimateDiff / CogVideoX / SD: 2^(len(vae block_out_channels) - 1) (x the transformer's
    patch_size where it has one). None where the files do not say."""
    folder = Path(model)

    def config(sub):
        try:
            return json.loads((folder / sub / "config.json").read_text())
        except (OSError, ValueError):
            return None

    tr = config("transformer")
    return config_size_multiple(config("vae"), tr if isinstance(tr, dict) else None)


def config_size_multiple(vae, transformer=None) -> Optional[tuple]:
    """(multiple, why) from a VAE's config dict and the transformer's (None for a UNet), as
    :func:`checkpoint_size_multiple` reads them; None where the VAE config does not say."""
    if not isinstance(vae, dict):
        return None
    if vae.get("scale_factor_spatial"):  # Wan 2.2's VAE: 8x in its blocks after a 2x2 patchify = 16
        scale = int(vae["scale_factor_spatial"])
    elif "temperal_downsample" in vae:
        scale = 2 ** len(vae["temperal_downsample"])
    elif "block_out_channels" in vae:
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    else:
        return None
    patch = transformer.get("patch_size") if isinstance(transformer, dict) else None
    return _multiple(scale, patch)


def _multiple(scale: int, patch) -> tuple:
    """(multiple, why) from the VAE's spatial scale and the transformer's patch size (None for a
    UNet). Video transformers with a 3-D patch (Wan, SkyReels-V2) also need what their diffusers
    pipelines check: multiples of 16."""
    video_patch = isinstance(patch, (list, tuple)) and len(patch) == 3
    if isinstance(patch, (list, tuple)):
        patch = patch[1] if len(patch) == 3 else patch[0]
    if not isinstance(patch, int) or patch < 1:
        return scale, f"VAE scale {scale}"
    why = f"VAE scale {scale} x patch size {patch}"
    if video_patch and (scale * patch) % 16:
        return math.lcm(16, scale * patch), why + "; the Wan pipelines take multiples of 16"
    return scale * patch, why


def pipeline_size_multiple(pipe) -> tuple:
    """(multiple, why) of a loaded pipeline: the VAE's spatial scale times the transformer's spatial
    patch size (Wan: 8 x 2 = 16), the VAE's scale for UNets."""
    scale = int(getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 8)
    patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
    return _multiple(scale, patch)


def check_sizes_before_loading(args, family: str) -> None:
    """With --model, --height / --width checked against the checkpoint's config files before any
    weight is loaded (the loaded pipeline is checked again: pipeline_size_multiple)."""
    if args.model is None or (args.height is None and args.width is None):
        return
    found = checkpoint_size_multiple(args.model, family)
    if found is not None:
        check_size_multiple(args.height, args.width, *found)
