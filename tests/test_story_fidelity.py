"""StoryDiffusion's two official schedules (``schedule="official_app" | "low_vram"``) against an
oracle written from reading the official code, on tiny SD1.5 / SDXL pipelines at 40 x 40 pixels
(latents 10 x 10, a size no other test uses).

Oracle (``OfficialAppProcessor``), from app.py / predict.py (``SpatialAttnProcessor2_0``) and the
low-VRAM app (gradio_app_sdxl_specific_id_low_vram.py):
- write (the id images of a character, one batch [uncond x G, cond x G]): the processor keeps the
  WHOLE self-attention inputs of the id images per step and CFG half; before the start step each
  image runs plain self-attention; from it on each image attends to its own tokens ++ the sampled
  tokens of the other id images;
- read (one image, [uncond, cond]): before the start step, with the official app, keys/values
  from concat(every token of every id image of the same CFG half, own tokens), i.e. the WHOLE
  bank; with the low-VRAM app (start step 1), plain self-attention at step 0; from the start step
  on, concat(the write-time sampled tokens, own tokens) (the low-VRAM app's read).
Only the token subsets (``sample_indices``) and the step counter come from the controller.
"""
import pytest
import torch
import torch.nn.functional as F

import longvideo
from longvideo.methods.storydiffusion import StoryDiffusion, project_bank_bytes
from longvideo.models.sd import tiny_pipeline

SIZE = 40
STEPS = 6  # steps 0-4 before the official app's start (5), step 5 sampled
STORY = ["[Ann] at home", "[Ann] in a park", "[Ann] on a boat"]
ALWAYS = dict(prob_early=1.0, prob_late=1.0)  # no per-call draws: the oracle needs none


class OfficialAppProcessor:
    def __init__(self, ctrl, name, store, start, early_read_full):
        self.ctrl, self.name, self.store = ctrl, name, store
        self.start, self.early_read_full = start, early_read_full

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctrl = self.ctrl
        B, N, C = hidden_states.shape
        step = ctrl.step
        H = attn.heads
        D = attn.to_q.out_features // H

        def sdpa(xq, xkv):
            q = attn.to_q(xq).view(xq.shape[0], -1, H, D).transpose(1, 2)
            k = attn.to_k(xkv).view(xkv.shape[0], -1, H, D).transpose(1, 2)
            v = attn.to_v(xkv).view(xkv.shape[0], -1, H, D).transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(xq.shape[0], -1, H * D)

        x = hidden_states.view(2, B // 2, N, C)  # [CFG half, image, token, channel]
        early = step < self.start
        if ctrl.mode == "write":
            G = B // 2
            key = (ctrl.write_key, step, self.name)
            self.store.setdefault("whole", {})[key] = x.clone()
            if early:
                out = sdpa(hidden_states, hidden_states)
            else:
                idx = ctrl.sample_indices(step, N, G, 2, hidden_states.device)
                half = idx[: idx.numel() // 2]
                mine = [half[half // N == i] % N for i in range(G)]
                self.store.setdefault("sampled", {})[key] = torch.cat([x[:, i, mine[i]] for i in range(G)], 1)
                outs = []
                for i in range(G):
                    ctx = torch.cat([x[:, j, mine[j]] for j in range(G) if j != i] + [x[:, i]], dim=1)
                    outs.append(sdpa(x[:, i], ctx))
                out = torch.stack(outs, 1).reshape(B, N, H * D)
        elif ctrl.read_keys and (not early or self.early_read_full):
            if early:  # the whole id bank: every token of every id image, per CFG half
                ids = [self.store["whole"][(c, step, self.name)].reshape(2, -1, C) for c in ctrl.read_keys]
            else:
                ids = [self.store["sampled"][(c, step, self.name)] for c in ctrl.read_keys]
            out = sdpa(x[:, 0], torch.cat(ids + [x[:, 0]], dim=1))
        else:
            out = sdpa(hidden_states, hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _story(pipe, oracle=None, story=STORY, **options):
    method = StoryDiffusion(pipe, **ALWAYS, **options)
    if oracle is not None:
        store = {}
        mods = dict(pipe.unet.named_modules())
        for name in method.layers:
            mods[name].set_processor(OfficialAppProcessor(method.controller, name, store, *oracle))
    try:
        return method, method.generate_story(story, id_length=2, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                                             output_type="latent", progress=False, seed=13)
    finally:
        method.remove()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_schedules_equal_the_official_apps(kind):
    """official_app (default) = the official app (whole id bank before step 5); low_vram = the
    low-VRAM app (start 1, step 0 plain); the two oracles differ on the read images."""
    pipe = tiny_pipeline(kind, seed=0)
    method, ours = _story(pipe)
    assert method.schedule == "official_app" and method.controller.start_step == 5
    _, app = _story(pipe, oracle=(5, True))
    assert ours.roles == ["id", "id", "read"]
    for a, b in zip(ours.images, app.images):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    if kind == "sdxl":  # the schedules' differences: on SD1.5 (the cost of SDXL's runs is not needed)
        return
    _, app_plain_early = _story(pipe, oracle=(5, False))
    reads = [i for i, r in enumerate(ours.roles) if r == "read"]
    # the early whole-bank read is what the official app does, and it matters
    assert min(_rel(ours.images[i], app_plain_early.images[i]) for i in reads) > 1e-3

    low, ours_low = _story(pipe, schedule="low_vram")
    assert low.controller.start_step == 1
    _, lowvram = _story(pipe, oracle=(1, False))
    for a, b in zip(ours_low.images, lowvram.images):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert min(_rel(ours_low.images[i], ours.images[i]) for i in reads) > 1e-3


def test_early_read_is_one_op_call_over_the_whole_bank(monkeypatch):
    """Before the start step a read call is the consistent_attention op with no sampled token and
    the id bank = every token of both id images (E = 2 N per layer), taken from the bank without
    a copy of the image's own tokens; the write stores exactly those tokens, the bytes the
    projection counts."""
    from longvideo.ops import get_backend

    pipe = tiny_pipeline("sd15", seed=0)
    be = get_backend("consistent_attention", "reference")
    calls = []
    orig = be.fn

    def fn(q, k, v, idx, G, window, bk, bv, scale):
        calls.append((q.shape, idx.numel(), None if bk is None else tuple(bk.shape), G))
        return orig(q, k, v, idx, G, window, bk, bv, scale)

    monkeypatch.setattr(be, "fn", fn)
    with longvideo.ops.use_backend("reference", op="consistent_attention"):
        method, res = _story(pipe, story=STORY + ["[NC] an empty road"])
    layers = len(method.layers)
    assert res.roles == ["id", "id", "read", "nc"]
    # the id write: plain attention at steps 0-4 (no op call), sampled at 5; the read: every step;
    # the [NC] prompt: plain attention at steps 0-4 (nothing to read), the op (with nothing shared) at 5
    assert len(calls) == (STEPS - 5) * layers + STEPS * layers + (STEPS - 5) * layers
    early = [c for c in calls if c[0][0] == 2 and c[2] is not None and c[2][2] == 2 * c[0][2]]
    assert len(early) == 5 * layers  # the read's steps 0-4: the whole bank
    for (B, H, N, D), sampled, bank, G in early:
        assert sampled == 0 and G == 1 and bank == (2, H, 2 * N, D)  # per CFG half: all tokens of the 2 ids
    # the bank: whole inputs for steps 0-4, sampled subsets after; the projection is exact
    steps = {s for _, s, _ in method.bank._mem}
    assert steps == set(range(STEPS))
    mods = dict(pipe.unet.named_modules())
    for (_, s, layer), t in method.bank._mem.items():
        n = 9 if layer.startswith("up_blocks.0.") else 25  # tokens per image: 3 x 3 and 5 x 5 latents
        assert t.shape[0] == 2 and t.shape[2] == mods[layer].to_q.in_features
        assert t.shape[1] == 2 * n if s < 5 else 0 < t.shape[1] < 2 * n
    assert method.project_bank_bytes(num_inference_steps=STEPS, id_length=2, height=SIZE, width=SIZE,
                                     characters=["Ann"], seed=13) == method.bank.nbytes()
    whole = project_bank_bytes(pipe, num_inference_steps=STEPS, id_length=2, height=SIZE, width=SIZE,
                               sampling_rate=0.0, characters=["Ann"], seed=13, dtype=torch.float32)
    low = project_bank_bytes(pipe, num_inference_steps=STEPS, id_length=2, height=SIZE, width=SIZE,
                             sampling_rate=0.0, characters=["Ann"], seed=13, dtype=torch.float32, schedule="low_vram")
    assert low == 0 and whole == sum(t.numel() * 4 for (_, s, _), t in method.bank._mem.items() if s < 5)


def test_a_bank_is_read_only_with_the_schedule_it_was_written_with(tmp_path):
    """A saved bank knows its full and sampled steps: a read with the other schedule is a clear error."""
    pipe = tiny_pipeline("sd15", seed=0)
    kw = dict(id_length=2, num_inference_steps=6, height=SIZE, width=SIZE, output_type="latent", progress=False,
              seed=1)
    paths = {}
    for schedule in ("official_app", "low_vram"):
        m = StoryDiffusion(pipe, schedule=schedule)
        m.generate_story(STORY[:2], **kw)
        paths[schedule] = m.save_bank(tmp_path / f"{schedule}.safetensors")
        m.remove()
    for writer, reader, match in (("low_vram", "official_app", r"no whole id inputs for steps \[0, 1, 2, 3, 4\]"),
                                  ("official_app", "low_vram", r"no entries for steps \[1, 2, 3, 4\]")):
        m = StoryDiffusion(pipe, schedule=reader)
        try:
            m.load_bank(paths[writer])
            with pytest.raises(ValueError, match=match):
                m.generate_story(["[Ann] on a boat"], **kw)
        finally:
            m.remove()
    m = StoryDiffusion(pipe)  # the same schedule reads its own bank
    try:
        m.load_bank(paths["official_app"])
        assert m.generate_story(["[Ann] on a boat"], **kw).roles == ["read"]
    finally:
        m.remove()
    with pytest.raises(ValueError, match="schedule"):
        StoryDiffusion(pipe, schedule="app")


def test_cli_schedule_option(tmp_path):
    import argparse

    from longvideo.cli.story import add_arguments as add_story_arguments

    parser = argparse.ArgumentParser()
    add_story_arguments(parser)
    args = parser.parse_args(["story.txt"])
    assert args.story_schedule == "official_app" and args.story_start_step is None
    args = parser.parse_args(["story.txt", "--story-schedule", "low_vram", "--story-start-step", "2"])
    assert (args.story_schedule, args.story_start_step) == ("low_vram", 2)
