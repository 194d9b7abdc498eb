"""SiT student: the adaLN-Zero transformer of SiT/DiT, extended with text conditioning and any grid.

What it keeps from the official SiT (willisma/SiT ``models.py``, itself DiT's ``models.py``):
patch embedding, sinusoidal(256) + MLP timestep embedding, class embedding with a null token,
blocks with adaLN-Zero modulation (shift/scale/gate for attention and MLP, gates zero at init),
a zero-initialised final layer; module names and tensor layouts are the official ones, so an
official checkpoint loads tensor for tensor (``SiT.from_official_checkpoint``).

What it adds:
* cross-attention to projected text tokens in every block (PixArt-alpha places it between
  self-attention and MLP), output projection zero-initialised so a fresh block -- or a block
  loaded from an ImageNet checkpoint -- computes exactly what it did without text;
* the pooled text embedding and SDXL's micro-conditioning (``time_ids``, each value through a
  256-d sinusoid as diffusers' ``addition_time_embed_dim``) added to the timestep embedding
  through one MLP, as SDXL's ``add_embedding`` does; its last layer is zero-initialised too;
* 2-D sin-cos positions computed for the actual (h, w) grid and cached per shape (official SiT
  stores one square table, which breaks aspect buckets);
* SDPA attention, optional QK-norm, per-block gradient checkpointing, norms and modulation in
  fp32 so bf16 autocast is safe.

Conventions.
* ``t``: by default the teacher's integer DDPM timestep (0..T-1, float allowed) is embedded as it
  is -- DiT's convention. ``timestep_scale`` multiplies t before the sinusoid: official SiT
  trains on continuous t in [0, 1] (0 = noise, 1 = data, the reverse of DDPM), so a student that
  starts from SiT weights and is fed DDPM steps may set ``timestep_scale=1/1000`` to keep the
  embedding in the range those weights have seen. Equality with the official forward holds at
  ``timestep_scale=1`` for whatever t the official code is given.
* ``time_input="sit"`` (a student started from an official SiT checkpoint): the teacher's DDPM
  state is mapped to SiT's linear interpolant x_s = s x_data + (1 - s) noise at equal SNR:
  s = a / (a + sigma) with (a, sigma) = (sqrt(abar_t), sqrt(1 - abar_t)) of the teacher's schedule
  (``noise_schedule``), the input is scaled by 1 / (a + sigma), s is what the time embedding sees,
  and SiT's velocity (x_data - noise) is converted to the student's ``prediction_type``
  (eps = x_s - s v). DiT checkpoints were trained on DDPM steps and keep ``time_input="ddpm"``.
* Output: (N, C, H, W), the prediction named by ``prediction_type`` (``"epsilon"`` by default,
  the teacher's convention; ``"v_prediction"`` optional -- the network is the same, the trainer
  picks the target). With ``learn_sigma`` the network has 2C output channels like the official
  one and, like official SiT's ``forward``, returns the first C (the sigma half is dropped).
* Classifier-free guidance: the unconditional branch is the teacher's own encoding of the empty /
  negative prompt (CLIP of "" for SD1.5, zeros for SDXL with ``force_zeros_for_empty_prompt``),
  passed through the same keywords; ``forward_with_cfg`` batches both branches. Class-conditional
  models use DiT's null class (index ``num_classes``).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from sitdistill.core.guidance import cfg_batch, guide
from sitdistill.students.layers import (ZERO_INIT_STD, AddedCondEmbedder, FinalLayer, LabelEmbedder,
                             PatchEmbed, SiTBlock, TimestepEmbedder, sincos_pos_embed_2d)
from sitdistill.students.official import (_SIZES, OFFICIAL_HEADS_BY_WIDTH, LoadReport, load_into, load_official_state_dict,
                               official_config_from_state_dict)

logger = logging.getLogger(__name__)

TIME_INPUTS = ("ddpm", "sit")
GUIDANCE_EMBED_SCALE = 100.0  # w -> the sinusoid's input: w = 1..15 spans 100..1500, like timesteps
PREDICTION_TYPES = ("epsilon", "v_prediction")

# Presets: the official SiT sizes (S/B/L/XL x patch 2/4/8) and the seed's 2b/3b.
PRESETS: dict[str, dict] = {
    f"{name}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for name, (depth, hidden, heads) in _SIZES.items()
    for patch in (1, 2, 4, 8)
}
PRESETS["2b"] = dict(depth=42, hidden_size=1536, num_heads=24, patch_size=2)
PRESETS["3b"] = dict(depth=48, hidden_size=1792, num_heads=28, patch_size=2)

# How the teacher's conditioning keys (``teacher.cond_dims``) map onto the student's config.
COND_DIM_FIELDS = {"encoder_hidden_states": "text_dim", "text_embeds": "pooled_dim", "time_ids": "time_ids_dim"}


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class SiT(ModelMixin, ConfigMixin):
    """Text-conditioned SiT for any latent (h, w) divisible by the patch size. See the module doc.

    diffusers ``ModelMixin``: ``save_pretrained`` / ``from_pretrained`` (config.json + safetensors),
    ``enable_gradient_checkpointing()`` (each block recomputed in backward).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SiTBlock"]          # FSDP / device_map wrap unit

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,              # default latent side (only a default: any h, w works)
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        text_dim: int = 0,                 # width of encoder_hidden_states; 0 = no cross-attention
        pooled_dim: int = 0,               # width of the pooled text_embeds; 0 = none
        time_ids_dim: int = 0,             # number of SDXL micro-conditioning values; 0 = none
        num_classes: int = 0,              # 0 = no class conditioning
        class_dropout_prob: float = 0.1,   # DiT's label dropout; > 0 adds the null class row
        learn_sigma: bool = False,
        qk_norm: bool = False,
        prediction_type: str = "epsilon",
        timestep_scale: float = 1.0,       # t is multiplied by this before the sinusoid
        text_pool: bool = False,           # mean of the projected text tokens added to the adaLN input
        guidance_embed: bool = False,      # the CFG scale w as an input (guided-teacher distillation)
        time_input: str = "ddpm",          # "ddpm": t as given; "sit": equal-SNR map to SiT's interpolant
        noise_schedule: dict | None = None,  # the teacher's betas (scheduler-config keys), for time_input="sit"
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {time_input!r}")
        if time_input == "sit":
            from sitdistill.core.schedule import NoiseSchedule

            if not noise_schedule:
                raise ValueError("time_input='sit' needs noise_schedule (the teacher's scheduler-config betas)")
            # The teacher's own schedule (and its rule for fractional steps), kept in fp32: not a
            # module, so a half-precision cast of the student never touches it.
            self._ddpm = NoiseSchedule.from_config(noise_schedule)
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes else None
        self.add_embedder = AddedCondEmbedder(pooled_dim, time_ids_dim, hidden_size) if pooled_dim or time_ids_dim else None
        # Caption projection, as PixArt-alpha: Linear -> GELU(tanh) -> Linear, teacher width -> D.
        self.text_embedder = (
            nn.Sequential(nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size))
            if text_dim else None
        )
        # A global text signal for every modulation (the role SDXL's pooled embeds play), computed by
        # the student itself from the text tokens, so it works for teachers without pooled embeds.
        self.text_pooler = (nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, hidden_size))
                            if text_pool and text_dim else None)
        # The guidance scale w of a guided teacher's target, embedded like a timestep and added to the
        # adaLN input (LCM's w-conditioning); zero-initialised, so it starts as no input at all.
        self.g_embedder = TimestepEmbedder(hidden_size) if guidance_embed else None
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, cross_attention=text_dim > 0, qk_norm=qk_norm) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.gradient_checkpointing = False
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init (xavier linears, zero adaLN and final layer) plus zero text-path outputs."""
        def basic(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(basic)
        w = self.x_embedder.proj.weight                 # patch embed initialised like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=ZERO_INIT_STD)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=ZERO_INIT_STD)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=ZERO_INIT_STD)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        zero += [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [block.cross_attn.proj for block in self.blocks if block.cross_attn is not None]
        if self.add_embedder is not None:
            zero.append(self.add_embedder.mlp[-1])
        if self.text_pooler is not None:
            zero.append(self.text_pooler[-1])
        if self.g_embedder is not None:
            zero.append(self.g_embedder.mlp[2])
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ---- helpers ---------------------------------------------------------------------------

    def pos_embed(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Sin-cos positions of an h x w grid, (1, h*w, D) fp32, cached per (h, w, device)."""
        key = (h, w, str(device))
        if key not in self._pos_cache:
            # built on the CPU in float64 (not every accelerator has it), then moved once
            self._pos_cache[key] = sincos_pos_embed_2d(self.config.hidden_size, h, w).unsqueeze(0).to(device)
        return self._pos_cache[key]

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(N, h*w, p*p*C) -> (N, C, h*p, w*p); channel fastest within a patch, as official."""
        p, c = self.config.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_conditioning(self, encoder_hidden_states, text_embeds, time_ids, class_labels) -> None:
        cfg = self.config
        wanted = {
            "encoder_hidden_states": (encoder_hidden_states, cfg.text_dim),
            "text_embeds": (text_embeds, cfg.pooled_dim),
            "time_ids": (time_ids, cfg.time_ids_dim),
            "class_labels": (class_labels, cfg.num_classes),
        }
        for name, (value, width) in wanted.items():
            if width and value is None:
                raise ValueError(
                    f"this student is conditioned on {name} (width {width}): pass it; for the unconditional "
                    f"branch pass the teacher's encoding of the empty/negative prompt (or the null class)"
                )
            if not width and value is not None:
                raise ValueError(f"this student has no {name} input (its config sets the width to 0)")
            if width and name != "class_labels" and value.shape[-1] != width:
                raise ValueError(f"{name} has last dim {value.shape[-1]}, the student expects {width}")

    @staticmethod
    def _cross_attention_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
        """diffusers' encoder_attention_mask (N, L), 1 = keep -> SDPA boolean mask (N, 1, 1, L)."""
        if mask is None:
            return None
        keep = mask.bool()
        # A row with every token masked would give NaN in softmax: let it attend to all instead.
        keep = keep | ~keep.any(dim=-1, keepdim=True)
        return keep[:, None, None, :]

    @staticmethod
    def _pool_text(ctx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean over the text tokens (N, L, D) -> (N, D), over the kept ones when a mask is given."""
        if mask is None:
            return ctx.mean(dim=1)
        keep = mask[:, 0, 0, :, None].to(ctx.dtype)                                   # (N, L, 1)
        return (ctx * keep).sum(dim=1) / keep.sum(dim=1)

    # ---- forward ---------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_features: bool | list[int] = False,
        guidance: torch.Tensor | float | None = None,
    ):
        """Predict (N, C, H, W) from latents x (N, C, H, W) at timesteps t (N,) or scalar.

        Conditioning keywords are the diffusers UNet's (``student(x_t, t, **cond)``).
        ``guidance``: the CFG scale w (N,) or scalar of a ``guidance_embed`` student (default 1: the
        unguided prediction); refused by a student without it.
        ``return_features``: True (every block) or a list of block indices -> returns
        ``(out, [block outputs (N, T, D) in the order asked], (h, w))``.
        """
        cfg = self.config
        n, _, height, width = x.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {p}")
        h, w = height // p, width // p
        self._check_conditioning(encoder_hidden_states, text_embeds, time_ids, class_labels)

        sit = cfg.time_input == "sit"
        if sit:
            x_in, s_time, a, sigma = self._to_sit(x, t)                     # SiT's x_s, s (N,)
            x, t = x_in, s_time
        x = self.x_embedder(x)                                              # (N, T, D), T = h * w
        x = x + self.pos_embed(h, w, x.device).to(x.dtype)                  # (N, T, D)
        t = torch.as_tensor(t, device=x.device).float().expand(n) * cfg.timestep_scale
        with torch.autocast(x.device.type, enabled=False):  # (N, D) vectors that set every modulation: fp32
            c = self.t_embedder(t)                                          # (N, D)
            if self.y_embedder is not None:
                c = c + self.y_embedder(class_labels, self.training)        # (N, D)
            if self.add_embedder is not None:
                c = c + self.add_embedder(text_embeds, time_ids)            # (N, D)
            if self.g_embedder is not None:
                scale = torch.as_tensor(1.0 if guidance is None else guidance, device=x.device).float().expand(n)
                c = c + self.g_embedder(scale * GUIDANCE_EMBED_SCALE)       # (N, D)
            elif guidance is not None:
                raise ValueError("this student has no guidance input (its config sets guidance_embed false)")
        ctx = None
        if self.text_embedder is not None:
            ctx = self.text_embedder(encoder_hidden_states.to(self.text_embedder[0].weight.dtype))   # (N, L, D)
        ctx_mask = self._cross_attention_mask(encoder_attention_mask)
        if self.text_pooler is not None:
            c = c + self.text_pooler(self._pool_text(ctx, ctx_mask).float())   # (N, D)

        if return_features is True:
            return_features = list(range(len(self.blocks)))
        wanted = {int(i) % len(self.blocks) for i in (return_features or [])}
        features = {}
        for i, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, ctx, ctx_mask)
            else:
                x = block(x, c, ctx, ctx_mask)                              # (N, T, D)
            if i in wanted:
                features[i] = x
        x = self.final_layer(x, c)                                          # (N, T, p*p*C_out)
        x = self.unpatchify(x, h, w)                                        # (N, C_out, H, W)
        if cfg.learn_sigma:
            x = x[:, : cfg.in_channels]                                     # official SiT drops the sigma half
        if sit:
            x = self._from_sit(x, x_in, s_time, a, sigma)
        if return_features:
            return x, [features[int(i) % len(self.blocks)] for i in return_features], (h, w)
        return x

    def _to_sit(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """DDPM x_t at step t -> (x_s, s, a, sigma) on SiT's linear interpolant at the same SNR."""
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device).expand(n)
        if self._ddpm.alphas_cumprod.device != x.device:  # moved once, not copied every forward
            self._ddpm.to(x.device)
        xf = x.float()
        abar = self._ddpm._alphas_cumprod_at(t, xf)                           # (N,) fp32, as the teacher's schedule
        a, sigma = abar.sqrt(), (1 - abar).sqrt()
        view = (n,) + (1,) * (x.ndim - 1)
        return (xf / (a + sigma).view(view)).to(x.dtype), a / (a + sigma), a, sigma

    def _from_sit(self, v: torch.Tensor, x_s: torch.Tensor, s, a, sigma) -> torch.Tensor:
        """SiT's velocity (x_data - noise) -> the student's prediction_type in the DDPM convention."""
        dtype = v.dtype
        view = (v.shape[0],) + (1,) * (v.ndim - 1)
        s, a, sigma = s.view(view), a.view(view), sigma.view(view)
        v, x_s = v.float(), x_s.float()
        eps = x_s - s * v                                                    # x_s = s x0 + (1 - s) eps
        if self.config.prediction_type == "epsilon":
            return eps.to(dtype)
        x0 = x_s + (1 - s) * v
        return (a * eps - sigma * x0).to(dtype)                              # DDPM v

    def forward_with_cfg(self, x: torch.Tensor, t, cond: dict, uncond: dict, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance in one batched forward: uncond + s * (cond - uncond).

        ``uncond`` is the teacher's encoding of the empty/negative prompt (same keys as ``cond``);
        batch order [uncond, cond] as diffusers pipelines.
        """
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        out_uncond, out_cond = self(torch.cat([x, x]), torch.cat([t, t]), **cfg_batch(uncond, cond)).chunk(2)
        return guide(out_uncond, out_cond, guidance_scale)

    # ---- official checkpoints --------------------------------------------------------------

    @classmethod
    def from_official_checkpoint(cls, path: str | os.PathLike, return_report: bool = False, **overrides):
        """Build from an official SiT/DiT ImageNet checkpoint (willisma/SiT / facebookresearch/DiT layout).

        With no overrides the architecture is read from the tensors and the class-conditional model
        is built; overrides (e.g. ``text_dim=768, num_classes=0, learn_sigma=False``) reshape it for
        distillation. Shared tensors are loaded, new ones keep their init; tensors that do not fit
        are skipped and reported. With ``learn_sigma=False`` over a learn_sigma checkpoint the
        epsilon half of the final layer is loaded. Returns the model (and a ``LoadReport`` when
        ``return_report``); the report is also logged.
        """
        state = load_official_state_dict(path)
        config = {**official_config_from_state_dict(state), **overrides}
        if "num_heads" not in config:
            raise ValueError(f"width {config['hidden_size']} is not an official SiT/DiT preset "
                             f"({sorted(OFFICIAL_HEADS_BY_WIDTH)}): pass num_heads=")
        model = cls(**config)
        report = model.load_official_state_dict(state)
        logger.info("official checkpoint %s:\n%s", path, report)
        return (model, report) if return_report else model

    def load_official_state_dict(self, state: dict[str, torch.Tensor]) -> LoadReport:
        """Copy every official tensor that fits into this model; see ``from_official_checkpoint``."""
        return load_into(self, state)


# ----------------------------------------------------------------------------------------------
# Public constructors
# ----------------------------------------------------------------------------------------------

def build_student(preset: str, cond_dims: dict[str, int] | None = None, **overrides) -> SiT:
    """Build a student from a preset name (``PRESETS`` keys) and the teacher's ``cond_dims``.

    ``cond_dims`` is ``teacher.cond_dims``, e.g. ``{"encoder_hidden_states": 2048, "text_embeds": 1280,
    "time_ids": 6}``; it sets text_dim / pooled_dim / time_ids_dim. ``overrides`` are config fields.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown student preset {preset!r}; choose one of {list(PRESETS)}")
    config = dict(PRESETS[preset])
    for key, dim in (cond_dims or {}).items():
        if key not in COND_DIM_FIELDS:
            raise ValueError(f"unknown conditioning key {key!r} in cond_dims; known: {list(COND_DIM_FIELDS)}")
        config[COND_DIM_FIELDS[key]] = int(dim)
    config.update(overrides)
    return SiT(**config)


def count_parameters(preset: str, cond_dims: dict[str, int] | None = None, **overrides) -> int:
    """Parameter count of a preset, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_student(preset, cond_dims, **overrides)
    return sum(p.numel() for p in model.parameters())
