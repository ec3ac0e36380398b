"""StoryDiffusion: a whole 6-image story (4 id images written together + 2 read alone).

Full size (GPU): an SDXL-shaped UNet with random weights (block_out_channels (320, 640, 1280),
transformer_layers_per_block (1, 2, 10), 2048-wide cross-attention, text_time embedding) in
float16 at 1024x1024 (128x128 latents), consistent attention on the up-block self-attention
(30 layers at 1024 tokens, 6 at 4096), classifier-free guidance, 8 steps with consistency from
step 1 on every call (probability 1: both paths attend to the same tokens), sampling rate 0.5. The
text encoders and the VAE are tiny stand-ins with SDXL's widths (only the UNet matters here),
and the story stops at the latents (no VAE decode).

Implementations (``[auto]``: the auto-selected attention kernel):
* ``longvideo[auto]``           this package, id bank all on the GPU (``bank_location=None``);
* ``longvideo[auto]+auto_bank`` this package, ``bank_location="auto"`` with the budget a 16 GiB card
                                gets by default (10% of 16 GiB): the first steps' entries on the GPU,
                                the rest spilled to pinned host memory and prefetched;
* ``longvideo[auto]+cpu_bank``  this package, id bank all in pinned host memory;
* ``official_lowvram``          the official low-VRAM path re-implemented here: per image, concatenate
                                the other images' sampled tokens (write) or the id bank (read) with
                                its own tokens, project k/v of the concatenation, SDPA per image;
                                bank of hidden states on the GPU, written every step;
* ``plain_sdxl``                the same six images without consistency (context).

``flops`` (hence TFLOP/s in the table) is each implementation's work from ``story_flop_budget``:
the UNet counted by torch's flop counter, the consistent layers' extra keys and projections
counted per layer; ``extra.work_official_over_ours`` is the official path's work over ours (its
per-image re-projection of the other images' sampled tokens). At these settings it is ~1.03:
the official path does the same attention, so the story's time is mostly the UNet's in both.

Timing covers the whole story (all UNet calls, text encoding, bank traffic). Peak memory is what
the story allocates beyond the resident weights (``extra.weights_bytes``): total = both. The id
bank's size is projected from the UNet's structure (``project_bank_bytes``, exact for seed 0):
``extra.bank_bytes`` for this case, ``extra.bank_bytes_official_50_steps`` for the same story at
the official settings (50 steps, consistency from step 5, 4 id images, this resolution).
``quick=True``: the tiny SDXL pipeline at 64x64, 3 steps (CPU smoke run).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longvideo.benchmarking import Case

SUITE = "storydiffusion"
STORY = ["[Hero] reading a book at home", "[Hero] walking in a park", "[Hero] cooking dinner",
         "[Hero] riding a bicycle", "[Hero] on a boat at sunset", "[Hero] sleeping under a tree"]
ID_LENGTH = 4
AUTO_BANK_BUDGET = int(0.10 * 16 * 2**30)  # the auto bank's default budget on a 16 GiB card


def sdxl_unet_config() -> dict:
    return dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    )


def _sdxl_shaped_pipeline(device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from longvideo.models.sd import _scheduler
    from longvideo.models.tokenizers import EOS_ID, char_tokenizer

    def text_cfg(width, proj=None):
        kw = dict(vocab_size=100, hidden_size=width, intermediate_size=width, num_hidden_layers=2,
                  num_attention_heads=width // 64, max_position_embeddings=77, bos_token_id=2, eos_token_id=EOS_ID,
                  pad_token_id=0)
        if proj:
            kw["projection_dim"] = proj
        return CLIPTextConfig(**kw)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):  # build directly on the device (2.6 B parameters)
                unet = UNet2DConditionModel(**sdxl_unet_config())
                te1 = CLIPTextModel(text_cfg(768))
                te2 = CLIPTextModelWithProjection(text_cfg(1280, 1280))
                vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                                    layers_per_block=1)
        finally:
            torch.set_default_dtype(prev)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=char_tokenizer(77),
                                     tokenizer_2=char_tokenizer(77), unet=unet, scheduler=_scheduler(),
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class OfficialLowVramProcessor:
    """StoryDiffusion's official low-VRAM consistent attention (re-implemented; docs/fidelity.md, StoryDiffusion).

    Write (the id images of one character, batch [uncond x G, cond x G]): the hidden states of the
    sampled tokens of every image are cached per step (on the GPU, every step); then for each
    image i, keys/values are projected from concat(sampled tokens of the other images, own
    tokens) and SDPA runs per image (both CFG halves together). Read (one image): keys/values
    from concat(cached tokens of the id images, own tokens). Plain SDPA when the schedule says so.
    The token subsets and the schedule come from the same controller as ours (same tokens attended).
    """

    def __init__(self, ctrl, name, bank):
        self.ctrl, self.name, self.bank = ctrl, name, bank

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctrl = self.ctrl
        B, N, C = hidden_states.shape
        step = max(ctrl.step, 0)
        heads = attn.heads
        D = attn.to_q.out_features // heads

        def sdpa(xq, xkv):
            q = attn.to_q(xq).view(xq.shape[0], -1, heads, D).transpose(1, 2)
            k = attn.to_k(xkv).view(xkv.shape[0], -1, heads, D).transpose(1, 2)
            v = attn.to_v(xkv).view(xkv.shape[0], -1, heads, D).transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(xq.shape[0], -1, heads * D)

        imgs = B // 2
        x = hidden_states.view(2, imgs, N, C)
        on = ctrl.mode != "off" and ctrl.probability_at(step) > 0
        if ctrl.mode == "write":
            idx = ctrl.sample_indices(step, N, imgs, 2, hidden_states.device)
            half = idx[: idx.numel() // 2]
            per_img = [half[(half // N) == i] % N for i in range(imgs)]
            self.bank[(step, self.name)] = [x[:, i, per_img[i]].clone() for i in range(imgs)]
            if on:
                outs = []
                for i in range(imgs):
                    ctx = torch.cat([x[:, j, per_img[j]] for j in range(imgs) if j != i] + [x[:, i]], dim=1)
                    outs.append(sdpa(x[:, i], ctx))
                out = torch.stack(outs, dim=1).reshape(B, N, heads * D)
            else:
                out = sdpa(hidden_states, hidden_states)
        elif on and ctrl.read_keys:
            ctx = torch.cat(self.bank[(step, self.name)] + [hidden_states.view(2, N, C)], dim=1)
            out = sdpa(hidden_states, ctx)
        else:
            out = sdpa(hidden_states, hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


def story_flop_budget(unet_config: dict, latent_side: int, steps: int, start_step: int, id_length: int, n_read: int,
                      sampling_rate: float, layer=lambda name: name.startswith("up_blocks") and name.endswith("attn1")
                      ) -> dict:
    """Floating-point work of the story, per implementation (expected values over the token draw).

    The UNet's own work comes from ``torch.utils.flop_counter`` on a meta-device copy (batch
    2 x id_length for the write, 2 for each read image: classifier-free guidance); the consistent
    layers' additions are counted per layer from its token count N and width C:
      write (both): 2 G rows attend to (G - 1) r N extra keys: 4 N C (G - 1) r N per row;
      read (both): 2 rows attend to E = G r N bank keys, and the bank's k and v are projected
                   from its cached inputs: 2 halves x 2 x E C^2 x 2;
      official write only: per image, k and v of the other images' sampled tokens are projected
                   again inside its concatenation: G x 2 halves x 2 x (G - 1) r N C^2 x 2.
    Consistency runs from `start_step` on every call (probability 1, as in the cases below)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    unet_config, text_dim = unet.config, unet.config.cross_attention_dim
    widths = {}  # consistent layer -> (N, C) of its input

    def record(name):
        def hook(mod, args, kwargs):
            widths.setdefault(name, tuple((args or (kwargs["hidden_states"],))[0].shape[1:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name), with_kwargs=True)
             for name, m in unet.named_modules() if layer(name)]
    lat = latent_side

    def unet_flops(batch):
        inputs = dict(sample=torch.empty(batch, unet_config["in_channels"], lat, lat, device="meta"),
                      timestep=torch.zeros(batch, device="meta"),
                      encoder_hidden_states=torch.empty(batch, 77, text_dim, device="meta"))
        if unet_config.get("addition_embed_type") == "text_time":
            emb = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
            inputs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, emb, device="meta"),
                                           "time_ids": torch.empty(batch, 6, device="meta")}
        with FlopCounterMode(display=False) as counter:
            unet(**inputs)
        return counter.get_total_flops()

    try:
        plain_write, plain_read = unet_flops(2 * id_length), unet_flops(2)
    finally:
        for h in hooks:
            h.remove()
    G, r, on = id_length, sampling_rate, steps - start_step
    write_attn = read_extra = official_proj = 0.0
    for N, C in widths.values():
        write_attn += 2 * G * 4 * N * C * (G - 1) * r * N
        E = G * r * N
        read_extra += 2 * 4 * N * C * E + 2 * 2 * E * C * C * 2
        official_proj += G * 2 * 2 * (G - 1) * r * N * C * C * 2
    plain = steps * (plain_write + n_read * plain_read)
    ours = plain + on * (write_attn + n_read * read_extra)
    return {"plain": plain, "ours": ours, "official": ours + on * official_proj, "layers": len(widths)}


def _story_runner(pipe, impl: str, steps: int, size: int):
    from longvideo.methods.storydiffusion import StoryDiffusion

    kw = dict(id_length=ID_LENGTH, num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
              output_type="latent", progress=False, seed=0)
    # the official low-VRAM app's schedule (consistency from step 1, plain attention at step 0): the
    # path the official_lowvram case re-implements
    sched = dict(sampling_rate=0.5, schedule="low_vram", start_step=1, prob_early=1.0, prob_late=1.0)

    def ours(bank_location=None, budget=None):
        def fn():
            method = StoryDiffusion(pipe, bank_location=bank_location, bank_gpu_budget=budget, **sched)
            try:
                return method.generate_story(STORY, **kw)
            finally:
                method.remove()
        return fn

    def official():
        method = StoryDiffusion(pipe, **sched)
        try:
            bank: dict = {}
            mods = dict(pipe.unet.named_modules())
            for name in method.layers:
                mods[name].set_processor(OfficialLowVramProcessor(method.controller, name, bank))
            # the official code keeps the ids in its own dict; the method's bank stays empty
            return method.generate_story(STORY, **kw)
        finally:
            method.remove()

    def plain():
        from longvideo.methods.storydiffusion import parse_story

        texts = [p.text for p in parse_story("\n".join(STORY)).prompts]
        common = dict(num_inference_steps=steps, guidance_scale=5.0, height=size, width=size, output_type="latent")
        pipe(texts[:ID_LENGTH], **common)
        for t in texts[ID_LENGTH:]:
            pipe([t], **common)

    return {"longvideo[auto]": ours(None), "longvideo[auto]+auto_bank": ours("auto", AUTO_BANK_BUDGET),
            "longvideo[auto]+cpu_bank": ours("cpu"), "official_lowvram": official, "plain_sdxl": plain}[impl]


def cases(device: torch.device, quick: bool, profile: str = "full") -> list:
    """``budget``: ours (auto bank on the device) and the official low-VRAM path, one timed story
    each after one warm-up, then plain SDXL."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from longvideo.methods.storydiffusion import parse_story, project_bank_bytes

    if quick:
        from longvideo.models.sd import tiny_pipeline

        pipe = tiny_pipeline("sdxl", seed=0).to(device)
        steps, size, shape = 3, 64, "tiny-sdxl"
    else:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = _sdxl_shaped_pipeline(device, dtype)
        steps, size, shape = 8, 1024, "sdxl-shaped"
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    work = story_flop_budget(pipe.unet.config, size // pipe.vae_scale_factor, steps, 1, ID_LENGTH, len(STORY) - ID_LENGTH, 0.5)
    weights = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    names = parse_story("\n".join(STORY)).characters
    bank = project_bank_bytes(pipe, num_inference_steps=steps, id_length=ID_LENGTH, height=size, width=size,
                              sampling_rate=0.5, schedule="low_vram", start_step=1, prob_early=1.0, prob_late=1.0,
                              characters=names,
                              seed=0)
    bank_official = project_bank_bytes(pipe, num_inference_steps=50, id_length=ID_LENGTH, height=size, width=size,
                                       sampling_rate=0.5, start_step=5, characters=names, seed=0)
    impls = ["longvideo[auto]", "longvideo[auto]+auto_bank", "longvideo[auto]+cpu_bank", "official_lowvram",
             "plain_sdxl"]
    if device.type != "cuda" or profile == "budget":  # the same as the first on a CPU
        impls.remove("longvideo[auto]+auto_bank")
        impls.remove("longvideo[auto]+cpu_bank")
    timing = {"warmup": 1, "repeats": 1} if profile == "budget" else None
    out = []
    for impl in impls:
        out.append(Case(
            suite=SUITE, name=f"story6_{shape}_{size}px", impl=impl, fn=_story_runner(pipe, impl, steps, size),
            timing=timing, kernel_profile=impl in ("longvideo[auto]", "official_lowvram"),
            flops=work["plain" if impl == "plain_sdxl" else "official" if impl == "official_lowvram" else "ours"],
            params={"images": len(STORY), "id_images": ID_LENGTH, "read_images": len(STORY) - ID_LENGTH,
                    "height": size, "width": size, "steps": steps, "start_step": 1, "probability": 1.0,
                    "sampling_rate": 0.5, "unet": shape, "dtype": str(next(pipe.unet.parameters()).dtype)},
            extra={"work_official_over_ours": work["official"] / work["ours"], "weights_bytes": weights,
                   "bank_bytes": bank, "bank_bytes_official_50_steps": bank_official,
                   **({"bank_gpu_budget": AUTO_BANK_BUDGET} if impl.endswith("auto_bank") else {}),
                   "note": "peak_mem_bytes excludes the resident weights; latents only"}))
    return out
