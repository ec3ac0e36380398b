"""``longvideo generate --image IMG``: the first frame of an image-to-video run (Wan 2.1 I2V, Wan
2.2 A14B I2V; on Wan 2.2 TI2V-5B its image mode). The file is checked while the command line is
parsed (it exists, is readable and is an image PIL can decode: one line ``longvideo: error:
argument --image: ...`` otherwise); the video size follows the diffusers Wan I2V example's rule
(:func:`video_size`)."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

I2V_FAMILIES = ("wan_i2v", "wan22_i2v")          # image required
IMAGE_FAMILIES = I2V_FAMILIES + ("wan22_ti2v",)  # image taken (Wan 2.2 TI2V-5B: its optional image mode)
I2V_METHODS = ("direct", "freeloc", "fifo")  # ouroboros' SACFA / guidance processors take no image projections


def image_file(text: str) -> str:
    """argparse type: a readable image file (PIL opens and verifies it); the path is returned."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder, not an image file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        why = "not an image PIL can read" if isinstance(exc, UnidentifiedImageError) else f"unreadable image ({exc})"
        raise argparse.ArgumentTypeError(f"{text}: {why}") from None
    return text


image_file.__name__ = "image file"


def add_argument(p) -> None:
    p.add_argument("--image", type=image_file, default=None, metavar="IMG",
                   help="image-to-video: the first frame (Wan 2.1 I2V / Wan 2.2 A14B I2V checkpoints, Wan 2.2 "
                        "TI2V-5B's image mode; without --model the built-in tiny Wan 2.1 I2V model, or the "
                        "--fifo-family one); methods direct, freeloc, fifo. Without "
                        "--height/--width the video keeps the image's aspect ratio at the model's default area")


def load(path: str):
    """The image as an RGB PIL image (decoded; the file was checked at parse time)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def video_size(image, area: int, multiple: int) -> tuple:
    """(height, width) of the video for `image`, as diffusers' Wan I2V example computes it: the
    image's aspect ratio at an area of `area` pixels, each side rounded and floored to a multiple
    of `multiple` (the VAE's spatial factor x the patch size), at least `multiple`. The pipeline
    then resizes the image to that size itself."""
    aspect = image.height / image.width
    height = round(math.sqrt(area * aspect)) // multiple * multiple
    width = round(math.sqrt(area / aspect)) // multiple * multiple
    return max(height, multiple), max(width, multiple)


def check_family(args, family: str, what: str) -> None:
    """--image given for an image-to-video family, and only then (UsageError naming the model)."""
    from ._common import UsageError

    model = f"--model {args.model}" if args.model else f"the built-in tiny {family} model"
    if args.image is not None and family not in IMAGE_FAMILIES:
        raise UsageError(f"--image: {model} is a text-to-video model ({family}); {what} takes --image with Wan 2.1 "
                         "I2V, Wan 2.2 A14B I2V and Wan 2.2 TI2V-5B checkpoints")
    if args.image is None and family in I2V_FAMILIES:
        raise UsageError(f"{model} is an image-to-video model: give the first frame with --image IMG")
