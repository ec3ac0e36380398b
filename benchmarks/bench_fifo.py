"""Benchmark suite ``fifo`` (issue 6): seconds per output frame and peak memory of FIFO / Ouroboros.

Model: a Wan2.1-1.3B-shaped WanTransformer3DModel with random weights (bf16) at 832x480 (latent
60x104, 30x52 = 1560 tokens per latent frame), f = 21 latent frames per window, n = 4 partitions,
lookahead on (L = 2 n floor(f/2) = 80 levels, 8 windows per iteration), classifier-free guidance
batched, random text embeddings of 512 tokens. One case = one FIFO iteration (every window
denoised once, the head popped, a tail pushed), which yields one latent frame = 4 video frames on
Wan: seconds per video frame = the case's time / ``extra["video_frames_per_iteration"]``.

impl:
  fifo                plain FIFO
  ouroboros:tail      + coherent tail sampling (lowfreq_mix of the re-noised second-to-last latent)
  ouroboros:sacfa     + subject maps from every cross-attention layer (on Wan, SACFA's cross-frame
                      extension is the identity: its self-attention already spans the window)
  ouroboros:guidance  + self-recurrent guidance (bank from window 0, window 1 guided through the
                      model: one forward with autograd + backward)
  ouroboros:all       all three
Issue targets: tail + SACFA <= 1.10x fifo per output frame; guidance <= 1.6x fifo.

Memory flat in video length: ``memory_{128,256,512}frames`` run the whole iteration loop for
128, 256, 512 video frames (32, 64, 128 iterations; the VAE decode of the popped frame is not
included: no Wan VAE of real size is built) and record the peak; it must not grow with the length.
These cases are long on a GPU (224 iterations of 8 model calls): one repeat, no warm-up, and the
model has only ``MEMORY_BLOCKS`` of Wan 1.3B's 30 blocks (same widths, same 32760-token windows):
the per-call activations do not depend on the video length, the method's state is what could.

Profile ``budget`` (one GPU slot): the iteration cases with ``BUDGET_BLOCKS`` of the 30 blocks
(same widths and 32760-token windows: the ratios between the parts are per block; ``params``
names the block count) and one memory point (64 frames).

quick=True: the tiny config on CPU (f = 4, n = 2, 32x32 latents), 8 / 16 / 32 frames for memory.
"""
from __future__ import annotations

import types

import torch

from longvideo.benchmarking import Case

from .bench_freeloc import TINY, WAN_1_3B, _transformer

PARTS = {
    "fifo": None,
    "ouroboros:tail": dict(tail_sampling=True, sacfa=False, self_recurrent_guidance=False),
    "ouroboros:sacfa": dict(tail_sampling=False, sacfa=True, self_recurrent_guidance=False),
    "ouroboros:guidance": dict(tail_sampling=False, sacfa=False, self_recurrent_guidance=True),
    "ouroboros:all": dict(tail_sampling=True, sacfa=True, self_recurrent_guidance=True),
}


def _method(transformer, f, n, parts):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from longvideo.methods.fifo import FIFODiffusion, OuroborosDiffusion

    pipe = types.SimpleNamespace(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    if parts is None:
        return FIFODiffusion(pipe, num_partitions=n, frames_per_window=f)
    return OuroborosDiffusion(pipe, num_partitions=n, frames_per_window=f, **parts)


def _setup(device, transformer, config, f, n, h, w, text_len, parts):
    """The method with its processors installed, a queue state with subject maps (and a valid
    bank, so guidance runs), the prompt schedule and a closure doing one iteration."""
    from longvideo.methods.fifo import PromptSchedule, QueueState

    fifo = _method(transformer, f, n, parts)
    fifo._install((h, w))()  # sizes the bank; every iteration installs (and removes) its own processors
    gen = torch.Generator("cpu").manual_seed(0)
    C = config["in_channels"]
    maps = None
    if fifo.ouro is not None and fifo.ouro.needs_processors:
        # a subject blob in the middle of every frame: masks are non-empty, as after the first iteration
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        maps = (1 - (yy ** 2 + xx ** 2)).clamp_min(0).expand(fifo.context_len + fifo.L, h, w).contiguous().to(device)
    bank = None
    if fifo.ouro is not None and fifo.ouro.self_recurrent_guidance:
        bank = torch.randn(fifo._bank.numel, generator=gen).to(device)
        bank[-1] = 1.0
    state = QueueState(queue=torch.randn(1, C, fifo.L, h, w, generator=gen).to(device),
                       context=torch.randn(1, C, fifo.context_len, h, w, generator=gen).to(device),
                       decoder_state=None, iteration=0, frames_out=0, rng_state=gen.get_state(), maps=maps, bank=bank)
    schedule = PromptSchedule(["p"], [0])
    schedule.embeds = [torch.randn(1, text_len, config["text_dim"], generator=gen).to(device, transformer.dtype)]
    schedule.subject_ids = [list(range(1, 4))]
    neg = torch.randn(1, text_len, config["text_dim"], generator=gen).to(device, transformer.dtype)
    lv = fifo.levels(device)

    def iteration(st):
        restore = fifo._install((h, w))  # cases share one transformer: each installs its processors
        try:
            return _iteration(st)
        finally:
            restore()

    def _iteration(st):
        with torch.no_grad():
            out = fifo.step(st, lv, schedule, neg, 5.0)
            tail = fifo._new_tail(lv, out.queue, gen)
            queue = torch.cat([out.queue[:, :, 1:], tail], dim=2)
            ctx = torch.cat([st.context[:, :, 1:], out.queue[:, :, :1]], dim=2)
            bank = st.bank
            if out.bank_features is not None:
                bank = fifo._bank.ema(st.bank, out.bank_features, fifo.ouro.momentum)
        return QueueState(queue=queue, context=ctx, decoder_state=None, iteration=st.iteration + 1, frames_out=0,
                          rng_state=st.rng_state, maps=st.maps, bank=bank)  # maps kept: masks stay non-empty

    return fifo, state, iteration


def _iteration_case(device, transformer, config, f, n, h, w, text_len, impl):
    fifo, state, iteration = _setup(device, transformer, config, f, n, h, w, text_len, PARTS[impl])
    tokens = f * (h // 2) * (w // 2)
    return Case(suite="fifo", name=f"iteration_f{f}_n{n}_{w * 8}x{h * 8}", impl=impl,
                fn=lambda: iteration(state).queue,
                params={"f": f, "n": n, "L": fifo.L, "latent_hw": (h, w), "tokens_per_window": tokens,
                        "transformer_blocks": config["num_layers"]},
                extra={"model_calls": fifo.num_windows, "video_frames_per_iteration": 4, "cfg": True},
                timing={"warmup": 1, "repeats": 2, "min_time_s": 0.0})


def _memory_case(device, transformer, config, f, n, h, w, text_len, frames):
    fifo, state, iteration = _setup(device, transformer, config, f, n, h, w, text_len, None)
    iterations = frames // 4

    def run():
        st = state
        for _ in range(iterations):
            st = iteration(st)
        return st.queue

    return Case(suite="fifo", name=f"memory_{frames}frames_f{f}_n{n}_{w * 8}x{h * 8}", impl="fifo", fn=run,
                params={"f": f, "n": n, "video_frames": frames, "iterations": iterations,
                        "transformer_blocks": config["num_layers"]},
                extra={"video_length_independent_memory_expected": True},
                timing={"warmup": 0, "repeats": 1, "min_time_s": 0.0})


MEMORY_BLOCKS = 2
BUDGET_BLOCKS = 6


def cases(device: torch.device, quick: bool, profile: str = "full") -> list[Case]:
    if quick:
        tr = _transformer(TINY, device, torch.float32)
        out = [_iteration_case(device, tr, TINY, 4, 2, 8, 8, 8, impl) for impl in PARTS]
        out += [_memory_case(device, tr, TINY, 4, 2, 8, 8, 8, frames) for frames in (8, 16, 32)]
        return out
    it_config = dict(WAN_1_3B, num_layers=BUDGET_BLOCKS) if profile == "budget" else WAN_1_3B
    tr = _transformer(it_config, device, torch.bfloat16)
    out = [_iteration_case(device, tr, it_config, 21, 4, 60, 104, 512, impl) for impl in PARTS]
    # Memory cases: 224 iterations of 8 window calls would take ~30 min with all 30 blocks on an
    # H100; the peak is one window call's activations plus the method's state, and only the state can
    # grow with the length, so they run the same model shape with MEMORY_BLOCKS of its 30 blocks.
    mem_config = dict(WAN_1_3B, num_layers=MEMORY_BLOCKS)
    tr_mem = _transformer(mem_config, device, torch.bfloat16)
    frame_counts = (64,) if profile == "budget" else (128, 256, 512)
    out += [_memory_case(device, tr_mem, mem_config, 21, 4, 60, 104, 512, frames) for frames in frame_counts]
    return out
