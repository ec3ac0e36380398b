"""Ouroboros-Diffusion's three additions to FIFO, used by ``fifo.FIFODiffusion`` (where this package
and the authors' demo code differ, and by how much: docs/fidelity.md).

(a) Coherent tail latent sampling. The new tail is
    ``lowfreq_mix(z, eta, filter, d_s, d_t)``: the low frequencies of ``z`` and the high frequencies
    of fresh Gaussian noise ``eta`` (FreeInit's freq_mix_3d over (T, H, W) with T = 1; Gaussian,
    d_s = 0.25, d_t = 1.0 by default), where ``z`` is the latent that is second-to-last after the
    shift (the previous tail after one denoising step, at level L-1) re-noised to the tail level:
    DDIM (AnimateDiff): the DDPM forward relation in one step,
    ``z <- sqrt(abar_L / abar_{L-1}) z + sqrt(1 - abar_L / abar_{L-1}) eps``.
    Flow matching (Wan): the schedule ends at sigma_L = 1, where the forward relation
    ``(1 - sigma) x0 + sigma eps`` (and the exact level-to-level one) returns pure noise unrelated to
    ``z``; ``z`` is used as it is, at sigma_{L-1} (within one level of the tail and of unit variance
    like it), so the tail inherits its low-frequency structure, which is what keeps consecutive tails
    coherent. Noise draws: ``eta`` first (the same draw FIFO uses as its tail), then the DDIM ``eps``.

(b) SACFA: see ``longvideo.processors.ouroboros``. ``sacfa_tokens``: ``"paper"`` (default) extends
    each frame's keys/values with the subject tokens of the OTHER frames of its window (the paper's
    Eq. 4); ``"official_demo"`` with the subject tokens of ALL frames of the window, the frame's own
    included, which therefore appear twice (what the authors' demo_sacfa.py concatenates; the
    paper is the default because it is the published definition and the demo, as released, does
    not run: docs/fidelity.md). Subject masks come from the cross-attention maps
    of the subject words: per frame, the attention mass on the subject's text tokens, averaged over
    heads, subject tokens and every cross-attention layer (the authors' demo uses only the layers at
    down-sampling factors 2 and 4; all layers is a superset that also works on Wan, whose blocks all
    run at one resolution) (resized to the latent size), min-max
    normalised per frame; mask = normalised map > ``mask_threshold`` (default 0.5). A frame's map is
    recorded when its window is denoised and is used in the NEXT iteration (the frame moved one slot
    toward the head); maps move with the queue and are part of the checkpoint. Frames without a map
    yet (the first iteration, a new tail) share no tokens.
    Subject words: ``subject_words`` (user-named), else read from the prompt: the words of the
    prompt's leading phrase (after a leading article, up to the first function word such as a
    preposition, conjunction, auxiliary or an "-ing" verb; a finite verb is not recognised: "a red
    cat runs ..." gives red, cat, runs -- name the subject with ``subject_words`` to be exact).
    They are located in the tokenized prompt
    through the tokenizer's offsets mapping (every token overlapping a subject word's characters).

(c) Self-recurrent guidance. Subject features = per frame, per chosen self-attention layer, the mean
    of the layer's keys over the frame's subject tokens, (H, D). The bank holds, per layer, a moving
    average of the features of the ``bank_frames`` queue slots nearest the head (written by the first
    window of the iteration, computed at their nearly clean level):
    ``bank <- momentum * bank + (1 - momentum) * features`` (the first update sets it). Frames of
    the windows listed in ``guided_windows`` are guided by the gradient of
    ``loss = sum_layers mean_frames mean((features - bank)^2)`` through the model (a second pass of
    that window computes it: the conditional half alone, stopped after the last feature layer, the
    parameters frozen, so autograd keeps only that part's activations; self-attention goes through
    consistent_attention, so the gradient is its backward; the window's output comes from the usual
    call without autograd):  ``x_prev -= guidance_scale * c * grad``  with c = sqrt(1 - abar_prev) *
    sqrt(1 - abar_t) (DDIM with eta = 0) or sigma_prev * sigma_t (flow matching). Every window reads
    the bank of the previous iteration, so the windows of one iteration stay independent (several
    processes) and the bank is updated once per iteration. Default guided window: 1, the frames just
    behind the head window (the paper guides "noisier frames" towards the cleaner history; window 1
    is the nearest such group, and every guided window costs a partial forward with autograd +
    its backward on top of the usual call, so the default guides one); window 0 when the queue has a
    single window.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

_FUNCTION_WORDS = {
    "in", "on", "at", "with", "and", "or", "but", "of", "for", "from", "to", "into", "onto", "over", "under",
    "by", "near", "through", "across", "along", "while", "is", "are", "was", "were", "be", "has", "have",
    "that", "which", "who", "as", "under", "behind", "beside", "between", "during", ",", ".",
}
_ARTICLES = {"a", "an", "the", "one", "two", "some"}
SACFA_TOKENS = ("paper", "official_demo")


@dataclass(frozen=True)
class OuroborosConfig:
    """Options of Ouroboros-Diffusion; every part off is exactly FIFO. Frozen, and validated at
    construction (ValueError naming the field)."""

    tail_sampling: bool = True
    tail_filter: str = "gaussian"
    tail_d_s: float = 0.25
    tail_d_t: float = 1.0
    tail_order: int = 4
    sacfa: bool = True
    sacfa_tokens: str = "paper"                      # "paper" | "official_demo" (see the module docstring)
    self_recurrent_guidance: bool = True
    subject_words: Optional[Sequence[str]] = None
    mask_threshold: float = 0.5
    guidance_scale: float = 0.1
    momentum: float = 0.9
    guided_windows: Optional[Sequence[int]] = None   # default: (1,), the window after the head window
    bank_frames: int = 1
    feature_layers: Optional[Sequence[str]] = None   # default: see default_feature_layers

    def __post_init__(self):
        self.validate()

    def validate(self):
        # types first: a bool is an int to Python (True would run as 1.0), a string compares badly
        for name in ("tail_d_s", "tail_d_t", "mask_threshold", "guidance_scale", "momentum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number (int or float), got {type(value).__name__} {value!r}")
        for name in ("tail_order", "bank_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        for name in ("tail_sampling", "sacfa", "self_recurrent_guidance"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.tail_d_s <= 0 or self.tail_d_t <= 0:
            raise ValueError(f"tail_d_s and tail_d_t must be > 0, got {self.tail_d_s}, {self.tail_d_t}")
        if self.tail_filter not in ("gaussian", "butterworth", "ideal", "box"):
            raise ValueError(f"tail_filter must be gaussian/butterworth/ideal/box, got {self.tail_filter!r}")
        if not 0.0 <= self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1), got {self.mask_threshold}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.bank_frames < 1:
            raise ValueError(f"bank_frames must be >= 1, got {self.bank_frames}")
        if self.sacfa_tokens not in SACFA_TOKENS:
            raise ValueError(f"sacfa_tokens must be one of {SACFA_TOKENS}, got {self.sacfa_tokens!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        return self

    @property
    def needs_processors(self) -> bool:
        return self.sacfa or self.self_recurrent_guidance


def subject_words_from_prompt(prompt: str) -> List[str]:
    """The words of the prompt's leading phrase (see the module docstring)."""
    words = re.findall(r"[A-Za-z0-9'-]+|[,.]", prompt.lower())
    while words and words[0] in _ARTICLES:
        words = words[1:]
    out = []
    for w in words:
        if w in _FUNCTION_WORDS or (w.endswith("ing") and out):
            break
        out.append(w)
    return out or words[:1]


def subject_token_positions(tokenizer, prompt: str, words: Sequence[str]) -> List[int]:
    """Positions in the tokenized prompt (as the pipeline tokenizes it, special tokens included) of
    every token overlapping an occurrence of one of `words` (whole words, case-insensitive)."""
    enc = tokenizer(prompt, return_offsets_mapping=True, truncation=True,
                    max_length=getattr(tokenizer, "model_max_length", 512))
    spans = []
    for w in words:
        for m in re.finditer(r"(?<![A-Za-z0-9])" + re.escape(w.lower()) + r"(?![A-Za-z0-9])", prompt.lower()):
            spans.append(m.span())
    pos = [i for i, (a, b) in enumerate(enc["offset_mapping"])
           if b > a and any(a < e and s < b for s, e in spans)]
    if not pos:
        raise ValueError(f"subject words {list(words)} do not occur in the prompt {prompt!r}")
    return pos


def default_feature_layers(family: str, self_layers: Sequence[str]) -> List[str]:
    """AnimateDiff: the spatial self-attention layers of the down path (the gradient then goes
    through the down path only); Wan: the first quarter of the blocks (at least one)."""
    if family == "animatediff":
        down = [n for n in self_layers if n.startswith("down_blocks")]
        return down or list(self_layers[:1])
    return list(self_layers[: max(1, len(self_layers) // 4)])


def frame_features(keys: torch.Tensor, token_masks: torch.Tensor) -> torch.Tensor:
    """Mean subject key per frame: keys (F, H, N, D), token_masks (F, N) bool -> (F, H, D)
    (zero for a frame without subject tokens)."""
    w = token_masks.to(keys.dtype)
    return torch.einsum("fhnd,fn->fhd", keys.float(), w.float()) / w.float().sum(1).clamp_min(1).view(-1, 1, 1)


class SubjectBank:
    """Layout of the bank: one flat float32 vector, the (H, D) features of each layer in order,
    plus a validity flag (so it is one tensor for all_reduce and the checkpoint).

    Two-expert pipelines (Wan 2.2 A14B): ``experts=2`` keeps one such part per expert, one after the
    other, each with its own flag: an expert's keys are its own projections, so its features are
    compared only with a bank its own calls wrote (docs/methods.md, "Wan 2.2"). With one expert
    the layout is the single part (as before the option existed)."""

    def __init__(self, layers: Sequence[str], shapes: Sequence[tuple], experts: int = 1):
        self.layers, self.shapes = list(layers), list(shapes)
        self.sizes = [h * d for h, d in self.shapes]
        self.experts = int(experts)

    @property
    def part_numel(self) -> int:
        """Elements of one expert's part (features + flag)."""
        return sum(self.sizes) + 1

    @property
    def numel(self) -> int:
        return self.experts * self.part_numel

    def part(self, flat: Optional[torch.Tensor], expert: int = 0) -> Optional[torch.Tensor]:
        """Expert `expert`'s part of a flat bank (a view; None stays None)."""
        if flat is None or self.experts == 1:
            return flat
        return flat[expert * self.part_numel: (expert + 1) * self.part_numel]

    def pack(self, feats: dict, expert: int = 0) -> torch.Tensor:
        """The flat bank holding `feats` ({layer: (H, D)}) as expert `expert`'s part (valid); the
        other experts' parts zero (invalid)."""
        one = torch.cat([feats[n].reshape(-1).float() for n in self.layers] + [feats[self.layers[0]].new_ones(1)])
        if self.experts == 1:
            return one
        flat = one.new_zeros(self.numel)
        flat[expert * self.part_numel: (expert + 1) * self.part_numel] = one
        return flat

    def unpack(self, flat: torch.Tensor, expert: int = 0) -> dict:
        parts = self.part(flat, expert)[:-1].split(self.sizes)
        return {n: p.view(*s) for n, p, s in zip(self.layers, parts, self.shapes)}

    @staticmethod
    def valid(flat: Optional[torch.Tensor]) -> bool:
        """Whether a one-expert bank (or one part) holds features."""
        return flat is not None and float(flat[-1]) > 0.5

    def valid_for(self, flat: Optional[torch.Tensor], expert: int = 0) -> bool:
        """Whether expert `expert`'s part of `flat` holds features."""
        return self.valid(self.part(flat, expert))

    def ema(self, bank: Optional[torch.Tensor], new: torch.Tensor, momentum: float) -> torch.Tensor:
        """``momentum * bank + (1 - momentum) * new`` per part; a part `new` does not hold keeps
        its value, a part `bank` does not hold yet takes `new`'s."""
        if self.experts > 1:
            if not any(self.valid_for(new, e) for e in range(self.experts)):
                return bank
            out = new.new_zeros(self.numel) if bank is None else bank.clone()
            for e in range(self.experts):
                merged = self._ema_part(self.part(bank, e), self.part(new, e), momentum)
                if merged is not None:
                    out[e * self.part_numel: (e + 1) * self.part_numel] = merged
            return out
        return self._ema_part(bank, new, momentum)

    def _ema_part(self, bank, new, momentum):
        if not self.valid(new):
            return bank
        if not self.valid(bank):
            return new.clone()
        out = momentum * bank + (1 - momentum) * new
        out[-1] = 1.0
        return out
