"""FreeLOC on diffusers Wan pipelines: any length, any resolution (docs/methods.md, docs/fidelity.md).

FreeLOC (Westlake AGI Lab, CVPR 2026, arXiv 2603.25209) extends a video DiT beyond the length it
was trained on, without training, with two changes to self-attention, chosen per layer:

- VRPR (video relative position re-encoding) on the temporal RoPE axis: frame distances |d| < W1
  keep their positions, W1 <= |d| < W2 are grouped by G1 and |d| >= W2 by G2 (coarser), so every
  relative distance the model sees stays within the trained range (the far band is clipped at
  `clip`, the largest trained position);
- TSA (tiered sparse attention): frames closer than `local_frames` attend densely, frames closer
  than `stripe_frames` only through a spatial stripe |p - p'| < `stripe_width`, and every query
  attends the first frame (attention sink).

"vrpr" layers get dense attention with VRPR, "tsa" layers the tiers + VRPR, "dense" layers are
left alone. Both run in one ``torch.ops.longvideo.tiered_sparse_attention`` call per layer
(the official code needs three FlexAttention calls merged by log-sum-exp).

Usage::

    pipe = longvideo.models.load_pipeline("wan", model="path/to/Wan2.1-T2V-1.3B-Diffusers")
    with longvideo.FreeLOC(pipe) as freeloc:         # or apply_freeloc(pipe); .remove() undoes it
        video = pipe(prompt="...", num_frames=321).frames[0]

Parameters (:func:`derive_params`): the official values where they exist and one rule for every
other length, from the model's trained length L (21 latent frames for Wan 2.1/2.2, i.e. 81 video
frames) and the video's latent length F:

- F <= L: FreeLOC is a no-op (every layer runs the original processor, original positions).
- W1, W2: the official table, normalised by L and read as a function of r = F / L, is
  interpolated linearly: r = 1 -> (W1, W2) = (L, L) (nothing re-encoded), r = 41/21 -> (12, 20)
  * L/21, r = 81/21 -> (10, 14) * L/21, and held constant beyond r = 81/21. Rounded, W1 >= 1,
  W2 >= W1.
- G1 = 2 (official). clip = L - 1 (the largest trained position; 20 for Wan).
- G2 = max(round(8 L / 21), G1, round((F - 1 - W2) / (clip - W2 + (W2 - W1) // G1))): the
  official 8, grown for longer videos so that the largest far-band distance, about
  (F-1)/G2 + W2 - W2/G2 - (W2-W1)/G1, stays near `clip` instead of being clipped wholesale.
  At L = 21 this reproduces the official table exactly: F = 41 -> (12, 20, 2, 8), F = 81 ->
  (10, 14, 2, 8); F = 121 (481 frames) -> (10, 14, 2, 13).
- Tiers (frames of context, properties of the trained model, not of F): local = round(8 L / 21),
  stripe = round(24 L / 21) (official 8 / 24 at L = 21), stripe width = 1/8 of a frame's tokens
  (official 195 of 1560 at 832x480), sink = the first latent frame.

Any explicit value (``w1=``, ``g2=``, ``local_frames=``, ``stripe_width=`` ...) overrides the
rule.

Semantics (``semantics=``; docs/fidelity.md has the measured differences):

- ``"official"`` (default): the self-attention of FreeLOC's released code (Wan2.1 fork, commit
  af7daa8), which produced the published results; T = tokens per latent frame, and
  ceil128(x) = the next multiple of 128 at or above x (the code's ``round_to_multiple``):
  * VRPR layers: bands by TOKEN distance |i - j|: exact band |i - j| <= (W1 - 1) T (the code's
    flash-attention window; it hard-codes T = 1560 there, scaled here), mid band
    ceil128(W1 T) <= |i - j| < ceil128(W2 T), far band beyond; the keys in between are in no band
    (the band gap, ~1.5 frames per query). Mid-band shift M = floor(W1 - W1 / G1) (the code's
    float arithmetic), the far band as in the paper.
  * TSA layers: no VRPR. Plain temporal RoPE for |i - j| <= ceil128(local T) (a token window),
    for the stripe ceil128(local T) < |i - j| <= ceil128(stripe T) with |p(i) - p(j)| < w,
    w = floor(((stripe - local) // (local / 2)) / (stripe - local) * T / 2) (195 at 1560), and for
    sink keys j < ceil128(T) within ceil128(stripe T) tokens; sink keys further away get query
    position f // G + M and key position f // G (G = 8, M = floor(12 - 12 / 8) = 10: the code's
    ``rope_shift``); late keys j > ceil128(J_f T) more than ceil128(stripe T) tokens after the
    query get the mirrored positions (query f // G, key f // G + M).
    The code hard-codes J_f = 78 (for 81 latent frames: the last 3 frames; at 41 frames the
    constant lies past the video and no key is late). Generalised: J_f = F - 3 (3 scaled by
    L / 21) for F >= 4 L - 3 (81 at L = 21, the length the constant was written for), no late
    keys below. At L = 21 this is the code exactly at F = 41 and F = 81.
  At other trained lengths L the frame counts 8, 24, 12 (G = 8) scale by L / 21 as the tiers.
- ``"paper"``: the paper's definition at frame granularity (bands and tiers by frame distance,
  every key in exactly one band, VRPR positions on every TSA tier, the first frame as the sink). Layer configuration: :func:`load_layer_config` (JSON, see there); the default for a
Wan2.1-1.3B-shaped transformer is the published list (TSA on 17 layers, VRPR on the others);
other models default to VRPR on every layer until probed (``longvideo probe``).

Wan 2.2 A14B (``transformer`` the high-noise expert, ``transformer_2`` the low-noise expert):
both experts get FreeLOC's processors, each with its own layer configuration
(``layer_config`` for ``transformer``, ``layer_config_2`` for ``transformer_2``; None: the first
expert's modes), since the two experts are separately trained models whose layers need not be
sensitive in the same places; ``longvideo probe --probe-expert transformer_2`` measures the
second one (docs/methods.md, FreeLOC).
"""
from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..hooks import PatchHandle
from ..processors.wan import MODES, TieredAttentionSettings, patch_tiered_processors, self_attention_modules

# ---------------------------------------------------------------------------------------------
# official values (the released code, commit af7daa8; docs/fidelity.md)
WAN_TRAINED_LATENT_FRAMES = 21
OFFICIAL_VRPR = {41: (12, 20, 2, 8), 81: (10, 14, 2, 8)}  # latent frames -> (W1, W2, G1, G2)
OFFICIAL_CLIP = 20
OFFICIAL_LOCAL_FRAMES = 8
OFFICIAL_STRIPE_FRAMES = 24
OFFICIAL_STRIPE_FRACTION = 1.0 / 8.0
OFFICIAL_SINK_FRAMES = 1
OFFICIAL_G1 = 2
OFFICIAL_G2 = 8
# the released TSA layers' sink re-encoding (rope_shift group 8, window 12) and late keys (frames >= 78 of 81)
OFFICIAL_SINK_GROUP = 8
OFFICIAL_SINK_WINDOW = 12
OFFICIAL_LATE_FRAMES = 3
SEMANTICS = ("official", "paper")
# Released layer configuration for Wan2.1-T2V-1.3B (30 layers): TSA (+VRPR) on these, VRPR on the rest.
WAN21_1_3B_TSA_LAYERS = (0, 1, 4, 6, 7, 9, 10, 11, 13, 14, 15, 16, 18, 22, 23, 24, 25)
WAN21_1_3B_SHAPE = dict(num_layers=30, num_attention_heads=12, attention_head_dim=128)

# (r = F / L, W1 / L, W2 / L) anchors of the interpolation rule
_ANCHORS = ((1.0, 1.0, 1.0), (41 / 21, 12 / 21, 20 / 21), (81 / 21, 10 / 21, 14 / 21))

LAYER_CONFIG_FORMAT = "longvideo.freeloc.layers/1"
_CONFIG_KEYS = {"format", "model", "num_layers", "layers", "default", "tsa_layers", "vrpr_layers", "dense_layers",
                "probe", "note"}


@dataclass(frozen=True)
class FreeLOCParams:
    """FreeLOC's parameters for one video length (latent frames)."""

    num_frames: int          # latent frames F
    trained_frames: int      # latent frames L the model was trained on
    w1: int
    w2: int
    g1: int
    g2: int
    clip: int
    local_frames: int
    stripe_frames: int
    stripe_fraction: float   # stripe width as a fraction of a frame's tokens
    stripe_width: Optional[int]  # explicit width in tokens (overrides the fraction)
    sink_frames: int
    semantics: str = "official"  # "official" (the released code) or "paper" (module docstring)

    @property
    def vrpr(self) -> tuple:
        return (self.w1, self.w2, self.g1, self.g2, self.clip)

    def stripe_tokens(self, frame_tokens: int) -> int:
        if self.stripe_width is not None:
            return int(self.stripe_width)
        return max(1, int(round(frame_tokens * self.stripe_fraction)))

    # the official (released-code) layout ------------------------------------------------------
    def official_stripe_tokens(self, frame_tokens: int) -> int:
        """The released code's stripe half-width: |p - p'| < floor(band / (D2 - D1) * T / 2) with
        band = (D2 - D1) // (D1 / 2) in floating point (195 at D1 = 8, D2 = 24, T = 1560)."""
        if self.stripe_width is not None:
            return int(self.stripe_width)
        d1, d2 = self.local_frames, self.stripe_frames
        if d2 <= d1:
            return 0
        band = (d2 - d1) // (d1 / 2)
        return int((band / (d2 - d1) * frame_tokens) // 2)

    def official_sink_rope(self) -> tuple[int, int]:
        """(G, M) of the released TSA sink re-encoding: query f // G + M, key f // G (8, 10 at L = 21)."""
        scale = self.trained_frames / WAN_TRAINED_LATENT_FRAMES
        g = max(1, _round(OFFICIAL_SINK_GROUP * scale))
        w = max(1, _round(OFFICIAL_SINK_WINDOW * scale))
        return g, w - (-(-w // g))  # floor(w - w / g) = w - ceil(w / g)

    def official_late_frame(self) -> Optional[int]:
        """First frame J_f of the late keys (j > ceil128(J_f T)); None below 4 L - 3 frames."""
        L = self.trained_frames
        if self.num_frames < 4 * L - 3:
            return None
        return self.num_frames - max(1, _round(OFFICIAL_LATE_FRAMES * L / WAN_TRAINED_LATENT_FRAMES))

    def official_token_bands(self, frame_tokens: int) -> tuple[int, int, int]:
        """[E, B1, B2] of the released VRPR layers: ((W1 - 1) T, ceil128(W1 T), ceil128(W2 T))."""
        T = frame_tokens
        return (self.w1 - 1) * T, _ceil128(self.w1 * T), _ceil128(self.w2 * T)

    def official_token_tiers(self, frame_tokens: int) -> tuple[int, int, int, int]:
        """[L, St, K, J] of the released TSA layers (module docstring)."""
        T = frame_tokens
        late = self.official_late_frame()
        last = self.num_frames * T - 1  # j > last: no late key
        return (_ceil128(self.local_frames * T), _ceil128(self.stripe_frames * T),
                _ceil128(self.sink_frames * T) if self.sink_frames > 0 else 0,
                last if late is None else _ceil128(late * T))

    def settings(self, mode: str, frame_tokens: int) -> Optional[TieredAttentionSettings]:
        """The op arguments of a layer in `mode` ("dense": None, i.e. the original processor)."""
        if self.semantics == "official":
            if mode == "vrpr":
                mid = self.w1 - (-(-self.w1 // self.g1))  # floor(W1 - W1 / G1), as the code's float arithmetic
                return TieredAttentionSettings(local_frames=self.num_frames, vrpr=self.vrpr + (mid,),
                                               token_bands=self.official_token_bands(frame_tokens))
            if mode == "tsa":
                return TieredAttentionSettings(local_frames=1, stripe_width=self.official_stripe_tokens(frame_tokens),
                                               sink_frames=0, token_tiers=self.official_token_tiers(frame_tokens),
                                               sink_rope=self.official_sink_rope())
            return None
        if mode == "vrpr":
            return TieredAttentionSettings(local_frames=self.num_frames, vrpr=self.vrpr)
        if mode == "tsa":
            return TieredAttentionSettings(local_frames=self.local_frames, stripe_frames=self.stripe_frames,
                                           stripe_width=self.stripe_tokens(frame_tokens),
                                           sink_frames=self.sink_frames, vrpr=self.vrpr)
        return None

    def to_dict(self) -> dict:
        return asdict(self)


_OVERRIDES = ("w1", "w2", "g1", "g2", "clip", "local_frames", "stripe_frames", "stripe_width", "stripe_fraction",
              "sink_frames")


def _check_int(name, value, minimum):
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise ValueError(f"FreeLOC: {name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"FreeLOC: {name} must be >= {minimum}, got {value}")
    return int(value)


def _interp(r: float) -> tuple[float, float]:
    if r >= _ANCHORS[-1][0]:
        return _ANCHORS[-1][1], _ANCHORS[-1][2]
    for (r0, a0, b0), (r1, a1, b1) in zip(_ANCHORS, _ANCHORS[1:]):
        if r <= r1:
            t = (r - r0) / (r1 - r0)
            return a0 + t * (a1 - a0), b0 + t * (b1 - b0)
    raise AssertionError("unreachable")


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up (Python's round() is half-to-even)


def _ceil128(x: int) -> int:
    """The released code's round_to_multiple: the next multiple of 128 at or above x."""
    return -(-int(x) // 128) * 128


def derive_params(num_frames: int, trained_frames: int = WAN_TRAINED_LATENT_FRAMES, semantics: str = "official",
                  **overrides) -> Optional[FreeLOCParams]:
    """FreeLOC's parameters for `num_frames` latent frames (None: no-op, F <= trained length).

    The rule is the module docstring's; `semantics` "official" | "paper" selects how the layers
    use them (:meth:`FreeLOCParams.settings`); keyword overrides (``w1 w2 g1 g2 clip local_frames
    stripe_frames stripe_width stripe_fraction sink_frames``) replace derived values. Raises
    ValueError for an unknown override or an invalid value.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"FreeLOC: semantics must be one of {SEMANTICS}, got {semantics!r}")
    unknown = set(overrides) - set(_OVERRIDES)
    if unknown:
        raise ValueError(f"FreeLOC: unknown parameter(s) {sorted(unknown)}; known: {list(_OVERRIDES)}")
    F = _check_int("num_frames", num_frames, 1)
    L = _check_int("trained_frames", trained_frames, 1)
    ov = {k: v for k, v in overrides.items() if v is not None}
    if F <= L:
        return None
    a, b = _interp(F / L)
    w1 = _check_int("w1", ov["w1"], 1) if "w1" in ov else max(1, _round(a * L))
    w2 = _check_int("w2", ov["w2"], 1) if "w2" in ov else max(w1, _round(b * L))
    if w2 < w1:
        raise ValueError(f"FreeLOC: W1={w1} must be <= W2={w2}")
    g1 = _check_int("g1", ov["g1"], 1) if "g1" in ov else OFFICIAL_G1
    clip = _check_int("clip", ov["clip"], 0) if "clip" in ov else L - 1
    if "g2" in ov:
        g2 = _check_int("g2", ov["g2"], 1)
    else:
        g2 = max(_round(OFFICIAL_G2 * L / WAN_TRAINED_LATENT_FRAMES), g1)
        room = clip - w2 + (w2 - w1) // g1
        if room > 0:
            g2 = max(g2, _round((F - 1 - w2) / room))
    local = (_check_int("local_frames", ov["local_frames"], 1) if "local_frames" in ov
             else max(1, _round(OFFICIAL_LOCAL_FRAMES * L / WAN_TRAINED_LATENT_FRAMES)))
    stripe = (_check_int("stripe_frames", ov["stripe_frames"], 0) if "stripe_frames" in ov
              else max(local, _round(OFFICIAL_STRIPE_FRAMES * L / WAN_TRAINED_LATENT_FRAMES)))
    width = _check_int("stripe_width", ov["stripe_width"], 0) if "stripe_width" in ov else None
    fraction = float(ov.get("stripe_fraction", OFFICIAL_STRIPE_FRACTION))
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"FreeLOC: stripe_fraction must be in (0, 1], got {fraction}")
    sink = _check_int("sink_frames", ov["sink_frames"], 0) if "sink_frames" in ov else OFFICIAL_SINK_FRAMES
    return FreeLOCParams(F, L, w1, w2, g1, g2, clip, local, stripe, fraction, width, sink, semantics)


# ---------------------------------------------------------------------------------------------
# layer configuration
def _transformers(pipe) -> list:
    """The pipeline's Wan transformers (Wan 2.2 A14B has a second, low-noise expert)."""
    found = [getattr(pipe, name, None) for name in ("transformer", "transformer_2")]
    found = [t for t in found if t is not None]
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no `transformer`: FreeLOC needs a Wan-family pipeline")
    return found


def is_wan21_1_3b(transformer) -> bool:
    cfg = getattr(transformer, "config", None)
    return cfg is not None and all(cfg.get(k) == v for k, v in WAN21_1_3B_SHAPE.items())


def published_layer_config(num_layers: int = 30) -> list[str]:
    """The released Wan2.1-1.3B configuration: TSA on WAN21_1_3B_TSA_LAYERS, VRPR elsewhere."""
    return ["tsa" if i in WAN21_1_3B_TSA_LAYERS else "vrpr" for i in range(num_layers)]


def _mode(value, where) -> str:
    if not isinstance(value, str) or value.lower() not in MODES:
        raise ValueError(f"FreeLOC layer config: {where} must be one of {MODES}, got {value!r}")
    return value.lower()


def _index(value, num_layers, where) -> int:
    try:
        i = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"FreeLOC layer config: {where} has a non-integer layer index {value!r}") from None
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"FreeLOC layer config: {where} has a non-integer layer index {value!r}")
    if not 0 <= i < num_layers:
        raise ValueError(f"FreeLOC layer config: layer index {i} in {where} is out of range for a model with "
                         f"{num_layers} layers (0..{num_layers - 1})")
    return i


def load_layer_config(config, num_layers: int) -> list[str]:
    """Per-layer modes ("dense" | "vrpr" | "tsa") from a configuration, validated.

    `config` is one of: a path to a JSON file; the string "wan2.1-1.3b" (the published list);
    a list of modes, one per layer; or a dict (the JSON format)::

        {"format": "longvideo.freeloc.layers/1",      # optional
         "num_layers": 30,                           # optional, checked against the model
         "layers": ["tsa", "tsa", "vrpr", ...]        # one mode per layer, or
         "layers": {"0": "tsa", "7": "dense"},        #   a map index -> mode (others: "default")
         "tsa_layers": [0, 1, 4], "vrpr_layers": [...], "dense_layers": [...],  # or index lists
         "default": "vrpr",                          # mode of unlisted layers (default "vrpr")
         "model": "...", "probe": {...}, "note": "..."}  # informative (written by the probe)

    Unknown keys, unknown modes, out-of-range or repeated layer indices and a wrong layer count
    raise ValueError naming the offending entry.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    source = "layer config"
    if isinstance(config, (str, os.PathLike)) and str(config).lower() in ("wan2.1-1.3b", "published"):
        if num_layers != 30:
            raise ValueError(f"FreeLOC layer config: the published Wan2.1-1.3B list is for 30 layers, the model has "
                             f"{num_layers}")
        return published_layer_config(num_layers)
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"FreeLOC layer config file not found: {path}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"FreeLOC layer config {path} is not valid JSON: {exc}") from exc
        source = str(path)
    if isinstance(config, (list, tuple)):
        config = {"layers": list(config)}
    if not isinstance(config, dict):
        raise ValueError(f"FreeLOC layer config must be a path, a list of modes or a dict, got {type(config).__name__}")
    unknown = set(config) - _CONFIG_KEYS
    if unknown:
        raise ValueError(f"FreeLOC layer config ({source}): unknown key(s) {sorted(unknown)}; "
                         f"known keys: {sorted(_CONFIG_KEYS)}")
    fmt = config.get("format", LAYER_CONFIG_FORMAT)
    if fmt != LAYER_CONFIG_FORMAT:
        raise ValueError(f"FreeLOC layer config ({source}): format {fmt!r} is not {LAYER_CONFIG_FORMAT!r}")
    if "num_layers" in config and config["num_layers"] != num_layers:
        raise ValueError(f"FreeLOC layer config ({source}) is for {config['num_layers']} layers, the model has "
                         f"{num_layers}")
    default = _mode(config.get("default", "vrpr"), "default")
    modes: list[Optional[str]] = [None] * num_layers
    layers = config.get("layers")
    lists = [k for k in ("tsa_layers", "vrpr_layers", "dense_layers") if k in config]
    if layers is not None and lists:
        raise ValueError(f"FreeLOC layer config ({source}): give either 'layers' or {lists}, not both")
    if isinstance(layers, list):
        if len(layers) != num_layers:
            raise ValueError(f"FreeLOC layer config ({source}): 'layers' lists {len(layers)} modes, the model has "
                             f"{num_layers} layers")
        modes = [_mode(m, f"layers[{i}]") for i, m in enumerate(layers)]
    elif isinstance(layers, dict):
        for key, m in layers.items():
            i = _index(key, num_layers, "'layers'")
            if modes[i] is not None:
                raise ValueError(f"FreeLOC layer config ({source}): layer {i} is given twice")
            modes[i] = _mode(m, f"layers[{key!r}]")
    elif layers is not None:
        raise ValueError(f"FreeLOC layer config ({source}): 'layers' must be a list or a dict, got "
                         f"{type(layers).__name__}")
    for key in lists:
        if not isinstance(config[key], (list, tuple)):
            raise ValueError(f"FreeLOC layer config ({source}): {key!r} must be a list of layer indices")
        for value in config[key]:
            i = _index(value, num_layers, repr(key))
            if modes[i] is not None:
                raise ValueError(f"FreeLOC layer config ({source}): layer {i} is given twice")
            modes[i] = key.split("_")[0]
    return [m if m is not None else default for m in modes]


def default_layer_config(transformer) -> list[str]:
    n = len(self_attention_modules(transformer))
    if is_wan21_1_3b(transformer):
        return published_layer_config(n)
    warnings.warn("FreeLOC: no published layer configuration for this model; using VRPR on every layer. "
                  "Run `longvideo probe` (or longvideo.methods.probe.probe_layers) to choose TSA layers.",
                  stacklevel=3)
    return ["vrpr"] * n


# ---------------------------------------------------------------------------------------------
# the method
@dataclass(frozen=True)
class FreeLOCConfig:
    """FreeLOC's settings, validated at construction (ValueError naming the field).

    layer_config: the per-layer modes (see :func:`load_layer_config`: a JSON path, "wan2.1-1.3b",
    a list of modes, a dict); None = the pipeline's ``longvideo_freeloc_layers`` if set (the tiny
    model's), else the published list for Wan2.1-1.3B, else VRPR everywhere. A list is checked
    here, a path for existence; layer indices are checked against the model when applied.
    layer_config_2: the low-noise expert's (``transformer_2``, Wan 2.2 A14B) per-layer modes, in the
    same forms; None = the modes of `layer_config`. Refused on a pipeline without transformer_2.
    trained_frames: the model's trained length in latent frames (None: the pipeline's
    ``longvideo_trained_latent_frames``, else 21, Wan's).
    w1 w2 g1 g2 clip local_frames stripe_frames stripe_width stripe_fraction sink_frames: explicit
    values replacing :func:`derive_params`' rule (None: the rule).
    semantics: "official" (default: the released code) or "paper" (the module docstring).
    """

    layer_config: object = None
    trained_frames: Optional[int] = None
    w1: Optional[int] = None
    w2: Optional[int] = None
    g1: Optional[int] = None
    g2: Optional[int] = None
    clip: Optional[int] = None
    local_frames: Optional[int] = None
    stripe_frames: Optional[int] = None
    stripe_width: Optional[int] = None
    stripe_fraction: Optional[float] = None
    sink_frames: Optional[int] = None
    semantics: str = "official"
    layer_config_2: object = None

    def __post_init__(self):
        for field_name in ("layer_config", "layer_config_2"):
            self._check_layers(field_name)
        trained = WAN_TRAINED_LATENT_FRAMES
        if self.trained_frames is not None:
            trained = _check_int("trained_frames", self.trained_frames, 1)
        # the semantics and the override values, on a length where they all apply (ValueError naming the field)
        derive_params(trained + 1, trained, self.semantics, **self.overrides())

    def _check_layers(self, field_name: str) -> None:
        """A layer configuration field: a list becomes a tuple; modes, file existence and type
        checked (ValueError naming the field)."""
        layers = getattr(self, field_name)
        if isinstance(layers, list):
            object.__setattr__(self, field_name, tuple(layers))
            layers = getattr(self, field_name)
        if isinstance(layers, tuple):
            for i, m in enumerate(layers):
                _mode(m, f"{field_name}[{i}]")
        elif isinstance(layers, (str, os.PathLike)):
            if str(layers).lower() not in ("wan2.1-1.3b", "published") and not Path(layers).is_file():
                raise ValueError(f"FreeLOCConfig.{field_name}: file not found: {layers}")
        elif layers is not None and not isinstance(layers, dict):
            raise ValueError(f"FreeLOCConfig.{field_name} must be None, a path, a list of modes or a dict, got "
                             f"{type(layers).__name__}")

    def overrides(self) -> dict:
        """The explicit parameter values (the fields of :data:`_OVERRIDES` that are not None)."""
        return {k: getattr(self, k) for k in _OVERRIDES if getattr(self, k) is not None}


class FreeLOC(PatchHandle):
    """FreeLOC applied to a Wan-family pipeline's self-attention layers (a :class:`PatchHandle`).

    ``FreeLOC(pipe, FreeLOCConfig(...))`` or, equivalently, ``FreeLOC(pipe, layer_config=None,
    trained_frames=None, **overrides)`` with the config's fields as keywords: installs the
    processors at once; call the pipeline as usual (``pipe(prompt=..., num_frames=321)``, or this
    object, which does the same); ``remove()`` (or leaving a ``with`` block) restores the original
    processors. The parameters follow the video length of each call (:func:`derive_params`); at
    or below the trained length nothing changes. A second FreeLOC (or any other patch of the same
    transformer's attention processors) while this one is active raises a ValueError.
    ``lean_wan_forward`` (default True): the handle also gives the Wan transformers longvideo's
    forward (processors/wan_modulation.py: diffusers' output, less memory) until ``remove()``,
    where no offloading hook wraps their forward yet (else a warning; apply FreeLOC, or
    ``apply_lean_wan_forward``, before offloading).
    """

    def __init__(self, pipe, layer_config=None, trained_frames: Optional[int] = None, semantics: str = "official",
                 *, config: Optional[FreeLOCConfig] = None, layer_config_2=None, lean_wan_forward: bool = True,
                 **overrides):
        super().__init__("FreeLOC")
        if isinstance(layer_config, FreeLOCConfig):
            config, layer_config = layer_config, None
        if config is not None:
            if (layer_config is not None or layer_config_2 is not None or trained_frames is not None or overrides
                    or semantics != "official"):
                raise ValueError("FreeLOC: give either a FreeLOCConfig or keyword settings, not both")
            if not isinstance(config, FreeLOCConfig):
                raise ValueError(f"config must be a FreeLOCConfig, got {type(config).__name__}")
        else:
            unknown = set(overrides) - set(_OVERRIDES)
            if unknown:
                raise ValueError(f"FreeLOC: unknown parameter(s) {sorted(unknown)}; known: {list(_OVERRIDES)}")
            config = FreeLOCConfig(layer_config=layer_config, trained_frames=trained_frames, semantics=semantics,
                                   layer_config_2=layer_config_2, **overrides)
        self.config = config
        self.pipe = pipe
        self.transformers = _transformers(pipe)
        trained_frames = config.trained_frames
        if trained_frames is None:
            trained_frames = getattr(pipe, "longvideo_trained_latent_frames", WAN_TRAINED_LATENT_FRAMES)
        self.trained_frames = _check_int("trained_frames", trained_frames, 1)
        self.semantics = config.semantics
        self.overrides = config.overrides()
        # validates the override values once more against this model's trained length
        derive_params(self.trained_frames + 1, self.trained_frames, self.semantics, **self.overrides)
        first = self.transformers[0]
        num_layers = len(self_attention_modules(first))
        layer_config = config.layer_config
        if layer_config is None:
            # a pipeline may name its own default (the built-in tiny model does)
            layer_config = getattr(pipe, "longvideo_freeloc_layers", None)
        self.layer_modes = (default_layer_config(first) if layer_config is None
                            else load_layer_config(list(layer_config) if isinstance(layer_config, tuple)
                                                   else layer_config, num_layers))
        self.expert_layer_modes = [self.layer_modes] + [self._second_expert_modes(config, tr)
                                                        for tr in self.transformers[1:]]
        if len(self.transformers) == 1 and config.layer_config_2 is not None:
            raise ValueError(f"layer_config_2: {type(pipe).__name__} has no transformer_2 (a second, low-noise "
                             "expert, as Wan 2.2 A14B); give layer_config only")
        self._params_cache: dict = {}
        self.last_params: Optional[FreeLOCParams] = None
        try:
            for tr, modes in zip(self.transformers, self.expert_layer_modes):
                patch_tiered_processors(self, tr, [None if m == "dense" else m for m in modes], self._settings)
            if lean_wan_forward:
                # longvideo's Wan forward while the handle is active (the same output, less memory;
                # what the planner assumes): processors/wan_modulation.py
                from ..processors.wan_modulation import lean_wan_forward_where_possible

                for handle in lean_wan_forward_where_possible(pipe, "FreeLOC"):
                    self.on_remove(handle.remove)
        except BaseException:
            self.remove()
            raise

    @property
    def layer_modes_2(self) -> Optional[list]:
        """The low-noise expert's (``transformer_2``) per-layer modes; None without one."""
        return self.expert_layer_modes[1] if len(self.expert_layer_modes) > 1 else None

    def _second_expert_modes(self, config: FreeLOCConfig, transformer) -> list:
        """``transformer_2``'s modes: `config.layer_config_2`, else the first expert's."""
        num_layers = len(self_attention_modules(transformer))
        layers = config.layer_config_2
        if layers is None:
            if num_layers != len(self.layer_modes):
                raise ValueError("layer_config_2: the pipeline's transformers have different layer counts "
                                 f"({len(self.layer_modes)} and {num_layers}); give transformer_2 its own list")
            return list(self.layer_modes)
        return load_layer_config(list(layers) if isinstance(layers, tuple) else layers, num_layers)

    # parameters -----------------------------------------------------------------------------
    def params(self, num_latent_frames: int) -> Optional[FreeLOCParams]:
        """The parameters used for a video of `num_latent_frames` latent frames (None: no-op)."""
        if num_latent_frames not in self._params_cache:
            self._params_cache[num_latent_frames] = derive_params(num_latent_frames, self.trained_frames,
                                                                  self.semantics, **self.overrides)
        return self._params_cache[num_latent_frames]

    def params_for_video(self, num_video_frames: int) -> Optional[FreeLOCParams]:
        """Same, from the number of video frames (Wan: 4k+1 frames -> k+1 latent frames)."""
        factor = getattr(self.pipe, "vae_scale_factor_temporal", 4)
        return self.params((int(num_video_frames) - 1) // factor + 1)

    def _settings(self, mode: str, num_frames: int, frame_tokens: int):
        p = self.params(num_frames)
        self.last_params = p
        return None if p is None else p.settings(mode, frame_tokens)

    # generation -----------------------------------------------------------------------------
    def __call__(self, prompt=None, num_frames: int = 81, **kwargs):
        """Run the pipeline with FreeLOC active: ``pipe(prompt=prompt, num_frames=num_frames, **kwargs)``.

        The diffusers conventions are the pipeline's own (``generator`` a torch.Generator or a
        list, ``output_type`` "np" / "pil" / "pt" / "latent", ``callback_on_step_end``, the
        progress bar of ``pipe.set_progress_bar_config``); the result is returned as a
        :class:`longvideo.methods.outputs.VideoOutput` (``.frames``, batched as diffusers' video
        pipelines return them). check_inputs: `prompt` a non-empty string or a list of them,
        `num_frames` a positive int (ValueError naming the argument); the pipeline checks the rest.
        """
        from .outputs import VideoOutput, check_frame_count, check_prompt

        if not self.active:
            raise RuntimeError("FreeLOC: this handle was removed; apply FreeLOC again to generate with it")
        check_prompt(prompt, allow_list=True)
        check_frame_count(num_frames)
        out = self.pipe(prompt=prompt, num_frames=num_frames, **kwargs)
        return VideoOutput(frames=out.frames if hasattr(out, "frames") else out[0])

    def describe(self, num_video_frames: int) -> str:
        p = self.params_for_video(num_video_frames)
        def count(modes):
            return ", ".join(f"{m} x{modes.count(m)}" for m in MODES if modes.count(m))

        layers = count(self.layer_modes)
        if self.layer_modes_2 is not None:
            layers = f"transformer: {layers}; transformer_2: {count(self.layer_modes_2)}"
        if p is None:
            return f"FreeLOC: {num_video_frames} frames <= trained length ({self.trained_frames} latent): no-op [{layers}]"
        return (f"FreeLOC: {p.num_frames} latent frames (trained {p.trained_frames}): VRPR W1={p.w1} W2={p.w2} "
                f"G1={p.g1} G2={p.g2} clip={p.clip}; TSA local={p.local_frames} stripe={p.stripe_frames} "
                f"width={'%d tokens' % p.stripe_width if p.stripe_width is not None else '1/%g frame' % (1 / p.stripe_fraction)} "
                f"sink={p.sink_frames}; {p.semantics} semantics [{layers}]")


def apply_freeloc(pipe, config=None, trained_frames: Optional[int] = None, semantics: str = "official",
                  **overrides) -> FreeLOC:
    """Apply FreeLOC to `pipe`: ``apply_freeloc(pipe, FreeLOCConfig(...))`` returns the
    :class:`FreeLOC` handle (``.remove()``, or use it in a ``with`` block). The older form
    ``apply_freeloc(pipe, layer_config, trained_frames, **overrides)`` still works: a second
    argument that is not a FreeLOCConfig is the layer configuration."""
    if isinstance(config, FreeLOCConfig):
        if trained_frames is not None or overrides or semantics != "official":
            raise ValueError("apply_freeloc: give either a FreeLOCConfig or keyword settings, not both")
        return FreeLOC(pipe, config=config)
    if "layer_config" in overrides:
        if config is not None:
            raise ValueError("apply_freeloc: layer_config given twice")
        config = overrides.pop("layer_config")
    return FreeLOC(pipe, layer_config=config, trained_frames=trained_frames, semantics=semantics, **overrides)
