"""Ouroboros-Diffusion (FIFO's queue, SACFA's windows, self-recurrent guidance with its backward)
under context parallelism (longvideo/parallel.py): gloo CPU processes equal 1 process.

One spawn of 4 ranks, split into 2 contiguous Ulysses groups of 2 ranks
(``context_parallel_groups(2)``), runs Ouroboros (every part on; guidance on both windows through
two feature layers, so its backward crosses block 0's attention all-to-alls and block 1's key
all-to-all) twice: with FIFO's window split over the 2 groups (4 ranks = 2 window groups x 2
sequence ranks), and with ``distributed=False`` (each group runs every window: the sequence split
alone, as 2 ranks would). Each rank saves the queue state and every guidance gradient; the parent
runs the same in one process and compares.

Tolerance: the split runs do the same float32 arithmetic with fewer rows per matmul, the head-
sharded loss summed in another order, and the gradient summed over ranks (all_reduce), so they
may differ in the last bits: 1e-4 relative to each tensor's scale (a missing gradient sum, below,
is off by O(1)). The all-to-alls' own gradients are exact (permutations): compared bit for bit.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp

from _distributed import free_port, torchrun_cli
from longvideo.models import wan

TOL = 1e-4
WORLD, CP_SIZE = 4, 2   # the tiny Wan has 2 heads: Ulysses groups of 2
PROMPT = "a red cat runs in a garden"
ITERATIONS = 3          # masks from iteration 1, the bank from 2: guidance runs in iteration 3 (both windows)
LAYERS = ("blocks.0.attn1.processor", "blocks.1.attn1.processor")


def _ouroboros(pipe, distributed=True):
    from longvideo.methods.fifo import OuroborosDiffusion

    # f = 4 with lookahead: L = 4 slots, 2 windows per iteration; both guided. The guidance scale
    # is large so that the guidance moves the queue well beyond the tolerance (its gradients are
    # up to ~4e-2 here): a wrong gradient shows in the queue too
    return OuroborosDiffusion(pipe, num_partitions=1, frames_per_window=4, guided_windows=(0, 1),
                              guidance_scale=20.0, feature_layers=LAYERS, distributed=distributed)


def _queue_run(pipe, distributed=True):
    """(queue state after ITERATIONS iterations, the guidance gradients computed on the way)."""
    method = _ouroboros(pipe, distributed)
    grads = []
    inner = method._guidance_gradient

    def recording(*args):
        g = inner(*args)
        grads.append(None if g is None else g.clone())
        return g

    method._guidance_gradient = recording
    gen = method.generate(PROMPT, 10 ** 6, guidance_scale=3.0, seed=11)
    for _ in range(ITERATIONS * 4 - 3):     # Wan: 1 frame from the first head, then 4 per head
        next(gen)
    state = gen.gi_frame.f_locals["state"]
    gen.close()
    return {"queue": state.queue.clone(), "maps": state.maps.clone(), "bank": state.bank.clone(),
            "grads": [g for g in grads if g is not None]}


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from longvideo import parallel as CP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        groups = CP.context_parallel_groups(CP_SIZE)
        res = {"groups": (groups.index, groups.count)}
        r = rank % CP_SIZE                                   # rank inside the Ulysses group

        # the collectives' gradients: sum over the group's ranks of <op(x), W> -> dL/dx = the
        # matching slice of the whole W, exactly (both all-to-alls permute elements)
        from types import SimpleNamespace

        sp = CP.SequenceParallel(SimpleNamespace(config=SimpleNamespace(num_attention_heads=4)), groups.group)
        torch.manual_seed(0)
        w_heads = torch.randn(2, 8, 4, 3)                    # (B, S, H, D): the same on every rank
        h, s = 4 // CP_SIZE, 8 // CP_SIZE
        x = torch.randn(2, s, 4, 3, requires_grad=True)
        res["grad_to_sequence"] = torch.autograd.grad((sp.to_sequence(x) * w_heads[:, :, r * h:(r + 1) * h]).sum(), x)[0]
        x2 = torch.randn(2, 8, h, 3, requires_grad=True)
        res["grad_local_sequence"] = torch.autograd.grad(
            (sp.local_sequence(x2) * w_heads[:, r * s:(r + 1) * s]).sum(), x2)[0]
        x3 = torch.randn(2, s, 5, requires_grad=True)
        w_seq = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(1))
        res["grad_gather"] = torch.autograd.grad((sp.gather_sequence(x3, 1) * w_seq).sum(), x3)[0]
        res["w_heads"], res["w_seq"] = w_heads, w_seq
        # groups of ranks that are not contiguous blocks cannot be window groups: refused
        interleaved = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
        try:
            CP.window_groups(CP.SequenceParallel(SimpleNamespace(config=SimpleNamespace(num_attention_heads=4)),
                                                 interleaved))
        except ValueError as exc:
            res["interleaved_error"] = str(exc)

        pipe = wan.tiny_pipeline("t2v")
        with CP.enable_context_parallel(pipe, groups):
            # FIFO's window split over the 2 groups, each window's sequence over a group's 2 ranks
            res["groups_x_sequence"] = _queue_run(pipe)
            # each group alone runs every window, its sequences split over its 2 ranks; the
            # gradients each rank's backward gives before they are summed are kept too
            summed, partial = CP.SequenceParallel.all_reduce, []
            CP.SequenceParallel.all_reduce = lambda self, t: summed(self, partial.append(t.clone()) or t)
            try:
                res["sequence"] = _queue_run(pipe, distributed=False)
            finally:
                CP.SequenceParallel.all_reduce = summed
            res["partial_grads"] = partial
            from longvideo.processors.ouroboros import OuroborosContext, apply_ouroboros_processors

            with apply_ouroboros_processors(pipe.transformer, OuroborosContext((4, 4))):
                try:
                    CP.enable_context_parallel(pipe, groups)
                except RuntimeError as exc:
                    res["order_error"] = str(exc)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    mp.spawn(_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    return _queue_run(wan.tiny_pipeline("t2v"))


def _close(a, b):
    return float((a - b).abs().max()) <= TOL * float(b.abs().max())


def _same_run(run, ref, grads=None):
    """`run` equals `ref` within TOL; `grads`: the reference gradients `run` computed (default all)."""
    for key in ("queue", "maps", "bank"):
        assert run[key].shape == ref[key].shape, key
        assert _close(run[key], ref[key]), (key, float((run[key] - ref[key]).abs().max()))
    grads = ref["grads"] if grads is None else grads
    assert len(run["grads"]) == len(grads) >= 1 and len(ref["grads"]) == 2   # iteration 3's two windows
    for g, r in zip(run["grads"], grads):
        assert _close(g, r), float((g - r).abs().max() / r.abs().max())


def test_collective_gradients_are_the_adjoints(ranks):
    for rank, res in enumerate(ranks):
        r = rank % CP_SIZE
        s = res["w_heads"].shape[1] // CP_SIZE
        h = res["w_heads"].shape[2] // CP_SIZE
        assert torch.equal(res["grad_to_sequence"], res["w_heads"][:, r * s:(r + 1) * s])
        assert torch.equal(res["grad_local_sequence"], res["w_heads"][:, :, r * h:(r + 1) * h])
        # the gather's adjoint: the group's (equal) gradients summed, this rank's tokens
        assert torch.equal(res["grad_gather"], CP_SIZE * res["w_seq"][:, r * s:(r + 1) * s])


def test_sequence_split_equals_one_process(ranks, single):
    """Ulysses alone (each group runs every window): SACFA's windows, the subject maps gathered
    over the ranks, the head-sharded bank and the guidance's backward through the all-to-alls."""
    for res in ranks:
        _same_run(res["sequence"], single)


def test_guidance_gradient_sum_is_checked(ranks, single):
    """A plausible mistake, keeping the gradient each rank's backward gives (through its own
    tokens; the all-to-alls' backward brought every rank's loss there) without summing them over
    the ranks, fails the comparison above: the sum is needed, and it is what is compared."""
    for res in ranks:
        assert len(res["partial_grads"]) == len(single["grads"])
        assert not any(_close(g, r) for g, r in zip(res["partial_grads"], single["grads"]))


def test_window_groups_times_sequence_split_equal_one_process(ranks, single):
    """4 ranks = 2 window groups (window i on group i % 2) x 2 Ulysses ranks."""
    assert [r["groups"] for r in ranks] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    for res in ranks:
        index = res["groups"][0]   # window i ran (and was guided) on group i % 2
        _same_run(res["groups_x_sequence"], single, grads=single["grads"][index::2])
    # every rank holds the same queue (each group's results summed once)
    for res in ranks[1:]:
        assert torch.equal(res["groups_x_sequence"]["queue"], ranks[0]["groups_x_sequence"]["queue"])


def test_interleaved_groups_refused_as_window_groups(ranks):
    for rank, res in enumerate(ranks):
        group = [0, 2] if rank % 2 == 0 else [1, 3]
        assert res["interleaved_error"] == (
            f"context parallel: the group of ranks {group} is not one of the contiguous groups of 2 of the 4 ranks "
            "(build it with longvideo.parallel.context_parallel_groups)")


def test_context_parallel_after_ouroboros_processors_refused(ranks):
    for res in ranks:
        assert "enable it before installing Ouroboros' processors" in res["order_error"]


def test_torchrun_cli_ouroboros_context_parallel_equals_one_process(tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m longvideo generate --method ouroboros --context-parallel 2`
    (one Ulysses group: every window's sequence split in two; guidance runs from the third
    iteration) writes the video one process writes (decoded frames within 1 uint8 level, as the
    FreeLOC command's check), once."""

    import numpy as np

    from longvideo.cli import main
    from longvideo.video import read_video

    common = ["generate", "--method", "ouroboros", "--device", "cpu", "--num-frames", "13", "--fifo-partitions", "1",
              "--fifo-checkpoint-every", "0"]
    assert main(common + ["--out", str(tmp_path / "one.mp4")]) == 0
    capsys.readouterr()
    proc = torchrun_cli(common + ["--context-parallel", "2", "--out", str(tmp_path / "two.mp4")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote ") == 1
    assert "each window's sequence split over 2 ranks (Ulysses), the windows over 1 group of ranks" in proc.stdout
    one, two = read_video(tmp_path / "one.mp4"), read_video(tmp_path / "two.mp4")
    assert one.shape == two.shape == (13, 32, 32, 3)
    assert int(np.abs(one.astype(int) - two.astype(int)).max()) <= 1


@pytest.mark.parametrize("method, n, world, expected", [
    ("fifo", None, 4, 1), ("ouroboros", 2, 4, 2), ("ouroboros", 4, 4, 4), ("freeloc", None, 2, 2),
    ("direct", 2, 2, 2), ("fifo", 2, 1, "needs 2 processes or a multiple, launched by torchrun"),
    ("ouroboros", 3, 4, "the 4 torchrun ranks are not a multiple of 3"),
    ("freeloc", 1, 2, "--method freeloc splits its one video over all 2 ranks"),
])
def test_context_parallel_option(method, n, world, expected):
    """--context-parallel against the torchrun world: its default per method, and one-line
    refusals naming the option."""
    from types import SimpleNamespace

    from longvideo.cli._common import UsageError
    from longvideo.cli.generate import context_parallel_size

    args = SimpleNamespace(method=method, context_parallel=n)
    if isinstance(expected, int):
        assert context_parallel_size(args, world) == expected
    else:
        with pytest.raises(UsageError, match=f"--context-parallel {n}: .*{expected}"):
            context_parallel_size(args, world)


def test_context_parallel_without_torchrun_is_a_usage_error(capsys, monkeypatch):
    from longvideo.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "--method", "ouroboros", "--device", "cpu", "--context-parallel", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["longvideo: error: --context-parallel 2: needs 2 processes or a multiple, launched by torchrun "
                   "(torchrun --nproc-per-node 2 -m longvideo generate ...)"]


@pytest.mark.gpu
def test_nccl_one_rank_ouroboros_equals_plain():
    """The CUDA / NCCL path (one rank: the processors' all-to-alls and the guidance's backward
    through them run on the GPU, the split is trivial), float32: queue, maps, bank and guidance
    gradients equal the run without context parallelism within TOL."""
    import torch.distributed as dist

    from longvideo import parallel as CP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        pipe = wan.tiny_pipeline("t2v").to("cuda")
        ref = _queue_run(pipe)
        with CP.enable_context_parallel(pipe):
            out = _queue_run(pipe)
        _same_run(out, ref)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["animatediff", "skyreels"])
def test_context_parallel_other_families_refused_before_loading(family, capsys, monkeypatch):
    """Under torchrun (a world of 2, its process group stubbed: the refusal comes before any
    collective and before the pipeline is loaded), --context-parallel with a family whose denoiser
    is not a WanTransformer3DModel is one line naming the option and the family."""
    import torch.distributed as dist

    from longvideo.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    assert main(["generate", "--method", "fifo", "--device", "cpu", "--fifo-family", family,
                 "--context-parallel", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"longvideo: error: --context-parallel 2: runs on Wan transformers (wan, wan22, wan22_ti2v, wan_i2v, "
                   f"wan22_i2v), not on {family}; omit it to split only the windows over the ranks"]


def test_context_parallel_uneven_window_refused(capsys, monkeypatch):
    """A window whose tokens do not split evenly (16x16 on the tiny Wan: 2x2 tokens per frame, 3
    frames = 12 tokens over 8 ranks) is one line naming the options to change, before any
    collective (the torchrun world of 8 stubbed)."""
    import torch.distributed as dist

    from longvideo.cli import main

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    assert main(["generate", "--method", "ouroboros", "--device", "cpu", "--height", "16", "--width", "16",
                 "--context-parallel", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["longvideo: error: --context-parallel 8: a window of 3 latent frames holds 12 tokens, not divisible "
                   "by 8 ranks; choose --fifo-window, --height or --width so that it is"]


def test_context_parallel_two_expert_frame_tokens_refused(capsys, monkeypatch):
    """On the two-expert Wan 2.2 A14B a window across the boundary runs each expert on a sub-window
    of any frame count, so a latent frame's tokens must split evenly: 16x16 on the tiny model (2x2
    tokens per frame) over 8 ranks is refused in one line although the 4-frame window's 16 tokens
    would split (the torchrun world of 8 stubbed, before any collective)."""
    import torch.distributed as dist

    from longvideo.cli import main

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    assert main(["generate", "--method", "fifo", "--fifo-family", "wan22", "--device", "cpu", "--height", "16",
                 "--width", "16", "--fifo-window", "4", "--context-parallel", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["longvideo: error: --context-parallel 8: a latent frame holds 4 tokens, not divisible by 8 ranks "
                   "(a two-expert window runs each expert on a sub-window of any frame count); choose --height or "
                   "--width so that it is"]
