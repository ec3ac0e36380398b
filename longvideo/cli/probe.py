"""``longvideo probe``: FreeLOC's layer probing on a Wan pipeline -> layer configuration JSON
(for ``longvideo generate --method freeloc --freeloc-layers FILE``)."""
from __future__ import annotations

import json

from ._common import (UsageError, add_common_generation, apply_backend, output_file, positive_int, real,
                      resolve_device, unit_interval, user_errors)
from .generate_freeloc import load_wan

HELP = "FreeLOC layer probing -> layer configuration JSON"
TSA_RULES = ("most_sensitive", "least_sensitive")   # longvideo.methods.probe.TSA_RULES
DEFAULT_TSA_FRACTION = 17 / 30                      # longvideo.methods.probe.DEFAULT_TSA_FRACTION
EXPERTS = ("transformer", "transformer_2")          # longvideo.methods.probe.EXPERTS


def add_arguments(p) -> None:
    add_common_generation(p)
    g = p.add_argument_group("probe")
    g.add_argument("--probe-shifts", default="20,-20,40,-40",
                   help="temporal key-position shifts for position sensitivity (frames)")
    g.add_argument("--probe-window", type=positive_int, default=None,
                   help="local window (latent frames) for context sensitivity (default: local tier, 8 at L=21)")
    g.add_argument("--probe-tsa-fraction", type=unit_interval, default=DEFAULT_TSA_FRACTION,
                   help="share of layers that get TSA (default 17/30, as published for Wan2.1-1.3B)")
    g.add_argument("--probe-context-threshold", type=real(), default=None,
                   help="instead of a share: TSA for layers with context sensitivity >= this")
    g.add_argument("--probe-position-threshold", type=real(), default=0.0,
                   help="non-TSA layers with position sensitivity below this stay dense (default 0: all VRPR)")
    g.add_argument("--probe-tsa-rule", default="most_sensitive", choices=TSA_RULES,
                   help="TSA for the most (the paper's rule) or the least context-sensitive layers")
    g.add_argument("--probe-expert", default="transformer", choices=EXPERTS,
                   help="Wan 2.2 A14B: which expert to probe (transformer_2: the low-noise expert, for "
                        "--freeloc-layers-2)")
    g.add_argument("--probe-trained-frames", type=positive_int, default=None,
                   help="the model's trained length in latent frames (default 21; tiny model 3)")


def shifts(text) -> list:
    try:
        return [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--probe-shifts must be comma-separated numbers, got {text!r}") from None


def run(args) -> int:
    """Measure the layers, print a table, write the layer configuration JSON."""
    from ..methods.probe import probe_layers, write_layer_config

    args.device = resolve_device(args.device)
    apply_backend(args.backend, args.device)
    shift_list = shifts(args.probe_shifts)
    path = output_file(args.out, "freeloc_layers.json")
    tiny = args.model is None
    pipe = load_wan(args, "`longvideo probe`")
    with user_errors():
        result = probe_layers(
            pipe, prompt=args.prompt, num_frames=args.num_frames, height=args.height or (32 if tiny else None),
            width=args.width or (32 if tiny else None), num_inference_steps=args.steps or (2 if tiny else 4),
            guidance_scale=args.guidance_scale if args.guidance_scale is not None else 5.0, seed=args.seed,
            shifts=shift_list, window=args.probe_window, trained_frames=args.probe_trained_frames, progress=True,
            expert=args.probe_expert)
        write_layer_config(path, result, tsa_fraction=args.probe_tsa_fraction,
                           context_threshold=args.probe_context_threshold,
                           position_threshold=args.probe_position_threshold, tsa_rule=args.probe_tsa_rule)
    config = json.loads(path.read_text())
    print(f"{'layer':>5} {'position':>10} {'context':>10}  mode")
    for i, mode in enumerate(config["layers"]):
        print(f"{i:>5} {result.position[i]:>10.4f} {result.context[i]:>10.4f}  {mode}")
    print(config["probe"]["rule"])
    option = "--freeloc-layers-2" if args.probe_expert == "transformer_2" else "--freeloc-layers"
    print(f"wrote {path}  (use: longvideo generate --method freeloc {option} {path})")
    return 0
