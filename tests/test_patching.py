"""One patching idiom (longvideo.hooks.PatchHandle): apply_<method>(pipe_or_model, <Method>Config) -> handle.

Oracles: the model's own outputs before the patch (remove() must give them back bit for bit, and
the very processor objects), the patch's effect (outputs differ while it is applied, so the
restoring test can fail), and a deliberately broken handle (one that forgets an undo step), which
the same check catches.
"""
import pytest
import torch

import longvideo
from longvideo.hooks import PatchHandle, active_patches
from longvideo.methods.freeloc import FreeLOCConfig, apply_freeloc
from longvideo.methods.free_init import FreeInitConfig, apply_free_init, enable_fast_free_init
from longvideo.methods.storydiffusion import StoryDiffusionConfig, apply_storydiffusion
from longvideo.models import animatediff, sd, wan


@pytest.fixture(scope="module")
def wan_pipe():
    return wan.tiny_pipeline("t2v")


@pytest.fixture(scope="module")
def sd_pipe():
    return sd.tiny_pipeline("sd15", seed=0)


@pytest.fixture(scope="module")
def ad_pipe():
    return animatediff.tiny_pipeline()


def _wan_latents(pipe, frames=17):
    return pipe(prompt="a cat", num_frames=frames, height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), output_type="latent").frames.float()


def _sd_latents(pipe):
    return pipe(prompt=["a cat", "a dog"], num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def _all_processors(model):
    return dict(model.attn_processors)


# ---------------------------------------------------------------------------------------------
# the handle itself
class _Box:
    pass


def test_handle_restores_attributes_claims_and_is_idempotent():
    box = _Box()
    box.kept = "mine"
    h = PatchHandle("demo")
    h.claim(box, "thing")
    h.set_attr(box, "kept", "patched")
    h.set_attr(box, "added", 1)
    undone = []
    h.on_remove(lambda: undone.append(1))
    assert box.kept == "patched" and box.added == 1 and active_patches(box) == {"thing": h}
    with pytest.raises(ValueError, match=r"already patched by demo.*remove\(\)"):
        PatchHandle("other").claim(box, "thing")
    h.remove()
    h.remove()  # idempotent
    assert box.kept == "mine" and not hasattr(box, "added") and undone == [1] and not h.active
    assert active_patches(box) == {}
    with PatchHandle("again") as h2:  # the claim is free again; a with block removes
        h2.claim(box, "thing")
        h2.set_attr(box, "kept", 2)
    assert box.kept == "mine" and not h2.active


def test_every_undo_step_runs_even_if_one_fails():
    box = _Box()
    h = PatchHandle("demo")
    h.set_attr(box, "a", 1)

    def boom():
        raise RuntimeError("undo failed")

    h.on_remove(boom)
    with pytest.raises(RuntimeError, match="undo failed"):
        h.remove()
    assert not hasattr(box, "a")


# ---------------------------------------------------------------------------------------------
# FreeLOC
def test_freeloc_config_form_context_manager_restores_bit_exactly(wan_pipe):
    before_procs = _all_processors(wan_pipe.transformer)
    ref = _wan_latents(wan_pipe)
    config = FreeLOCConfig(layer_config=["tsa", "vrpr", "dense", "tsa"])
    with apply_freeloc(wan_pipe, config) as handle:
        assert isinstance(handle, PatchHandle) and handle.config is config
        inside = _wan_latents(wan_pipe)
        with pytest.raises(ValueError, match="already patched by FreeLOC"):
            apply_freeloc(wan_pipe, config)  # double apply refused, nothing changed by the attempt
        assert torch.equal(_wan_latents(wan_pipe), inside)
    assert (inside - ref).abs().max() > 1e-3  # FreeLOC acted (5 latent frames > 3 trained)
    after = _all_processors(wan_pipe.transformer)
    assert all(after[k] is before_procs[k] for k in before_procs)  # the same objects
    assert not wan_pipe.transformer.rope._forward_pre_hooks
    assert torch.equal(_wan_latents(wan_pipe), ref)
    # the old forms are thin aliases of the same handle
    legacy = longvideo.apply_freeloc(wan_pipe, ["tsa", "vrpr", "dense", "tsa"])
    assert isinstance(legacy, longvideo.FreeLOC) and legacy.layer_modes[0] == "tsa"
    legacy.remove()
    assert torch.equal(_wan_latents(wan_pipe), ref)


def test_a_handle_that_forgets_an_undo_step_is_caught(wan_pipe):
    """The restoring check above can fail: dropping one undo step leaves a FreeLOC processor in place."""
    ref = _wan_latents(wan_pipe)
    handle = apply_freeloc(wan_pipe, FreeLOCConfig(layer_config=["tsa", "vrpr", "tsa", "vrpr"]))
    forgotten = handle._undo.pop(1)  # the first processor's restore
    handle.remove()
    # a FreeLOC processor left behind (its grid hook gone): the model no longer runs as before
    with pytest.raises(RuntimeError, match="token grid"):
        _wan_latents(wan_pipe)
    forgotten()
    assert torch.equal(_wan_latents(wan_pipe), ref)


@pytest.mark.parametrize("kwargs,field", [
    (dict(w1="x"), "w1"), (dict(trained_frames=0), "trained_frames"), (dict(g2=0), "g2"),
    (dict(stripe_fraction=2.0), "stripe_fraction"), (dict(layer_config=["tsa", "bogus"]), r"layer_config\[1\]"),
    (dict(layer_config="/nonexistent/layers.json"), "layer_config"), (dict(layer_config=3), "layer_config"),
    (dict(w1=10, w2=4), "W1"), (dict(semantics="bogus"), "semantics"),
])
def test_freeloc_config_validated_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FreeLOCConfig(**kwargs)


def test_freeloc_config_is_frozen():
    with pytest.raises(Exception):
        FreeLOCConfig().w1 = 3


# ---------------------------------------------------------------------------------------------
# StoryDiffusion (consistent self-attention) and VideoSubjectConsistency
def test_storydiffusion_apply_remove_restores_bit_exactly(sd_pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    sd_pipe.unet.set_attn_processor(AttnProcessor2_0())
    before = _all_processors(sd_pipe.unet)
    ref = _sd_latents(sd_pipe)
    with apply_storydiffusion(sd_pipe, StoryDiffusionConfig(sampling_rate=1.0, start_step=0, prob_early=1.0,
                                                            prob_late=1.0)) as story:
        story.controller.begin_call("write", call_key="t", group_size=2, write_key="x")
        inside = _sd_latents(sd_pipe)
        story.controller.end_call()
        with pytest.raises(ValueError, match="already patched by StoryDiffusion"):
            longvideo.StoryDiffusion(sd_pipe)
        with pytest.raises(ValueError, match="already patched by StoryDiffusion"):
            longvideo.VideoSubjectConsistency(sd_pipe.unet, layers="up")
    assert (inside - ref).abs().max() > 1e-4  # the images attended to each other's tokens
    after = _all_processors(sd_pipe.unet)
    assert all(after[k] is before[k] for k in before)
    assert not sd_pipe.unet._forward_pre_hooks
    assert torch.equal(_sd_latents(sd_pipe), ref)


@pytest.mark.parametrize("kwargs,field", [
    (dict(sampling_rate=1.5), "sampling_rate"), (dict(prob_early=-0.1), "prob_early"),
    (dict(prob_late="x"), "prob_late"), (dict(start_step=-1), "start_step"), (dict(late_step=1.5), "late_step"),
    (dict(probability=3), "probability"), (dict(layers="down"), "layers"), (dict(schedule="app"), "schedule"),
    (dict(bank_gpu_budget="-1GiB"), "bank_gpu_budget"),
    (dict(bank_location="cpu", bank_gpu_budget="1GiB"), "bank_gpu_budget"),
])
def test_storydiffusion_config_validated_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=field):
        StoryDiffusionConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Ouroboros' processors
def test_ouroboros_processors_handle(ad_pipe):
    from longvideo.processors.ouroboros import OuroborosContext, apply_ouroboros_processors

    unet = ad_pipe.unet
    before = _all_processors(unet)
    handle = apply_ouroboros_processors(unet, OuroborosContext((4, 4)))
    changed = [k for k, p in unet.attn_processors.items() if p is not before[k]]
    assert handle.self_layers and set(handle.self_layers) <= set(changed)
    assert all("motion_modules" not in k for k in changed)  # the motion modules keep theirs
    with pytest.raises(ValueError, match="already patched by Ouroboros"):
        apply_ouroboros_processors(unet, OuroborosContext((4, 4)))
    handle.remove()
    assert all(unet.attn_processors[k] is before[k] for k in before)


# ---------------------------------------------------------------------------------------------
# FreeInit
def _ad_frames(pipe):
    return pipe(prompt="a cat", num_frames=4, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                output_type="latent", generator=torch.Generator().manual_seed(0)).frames


def test_free_init_apply_remove_restores_state_and_outputs(ad_pipe):
    ref = _ad_frames(ad_pipe)
    assert getattr(ad_pipe, "_free_init_num_iters", None) is None
    with apply_free_init(ad_pipe, FreeInitConfig(num_iters=2, method="gaussian")) as handle:
        assert ad_pipe._free_init_num_iters == 2 and ad_pipe.free_init_enabled
        inside = _ad_frames(ad_pipe)
        with pytest.raises(ValueError, match="already patched by FreeInit"):
            enable_fast_free_init(ad_pipe)  # the drop-in is part of this handle already
    assert not handle.active and not ad_pipe.free_init_enabled
    assert "_apply_freq_filter" not in ad_pipe.__dict__
    assert not torch.equal(inside, ref)  # two FreeInit iterations changed the result
    assert torch.equal(_ad_frames(ad_pipe), ref)


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_iters=0), "num_iters"), (dict(method="box", fast=False), "method"), (dict(method="fancy"), "method"),
    (dict(order=0), "order"), (dict(spatial_stop_frequency=0.0), "spatial_stop_frequency"),
    (dict(temporal_stop_frequency=1.5), "temporal_stop_frequency"),
])
def test_free_init_config_validated_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FreeInitConfig(**kwargs)
