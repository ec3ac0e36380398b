"""Context parallelism (longvideo/parallel.py): 2 CPU processes over gloo equal 1 process.

The 2 ranks are spawned once per module (torch.multiprocessing, gloo: all_to_all_single and
all_gather_into_tensor both exist there); each runs the all-to-all checks, then FreeLOC and a
direct run of the tiny Wan pipeline with the sequence split in two, and saves what it got. The
parent computes the same runs in one process without any parallelism and compares.

Tolerance: the 2-rank run does the same float32 arithmetic on fewer rows per matmul, so results
may differ in the last bits: 1e-4 relative to the output's scale (a wrong all-to-all, below,
is off by O(1)).
"""
import os

import pytest
import torch
import torch.multiprocessing as mp

from _distributed import free_port, torchrun_cli, wrong_heads_to_sequence
from longvideo.models import wan

WORLD = 2
TOL = 1e-4
FRAMES = 33  # 9 latent frames: beyond the tiny model's trained 3, so FreeLOC's tiers and VRPR are active


def _run(pipe, frames=FRAMES):
    out = pipe(prompt="a cat", num_frames=frames, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    return out.frames.float()


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    from longvideo import parallel as CP
    from longvideo.methods.freeloc import FreeLOC

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        full = torch.randn(2, 6, 4, 3)                                 # (B, S, H, D), same on every rank
        local = full.chunk(WORLD, dim=1)[rank]
        res = {"a2a": CP.heads_to_sequence(local), "a2a_back": CP.sequence_to_heads(CP.heads_to_sequence(local)),
               "a2a_wrong": wrong_heads_to_sequence(local), "full": full, "local": local}
        pipe = wan.tiny_pipeline("t2v")
        with CP.enable_context_parallel(pipe):
            res["direct"] = _run(pipe)
            with FreeLOC(pipe):
                res["freeloc"] = _run(pipe)
        res["restored"] = _run(pipe)                                   # after remove(): the plain pipeline
        try:
            CP.SequenceParallel(pipe.transformer)._local(torch.zeros(1, 35), 1)
        except ValueError as exc:
            res["odd_error"] = str(exc)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    from longvideo.methods.freeloc import FreeLOC

    pipe = wan.tiny_pipeline("t2v")
    res = {"direct": _run(pipe)}
    with FreeLOC(pipe):
        res["freeloc"] = _run(pipe)
    return res


def _close(a, b):
    return float((a - b).abs().max()) <= TOL * float(b.abs().max())


def test_all_to_all_moves_heads_and_tokens(ranks):
    for r, res in enumerate(ranks):
        h = res["full"].shape[2] // WORLD
        assert torch.equal(res["a2a"], res["full"][:, :, r * h:(r + 1) * h])    # all tokens, this rank's heads
        assert torch.equal(res["a2a_back"], res["local"])                       # and back
        assert not torch.equal(res["a2a_wrong"], res["full"][:, :, r * h:(r + 1) * h])


@pytest.mark.parametrize("run", ["direct", "freeloc"])
def test_two_ranks_equal_one(ranks, single, run):
    ref = single[run]
    for res in ranks:
        assert res[run].shape == ref.shape
        assert _close(res[run], ref), float((res[run] - ref).abs().max())
    # the comparison can fail: FreeLOC changes this video, so equal-to-direct would be caught
    assert not _close(single["freeloc"], single["direct"])


def test_remove_restores_plain_pipeline(ranks, single):
    for res in ranks:
        assert _close(res["restored"], single["direct"])


def test_uneven_sequence_refused(ranks):
    for res in ranks:
        assert "35 tokens is not divisible by 2 ranks" in res["odd_error"]


def test_freeloc_before_context_parallel_refused():
    import torch.distributed as dist

    from longvideo import parallel as CP
    from longvideo.methods.freeloc import FreeLOC

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        pipe = wan.tiny_pipeline("t2v")
        with FreeLOC(pipe):
            before = [b.attn1.processor for b in pipe.transformer.blocks]
            with pytest.raises(RuntimeError, match="before installing FreeLOC"):
                CP.enable_context_parallel(pipe)
            assert [b.attn1.processor for b in pipe.transformer.blocks] == before   # nothing left half-done
            assert not any(hasattr(b.attn1, CP.ATTR) for b in pipe.transformer.blocks)
    finally:
        dist.destroy_process_group()


def test_torchrun_cli_two_ranks_equal_one(tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m longvideo generate --method freeloc` writes the video one
    process writes (decoded frames within 1 uint8 level: the float results agree to ~1e-6, a
    rounding boundary may still flip a level), once, with the settings printed once."""

    import numpy as np

    from longvideo.cli import main
    from longvideo.video import read_video

    common = ["generate", "--method", "freeloc", "--device", "cpu", "--num-frames", str(FRAMES), "--steps", "2"]
    assert main(common + ["--out", str(tmp_path / "one.mp4")]) == 0
    capsys.readouterr()
    proc = torchrun_cli(common + ["--out", str(tmp_path / "two.mp4")], nproc=WORLD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("FreeLOC: 9 latent frames") == 1
    assert f"split over {WORLD} ranks" in proc.stdout
    one, two = read_video(tmp_path / "one.mp4"), read_video(tmp_path / "two.mp4")
    assert one.shape == two.shape
    assert int(np.abs(one.astype(int) - two.astype(int)).max()) <= 1


@pytest.mark.gpu
def test_nccl_one_rank_on_cuda_equals_plain():
    """The CUDA / NCCL path (one rank: the collectives run, the split is trivial) in bfloat16:
    FreeLOC's latents equal the run without context parallelism (same kernels, same order)."""
    import torch.distributed as dist

    from longvideo import parallel as CP
    from longvideo.methods.freeloc import FreeLOC

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        pipe = wan.tiny_pipeline("t2v", dtype=torch.bfloat16).to("cuda")
        with FreeLOC(pipe):
            ref = _run(pipe)
        with CP.enable_context_parallel(pipe), FreeLOC(pipe):
            out = _run(pipe)
        assert torch.equal(out, ref)
    finally:
        dist.destroy_process_group()
