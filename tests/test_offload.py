"""Offloading (longvideo/offload.py) composed with every method, on the tiny models: the
offloaded run gives the non-offloaded run's output.

On CPU the hooks run with the host as both the compute and the storage device (diffusers allows
it for model offload and group offloading; accelerate's sequential offload needs an
accelerator): every hook fires and every weight goes through the hooks' moves, so a method that
bypasses a hook, or a hook that breaks a method (processors, FIFO's direct decoder calls,
Ouroboros' guidance backward, StoryDiffusion's bank), shows up as an error or a different
output. The equality is exact (the same float32 arithmetic on the same device). The moves
between devices are checked by the gpu-marked tests at the end.
"""
import numpy as np
import pytest
import torch

from longvideo.offload import OFFLOAD_MODES, enable_offload, offload_mode, onloaded



def _wan(kind="t2v"):
    from longvideo.models import wan

    return wan.tiny_pipeline(kind)


def _video(frames=13, size=32):
    t = np.linspace(0, 1, frames, dtype=np.float32)[:, None, None, None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.stack([np.sin(xx / 4), np.cos(yy / 5), np.sin((xx + yy) / 6)], -1)[None]
    return (0.5 + 0.4 * np.sin(base + 3 * t)).astype(np.float32)


# each: (build the pipeline, run the method on it) -> a tensor / array
def _direct(pipe):
    return pipe(prompt="a cat", num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="np").frames


def _freeloc(pipe):
    from longvideo.methods.freeloc import FreeLOC

    with FreeLOC(pipe):
        return _direct(pipe)


def _fifo(pipe):
    from longvideo.methods.fifo import FIFODiffusion

    return FIFODiffusion(pipe, num_partitions=1, frames_per_window=4)("a dog", 6, guidance_scale=3.0, seed=7).frames


def _ouroboros(pipe):
    from longvideo.methods.fifo import OuroborosDiffusion

    # every part on: coherent tail, SACFA, self-recurrent guidance (a backward through the model)
    return OuroborosDiffusion(pipe, num_partitions=1, frames_per_window=4, guided_windows=(1,),
                              guidance_scale=5.0)("a red cat runs", 2, guidance_scale=3.0, seed=7).frames


def _story(pipe):
    from longvideo.methods.storydiffusion import StoryDiffusion

    method = StoryDiffusion(pipe, start_step=1)
    try:
        out = method.generate_story(["[Bob] at home", "[Bob] in a park", "[Bob] with a dog"], id_length=2,
                                    num_inference_steps=3, output_type="latent", progress=False, seed=11)
    finally:
        method.remove()
    return torch.stack([torch.as_tensor(x) for x in out.images])


def _blending(pipe):
    from longvideo.methods.blending import RandomizedBlending

    return RandomizedBlending(pipe, chunk_frames=9, overlap_frames=4)(
        _video(), prompt="a red panda", num_inference_steps=3, guidance_scale=5.0, seed=3).frames


def _sd15():
    from longvideo.models.sd import tiny_pipeline

    return tiny_pipeline("sd15", seed=0)


METHODS = {
    "direct": (_wan, _direct),
    "freeloc": (_wan, _freeloc),
    "fifo": (_wan, _fifo),
    "ouroboros": (_wan, _ouroboros),
    "story": (_sd15, _story),
    "blending": (lambda: _wan("v2v"), _blending),
}


def _as_array(x):
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


_REFERENCE = {}


def _reference(name):
    if name not in _REFERENCE:
        build, run = METHODS[name]
        _REFERENCE[name] = _as_array(run(build()))
    return _REFERENCE[name]


# every method under model and group offloading; the text-encoder mode (which only touches the
# prompt encoding) with one Wan and one SD method
CASES = [(n, m) for n in sorted(METHODS) for m in ("model", "group")] + [("direct", "text"), ("story", "text")]


@pytest.mark.parametrize("name,mode", CASES)
def test_offloaded_equals_resident(name, mode):
    build, run = METHODS[name]
    pipe = build()
    enable_offload(pipe, mode, "cpu")
    assert offload_mode(pipe) == mode
    out = _as_array(run(pipe))
    np.testing.assert_array_equal(out, _reference(name))


def test_hooks_really_run():
    """The modes install what they say: accelerate's hooks (model, text) and diffusers' group
    hooks (group); an unknown mode is refused."""
    pipe = _wan()
    enable_offload(pipe, "model", "cpu")
    assert all(hasattr(getattr(pipe, n), "_hf_hook") for n in ("text_encoder", "transformer", "vae"))
    pipe = _wan()
    enable_offload(pipe, "text", "cpu")
    assert hasattr(pipe.text_encoder, "_hf_hook") and not hasattr(pipe.transformer, "_hf_hook")
    pipe = _wan()
    enable_offload(pipe, "group", "cpu")
    assert pipe.transformer.blocks[0]._diffusers_hook.get_hook("group_offloading") is not None
    assert pipe.vae.decoder._diffusers_hook.get_hook("group_offloading") is not None  # FIFO calls it directly
    with pytest.raises(ValueError, match="offload mode"):
        enable_offload(pipe, "disk", "cpu")
    assert set(OFFLOAD_MODES) == {"none", "text", "model", "group", "sequential"}


def test_fifo_decodes_with_the_vae_onloaded_under_model_offload(monkeypatch):
    """FIFO calls vae.post_quant_conv and vae.decoder directly, below vae.decode where model
    offload's hook runs: every decode must first put the VAE on the execution device (on a GPU the
    weights would otherwise stay on the host: the bug this fixes)."""
    from longvideo.methods.fifo import FIFODiffusion

    pipe = _wan()
    enable_offload(pipe, "model", "cpu")
    moves = []
    cls = type(pipe.vae)
    to = cls.to

    def spy(self, *a, **k):
        if self is pipe.vae:
            moves.append(torch.device(a[0]).type)
        return to(self, *a, **k)

    monkeypatch.setattr(cls, "to", spy)
    frames = FIFODiffusion(pipe, num_partitions=1, frames_per_window=4)("a dog", 6, guidance_scale=3.0, seed=7).frames[0]
    decoded_latents = (len(frames) - 1) // 4 + 1
    assert moves.count("cpu") >= decoded_latents
    np.testing.assert_array_equal(frames, _reference("fifo")[0])


def test_onloaded_moves_a_model_offloaded_module(monkeypatch):
    """Under model offload, onloaded() moves the module to the hook's execution device (what
    diffusers' apply_forward_hook does for vae.decode) and leaves the previous component alone."""
    pipe = _wan()
    enable_offload(pipe, "model", "cpu")
    moved = []
    monkeypatch.setattr(type(pipe.vae), "to", lambda self, *a, **k: moved.append(torch.device(a[0]).type))
    with onloaded(pipe.vae):
        pass
    assert moved == ["cpu"]
    moved.clear()
    with onloaded(_wan().vae):      # no offloading: nothing to do
        pass
    assert moved == []


# ---------------------------------------------------------------------------------------------
# GPU tier: real moves between host and device, and accelerate's sequential offload
@pytest.mark.gpu
@pytest.mark.parametrize("mode", OFFLOAD_MODES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_offloaded_equals_resident_on_gpu(name, mode):
    build, run = METHODS[name]
    ref_pipe = build().to("cuda")
    ref = _as_array(run(ref_pipe))
    del ref_pipe
    pipe = build()
    enable_offload(pipe, mode, "cuda")
    torch.cuda.reset_peak_memory_stats()
    out = _as_array(run(pipe))
    scale = max(1.0, float(np.abs(ref).max()))
    # same kernels on the same device; 1e-5 of the scale allows for a different algorithm choice
    # of a kernel whose inputs now come from another allocation (uint8 outputs: one level)
    tol = 1.0 if ref.dtype == np.uint8 else 1e-5 * scale
    assert float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()) <= tol
