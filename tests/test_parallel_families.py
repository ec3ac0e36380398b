"""Context parallelism (longvideo/parallel.py) beyond Wan 2.1: 2 CPU processes over gloo equal
1 process on the tiny Wan 2.2 A14B (two experts), Wan 2.2 TI2V-5B and Wan 2.1 I2V models.

One spawn of 2 ranks, each with ``enable_context_parallel(pipe)`` (the whole world one Ulysses
group: every window's sequence split in two), runs

- Wan 2.2 A14B (boundary_ratio 0.4, so that both experts run in FIFO's windows, a window
  straddles the boundary and the bank's two frames fall one on each side: both experts' bank parts
  fill and self-recurrent guidance runs through both): FIFO's video, Ouroboros with every part on
  (tail sampling, SACFA, guidance on every window; queue, maps, two-part bank and every guidance
  gradient after 4 iterations), and the pipeline's own loop without and with FreeLOC (both
  experts' layers);
- Wan 2.2 TI2V-5B: FIFO's and Ouroboros' (every part on) videos and the pipeline's loop
  (per-token timesteps split with the tokens);
- Wan 2.1 I2V: FIFO's video from an image and the pipeline's loop without and with FreeLOC (the
  cross-attention's image keys / values not split); Wan 2.2 A14B I2V: FIFO's video from an image
  and the pipeline's loop (both experts);

and a deliberately broken variant (the low-noise expert's all-to-all without the head-group
permutation), which must differ. The parent computes the same without parallelism and compares.

Tolerance: 1e-4 relative to each tensor's scale, as tests/test_parallel.py (the split does the
same float32 arithmetic on fewer rows per matmul). Measured (torch 2.13, CPU): max |diff| 0.0 for
every compared tensor here but the Wan 2.1 I2V ones: 1.5e-6 for FIFO's video (scale 3.2), 1.4e-6
and 1.2e-6 for the pipeline's loop without and with FreeLOC (scale 4.7). The broken variant is off
by 0.056.

The workers use one thread each: 2 processes x the default thread count on a 2-core machine ran
the same work 5-10x slower. The module takes 50-80 s of CPU time (3 processes importing diffusers
and every tiny model): its multi-process tests are marked slow.
"""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from _distributed import free_port, torchrun_cli, wrong_heads_to_sequence

TOL = 1e-4
WORLD = 2
PROMPT = "a red cat runs in a garden"
BOUNDARY = 0.4      # tiny A14B: levels 1.. of L = 8 are at t = 302, 501, ...: the boundary t = 400 in between
QUEUE = dict(num_partitions=2, frames_per_window=4, skip_warmup=False)   # L = 8, 4 windows of 4
ITERATIONS = 4      # masks from iteration 1, the bank from 2: guided windows in iterations 3 and 4


def _image():
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(40, 48, 3) * 255).astype("uint8"))


def _fifo_video(pipe, **options):
    from longvideo.methods.fifo import FIFODiffusion

    fifo = FIFODiffusion(pipe, **{**QUEUE, **options})
    kw = dict(guidance_scale_2=2.0) if getattr(fifo.family, "two_experts", False) else {}
    image = {"image": _image()} if fifo.family.name in ("wan_i2v", "wan22_i2v") else {}
    return fifo(PROMPT, 13, guidance_scale=3.0, seed=3, output_type="latent", **kw, **image).frames.float()


def _ouroboros_state(pipe):
    """Ouroboros on the two experts, every part on: (queue, maps, bank, [(expert, gradient)])."""
    from longvideo.methods.fifo import OuroborosDiffusion

    method = OuroborosDiffusion(pipe, **QUEUE, guided_windows=(0, 1, 2, 3), guidance_scale=20.0, bank_frames=2)
    grads = []
    inner = method._guidance_gradient

    def recording(*args, expert=None):
        g = inner(*args, expert=expert)
        if g is not None:
            grads.append((expert, g.clone()))
        return g

    method._guidance_gradient = recording
    gen = method.generate(PROMPT, 10 ** 6, guidance_scale=3.0, guidance_scale_2=2.0, seed=11)
    try:
        while True:
            next(gen)
            state = gen.gi_frame.f_locals["state"]
            if state.iteration >= ITERATIONS:
                break
    finally:
        gen.close()
    banks = [method._bank.valid_for(state.bank, e) for e in (0, 1)]
    return {"queue": state.queue.clone(), "maps": state.maps.clone(), "bank": state.bank.clone(), "grads": grads,
            "banks": banks}


def _pipeline_latents(pipe, size=32, **inputs):
    """The pipeline's own loop (a direct run): 17 frames (5 latent frames), 6 steps (on the A14B at
    boundary 0.4: timesteps 999 .. 600 on the high-noise expert, the last, 376, below it)."""
    if getattr(pipe, "transformer_2", None) is not None:
        inputs["guidance_scale_2"] = 2.0
    return pipe(prompt="a cat", num_frames=17, height=size, width=size, num_inference_steps=6, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="latent", **inputs).frames.float()


def _all_runs(wrap):
    """Every compared run; `wrap(pipe)` returns the context manager each runs under."""
    from longvideo.methods.freeloc import FreeLOC
    from longvideo.methods.fifo import OuroborosDiffusion
    from longvideo.models import wan22, wan22_i2v, wan22_ti2v, wan_i2v

    res = {}
    pipe = wan22.tiny_pipeline(boundary_ratio=BOUNDARY)
    with wrap(pipe):
        res["wan22_fifo"] = _fifo_video(pipe)
        res["wan22_ouroboros"] = _ouroboros_state(pipe)
        res["wan22_direct"] = _pipeline_latents(pipe)
        with FreeLOC(pipe):
            res["wan22_freeloc"] = _pipeline_latents(pipe)
    pipe = wan22_ti2v.tiny_pipeline("t2v")
    with wrap(pipe):
        res["ti2v_fifo"] = _fifo_video(pipe, frames_per_window=2)
        res["ti2v_direct"] = _pipeline_latents(pipe, size=64)
        ouro = OuroborosDiffusion(pipe, num_partitions=2, frames_per_window=2, guided_windows=(0, 1),
                                  guidance_scale=20.0)
        res["ti2v_ouroboros"] = ouro(PROMPT, 13, guidance_scale=3.0, seed=3, output_type="latent").frames.float()
    pipe = wan_i2v.tiny_pipeline()
    with wrap(pipe):
        res["i2v_fifo"] = _fifo_video(pipe, frames_per_window=3, lookahead=False)
        res["i2v_direct"] = _pipeline_latents(pipe, image=_image())
        with FreeLOC(pipe):
            res["i2v_freeloc"] = _pipeline_latents(pipe, image=_image())
    pipe = wan22_i2v.tiny_pipeline()
    with wrap(pipe):
        res["i2v22_fifo"] = _fifo_video(pipe, frames_per_window=3, lookahead=False)
        res["i2v22_direct"] = _pipeline_latents(pipe, image=_image())   # 857 < 875: both experts
    return res


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    from longvideo import parallel as CP
    from longvideo.models import wan22

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # every self-attention call that ran split, per transformer (Ulysses' and Ouroboros'
        # processors both go through SequenceParallel.full_sequence)
        calls = {}
        full_sequence = CP.SequenceParallel.full_sequence

        def counted(sp, *args):
            name = getattr(sp.transformer, "longvideo_name", "unnamed")
            calls[name] = calls.get(name, 0) + 1
            return full_sequence(sp, *args)

        CP.SequenceParallel.full_sequence = counted

        def wrap(pipe):
            for name in ("transformer", "transformer_2"):
                if getattr(pipe, name, None) is not None:
                    getattr(pipe, name).longvideo_name = f"{type(pipe).__name__}.{name}"
            return CP.enable_context_parallel(pipe)

        res = _all_runs(wrap)
        res["calls"] = calls
        # broken: the low-noise expert's all-to-all mixes tokens and heads
        pipe = wan22.tiny_pipeline(boundary_ratio=BOUNDARY)
        with CP.enable_context_parallel(pipe) as cp:
            low = cp.parts[1]
            low.to_sequence = lambda x: wrong_heads_to_sequence(x, low.group)
            res["wan22_direct_broken"] = _pipeline_latents(pipe)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp_families")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    import contextlib

    return _all_runs(lambda pipe: contextlib.nullcontext())


def _close(a, b):
    return float((a - b).abs().max()) <= TOL * float(b.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("run", ["wan22_fifo", "wan22_direct", "wan22_freeloc", "ti2v_fifo", "ti2v_ouroboros",
                                 "ti2v_direct", "i2v_fifo", "i2v_direct", "i2v_freeloc", "i2v22_fifo",
                                 "i2v22_direct"])
def test_two_ranks_equal_one(ranks, single, run):
    ref = single[run]
    for res in ranks:
        assert res[run].shape == ref.shape
        assert _close(res[run], ref), float((res[run] - ref).abs().max())


@pytest.mark.slow
def test_both_experts_ran_split(ranks, single):
    """Every transformer's self-attention ran over the split (both A14B experts included), and
    FreeLOC changes the A14B video (so equal-to-direct would be caught)."""
    for res in ranks:
        names = {n.split(".")[-1] for n in res["calls"] if n.startswith("WanPipeline.")}
        assert names == {"transformer", "transformer_2"}, res["calls"]
        assert any(n.startswith("WanImageToVideoPipeline.") for n in res["calls"]), res["calls"]
    assert not _close(single["wan22_freeloc"], single["wan22_direct"])


@pytest.mark.slow
def test_ouroboros_on_two_experts_equals_one_process(ranks, single):
    """SACFA on both experts, the subject maps gathered over the ranks, one bank part per expert
    (both filled), and self-recurrent guidance's backward through each expert's all-to-alls."""
    ref = single["wan22_ouroboros"]
    assert ref["banks"] == [True, True]
    assert {e for e, _ in ref["grads"]} == {0, 1}
    for res in ranks:
        run = res["wan22_ouroboros"]
        assert run["banks"] == ref["banks"]
        for key in ("queue", "maps", "bank"):
            assert run[key].shape == ref[key].shape, key
            assert _close(run[key], ref[key]), (key, float((run[key] - ref[key]).abs().max()))
        assert [e for e, _ in run["grads"]] == [e for e, _ in ref["grads"]]
        for (_, g), (_, r) in zip(run["grads"], ref["grads"]):
            assert _close(g, r), float((g - r).abs().max() / r.abs().max())


@pytest.mark.slow
def test_broken_second_expert_split_is_caught(ranks, single):
    for res in ranks:
        assert not _close(res["wan22_direct_broken"], single["wan22_direct"])


def test_skyreels_refused():
    """SkyReels-V2's transformer (its per-frame timesteps and attention mask built inside its
    forward, past the split points) is refused in one line naming it; nothing left installed (a
    world of one rank: the refusal comes before any collective)."""
    import torch.distributed as dist

    from longvideo import parallel as CP
    from longvideo.models import skyreels

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        pipe = skyreels.tiny_pipeline()
        before = dict(pipe.transformer.attn_processors)
        with pytest.raises(ValueError, match="^context parallel: SkyReelsV2Transformer3DModel is not split") as err:
            CP.enable_context_parallel(pipe)
        assert "\n" not in str(err.value)
        assert dict(pipe.transformer.attn_processors) == before and not hasattr(pipe.transformer, CP.ATTR)
        assert pipe.transformer._forward_pre_hooks == {} and pipe.transformer.rope._forward_hooks == {}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torchrun_cli_ouroboros_on_two_experts_equals_one_process(tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m longvideo generate --method ouroboros --fifo-family wan22
    --context-parallel 2` (the tiny A14B: both experts' sequences split in two, every Ouroboros
    part on) writes the video one process writes (decoded frames within 1 uint8 level, as the
    Wan 2.1 command's check), once."""

    from longvideo.cli import main
    from longvideo.video import read_video

    common = ["generate", "--method", "ouroboros", "--fifo-family", "wan22", "--device", "cpu", "--num-frames", "13",
              "--fifo-partitions", "1", "--fifo-checkpoint-every", "0"]
    assert main(common + ["--out", str(tmp_path / "one.mp4")]) == 0
    capsys.readouterr()
    proc = torchrun_cli(common + ["--context-parallel", "2", "--out", str(tmp_path / "two.mp4")],
                        OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote ") == 1
    assert "each window's sequence split over 2 ranks (Ulysses)" in proc.stdout
    one, two = read_video(tmp_path / "one.mp4"), read_video(tmp_path / "two.mp4")
    assert one.shape == two.shape == (13, 32, 32, 3)
    assert int(np.abs(one.astype(int) - two.astype(int)).max()) <= 1


@pytest.mark.gpu
def test_nccl_one_rank_on_cuda_two_experts_equals_plain():
    """The CUDA / NCCL path on both A14B experts (one rank: the collectives run, the split is
    trivial), bfloat16: FreeLOC's latents equal the run without context parallelism (same
    kernels, same order), and Ouroboros' queue, maps and bank within TOL (float32)."""
    import contextlib

    import torch.distributed as dist

    from longvideo import parallel as CP
    from longvideo.methods.freeloc import FreeLOC
    from longvideo.models import wan22

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        pipe = wan22.tiny_pipeline(boundary_ratio=BOUNDARY, dtype=torch.bfloat16).to("cuda")
        with FreeLOC(pipe):
            ref = _pipeline_latents(pipe)
        with CP.enable_context_parallel(pipe), FreeLOC(pipe):
            out = _pipeline_latents(pipe)
        assert torch.equal(out, ref)
        pipe = wan22.tiny_pipeline(boundary_ratio=BOUNDARY).to("cuda")
        runs = {}
        for name, split in (("plain", contextlib.nullcontext), ("split", CP.enable_context_parallel)):
            with split(pipe) if name == "split" else split():
                runs[name] = _ouroboros_state(pipe)
        for key in ("queue", "maps", "bank"):
            assert _close(runs["split"][key], runs["plain"][key]), key
    finally:
        dist.destroy_process_group()
