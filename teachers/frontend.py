"""The front end: what turns prompts and images into model inputs (text encoders, tokenizers, VAE).

A teacher is its frozen UNet plus a front end (``Teacher.front``); the student samples through the
same front end, or, after the end-to-end stage, through one of its own built on its trainable
VAE / text encoders (``FrontEnd.with_modules``): the same encoding code on other weights. An
exported pipeline's parts are a front end too (``sitdistill.students.pipeline``).

``encode_prompt`` reproduces what ``StableDiffusionPipeline.encode_prompt`` /
``StableDiffusionXLPipeline.encode_prompt`` (+ ``_get_add_time_ids``) hand to the UNet, step for
step (diffusers 0.42): max-length padding with truncation, the negative batch padded to the prompt
length, SDXL's penultimate hidden states of both encoders concatenated, the pooled projection of
encoder 2, zeroed negatives under ``force_zeros_for_empty_prompt``. The tests compare the two
tensor for tensor.

Clip skip (``clip_skip``, the front end's own setting or per call) is diffusers' definition: SD1.x
takes the hidden state ``clip_skip`` layers before the last and applies the final layer norm;
SDXL takes ``hidden_states[-(clip_skip + 2)]`` of both encoders (the pooled embedding is
unchanged). One deliberate difference: diffusers 0.42 applies clip skip to the prompt only and
encodes the negative prompt without it; here the negative (and so the unconditional input of
caption dropout and CFG) is encoded with the same clip skip, as kohya's scripts train and sample
a clip-skip model. The tests check the prompt against the pipeline and the negative against the
formula. (With transformers 5.x, ``StableDiffusionPipeline.encode_prompt(clip_skip=...)`` of
diffusers 0.42 fails: it reads ``text_encoder.text_model``, which 5.x no longer has; there the SD1.x
prompt is checked against the formula too. SDXL's path reads no such attribute and is compared.)

A front end holds no gradient switch: frozen encoders (``requires_grad`` off) build no graph, and
trainable ones do wherever the caller has gradients on.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

Tensor = torch.Tensor
Cond = dict[str, Tensor]
# SDXL micro-conditioning: original (h, w) + crop (top, left) + target (h, w).
NUM_TIME_IDS = 6


# ---------------------------------------------------------------------------------------------
# The VAE's rules: downsampling factor and latent scaling, written once
# ---------------------------------------------------------------------------------------------


def vae_scale_factor(block_out_channels: Sequence[int]) -> int:
    """Spatial downsampling of a VAE: one factor 2 per block but the last (diffusers' rule)."""
    return 2 ** (len(block_out_channels) - 1)


def latent_stats(vae: nn.Module, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """(mean, std) that normalise raw VAE latents before ``scaling_factor``: the config's
    per-channel ``latents_mean`` / ``latents_std`` when it has both (Playground-style VAEs; what the
    SDXL pipeline reads), else (``shift_factor`` or 0, 1)."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        view = (1, -1) + (1,) * (like.ndim - 2)
        return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(view),
                torch.tensor(std, device=like.device, dtype=like.dtype).view(view))
    return getattr(cfg, "shift_factor", None) or 0.0, 1.0


def scale_latents(vae: nn.Module, z: Tensor, shift: bool = True) -> Tensor:
    """Raw VAE latents -> diffusion latents: (z - mean) * scaling_factor / std (``latent_stats``).
    ``shift=False`` scales a spread (a posterior's std), which the mean does not move."""
    mean, std = latent_stats(vae, z)
    return ((z - mean) if shift else z) * vae.config.scaling_factor / std


def unscale_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Diffusion latents -> raw VAE latents, the inverse of ``scale_latents`` (the pipelines' decode)."""
    mean, std = latent_stats(vae, latents)
    return latents * std / vae.config.scaling_factor + mean


def first_weight(module: nn.Module) -> Tensor:
    """A module's first parameter: its dtype and device in O(1). diffusers' `ModelMixin.dtype` /
    `.device` walk every parameter in Python (4.3 ms a call on the SDXL UNet, asked several times a
    step); a frozen teacher's networks each have one dtype and one device."""
    return next(module.parameters())


# ---------------------------------------------------------------------------------------------
# Prompt helpers (the pipelines' rules)
# ---------------------------------------------------------------------------------------------


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _negatives(negative_prompts: str | Sequence[str] | None, n: int) -> list[str]:
    """The pipelines' rule: None -> "" for every prompt; a string is repeated; a list must match."""
    if negative_prompts is None or isinstance(negative_prompts, str):
        negatives = [negative_prompts or ""] * n
    else:
        negatives = list(negative_prompts)
    if len(negatives) != n:
        raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")
    return negatives


def _tokenize(tokenizer, prompts: list[str], max_length: int) -> Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def _per_sample_sizes(value: Any, n: int, default: tuple[int, int]) -> Tensor:
    """(h, w) / (top, left) for the whole batch or one per sample -> float tensor (N, 2)."""
    sizes = torch.as_tensor(default if value is None else value, dtype=torch.float32)
    if sizes.ndim == 1:
        sizes = sizes.expand(n, 2)
    if sizes.shape != (n, 2):
        raise ValueError(f"expected a pair or {n} pairs, got shape {tuple(sizes.shape)}")
    return sizes


def final_layer_norm(text_encoder) -> nn.Module:
    """The CLIP text encoder's final layer norm: ``text_model.final_layer_norm`` up to transformers
    4.x, ``final_layer_norm`` of the model itself in 5.x (which dropped the ``text_model`` level;
    diffusers 0.42's SD clip-skip path still reads the old one)."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def check_clip_skip(clip_skip: int | None, text_encoder, extra: int = 0) -> int | None:
    """``clip_skip`` (None or 0 = off) must index a hidden state that exists: SD1.x goes back
    ``clip_skip`` layers from the last, SDXL ``clip_skip + 1`` (it starts from the penultimate one)."""
    if not clip_skip:
        return None
    layers = int(text_encoder.config.num_hidden_layers) if text_encoder is not None else None
    if clip_skip < 0 or (layers is not None and clip_skip + extra > layers):
        raise ValueError(f"clip_skip {clip_skip} is more than a {layers}-layer text encoder has")
    return int(clip_skip)


# ---------------------------------------------------------------------------------------------
# Front ends
# ---------------------------------------------------------------------------------------------


class FrontEnd:
    """Text encoder(s) + tokenizer(s) + VAE of one model family.

    ``dtype``: the dtype conditioning is handed over in (the denoiser's); ``default_hw``: the pixel
    (height, width) the pipeline defaults to (SDXL's size conditioning). Subclasses implement
    ``encode_prompt`` and list their text encoders in ``TEXT_ENCODERS``.
    """

    family: str = "base"
    TEXT_ENCODERS: tuple[str, ...] = ()
    TOKENIZERS: tuple[str, ...] = ()

    def __init__(self, vae: nn.Module, *, dtype: torch.dtype, default_hw: tuple[int, int],
                 clip_skip: int | None = None):
        self.vae = vae
        self.dtype = dtype
        self.default_hw = (int(default_hw[0]), int(default_hw[1]))
        self.vae_scale_factor = vae_scale_factor(vae.config.block_out_channels)
        self.latent_channels = int(vae.config.latent_channels)
        self.clip_skip = clip_skip

    def modules(self) -> dict[str, nn.Module]:
        """The networks by name: the VAE and the text encoder(s)."""
        return {"vae": self.vae, **{name: getattr(self, name) for name in self.TEXT_ENCODERS}}

    def with_modules(self, vae: nn.Module | None = None, **text_encoders: nn.Module) -> "FrontEnd":
        """A front end of the same family and settings on other networks (the student side of the
        end-to-end stage): the given VAE / text encoders, this one's for the rest."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return first_weight(self.vae).device

    def default_size(self) -> tuple[int, int]:
        return self.default_hw

    def to(self, device: torch.device | str) -> "FrontEnd":
        """Move every network (dtypes kept, so an fp32 VAE stays fp32)."""
        for module in self.modules().values():
            module.to(device)
        return self

    def encode_prompt(self, prompts: str | list[str], negative_prompts: str | list[str] | None = None,
                      height: int | None = None, width: int | None = None, *, do_cfg: bool = False,
                      **kw: Any) -> Cond | tuple[Cond, Cond]:
        raise NotImplementedError

    # ------------------------------------------------------------------ images <-> latents
    def _for_vae(self, x: Tensor) -> Tensor:
        w = first_weight(self.vae)
        return x.to(device=w.device, dtype=w.dtype)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> Tensor:
        """Pixels in [-1, 1] (N, 3, H, W) -> scaled latents (N, C, H/f, W/f).

        ``sample=True`` draws from the VAE posterior with ``generator`` (what SD training does);
        ``sample=False`` takes its mode. Scaling from ``vae.config`` (``scale_latents``).
        """
        dist = self.vae.encode(self._for_vae(pixels)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return scale_latents(self.vae, z).to(pixels.dtype)

    @torch.no_grad()
    def latent_posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posterior of pixels in [-1, 1] as scaled (mean, std), float32: `encode_images`
        samples mean + std * noise. What the latent cache stores."""
        dist = self.vae.encode(self._for_vae(pixels)).latent_dist
        return scale_latents(self.vae, dist.mean).float(), scale_latents(self.vae, dist.std, shift=False).float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents (N, C, h, w) -> pixels in [-1, 1] (clamped), (N, 3, h*f, w*f), float32."""
        z = unscale_latents(self.vae, self._for_vae(latents))
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)


class SD15FrontEnd(FrontEnd):
    """One CLIP text encoder (SD1.x; SD2.x too) + the VAE."""

    family = "sd15"
    TEXT_ENCODERS = ("text_encoder",)
    TOKENIZERS = ("tokenizer",)

    def __init__(self, vae, text_encoder, tokenizer, *, dtype: torch.dtype, default_hw: tuple[int, int],
                 clip_skip: int | None = None):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        super().__init__(vae, dtype=dtype, default_hw=default_hw, clip_skip=check_clip_skip(clip_skip, text_encoder))

    def with_modules(self, vae=None, **text_encoders) -> "SD15FrontEnd":
        return SD15FrontEnd(vae if vae is not None else self.vae, text_encoders.get("text_encoder", self.text_encoder),
                            self.tokenizer, dtype=self.dtype, default_hw=self.default_hw, clip_skip=self.clip_skip)

    def _embed(self, prompts: list[str], max_length: int, clip_skip: int | None = None) -> Tensor:
        ids = _tokenize(self.tokenizer, prompts, max_length)
        inputs = {"input_ids": ids.to(self.text_encoder.device)}
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                  return_tensors="pt").attention_mask
            inputs["attention_mask"] = mask.to(self.text_encoder.device)
        if not clip_skip:
            # [0] = last_hidden_state after the final layer norm: what SD1.x cross-attends to.
            return self.text_encoder(**inputs)[0].to(self.dtype)  # (N, L, D)
        hidden = self.text_encoder(**inputs, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return final_layer_norm(self.text_encoder)(hidden).to(self.dtype)

    def encode_prompt(self, prompts, negative_prompts=None, height=None, width=None, *, do_cfg=False,
                      clip_skip: int | None = None, **kw) -> Cond | tuple[Cond, Cond]:
        """Prompts -> ``{"encoder_hidden_states": (N, L, D)}``.

        Returns ``cond`` alone, or ``(cond, uncond)`` when ``do_cfg`` is set or negatives are given
        (``uncond`` from ``negative_prompts``, "" by default). ``height``/``width`` are accepted for a
        uniform signature across families and unused here. ``clip_skip``: None = the front end's own.
        """
        prompts = _as_list(prompts)
        skip = check_clip_skip(self.clip_skip if clip_skip is None else clip_skip, self.text_encoder)
        embeds = self._embed(prompts, self.tokenizer.model_max_length, skip)
        cond = {"encoder_hidden_states": embeds}
        if not do_cfg and negative_prompts is None:
            return cond
        # The pipeline pads the negatives to the prompt length (embeds.shape[1]).
        uncond = {"encoder_hidden_states": self._embed(_negatives(negative_prompts, len(prompts)), embeds.shape[1],
                                                       skip)}
        return cond, uncond


class SDXLFrontEnd(FrontEnd):
    """Two CLIP text encoders, pooled ``text_embeds`` of encoder 2, ``time_ids`` micro-conditioning."""

    family = "sdxl"
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
    TOKENIZERS = ("tokenizer", "tokenizer_2")

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, *, dtype: torch.dtype,
                 default_hw: tuple[int, int], force_zeros_for_empty_prompt: bool = True, clip_skip: int | None = None):
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        super().__init__(vae, dtype=dtype, default_hw=default_hw,
                         clip_skip=check_clip_skip(clip_skip, text_encoder, extra=1))

    def with_modules(self, vae=None, **text_encoders) -> "SDXLFrontEnd":
        return SDXLFrontEnd(vae if vae is not None else self.vae, text_encoders.get("text_encoder", self.text_encoder),
                            text_encoders.get("text_encoder_2", self.text_encoder_2), self.tokenizer,
                            self.tokenizer_2, dtype=self.dtype, default_hw=self.default_hw,
                            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, clip_skip=self.clip_skip)

    def _embed(self, prompts: list[str], max_length: int | None = None,
               clip_skip: int | None = None) -> tuple[Tensor, Tensor]:
        """-> (penultimate hidden states of both encoders concatenated (N, L, D1+D2), pooled (N, P));
        with ``clip_skip``, ``hidden_states[-(clip_skip + 2)]`` of both (diffusers' SDXL rule)."""
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = _tokenize(tokenizer, prompts, max_length or tokenizer.model_max_length)
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-((clip_skip or 0) + 2)])  # penultimate layer, no final layer norm
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: [0] is the projected pooled embedding
                pooled = out[0]
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype)

    def time_ids(self, n: int, height: int | None = None, width: int | None = None, original_size=None,
                 crops_coords_top_left=None, target_size=None) -> Tensor:
        """(N, 6) float: original_size (h, w) + crops_coords_top_left (top, left) + target_size (h, w).

        Each may be one pair for the batch or one pair per sample (bucketed training); defaults are
        the pipeline's: (height, width), (0, 0), (height, width).
        """
        dh, dw = self.default_size()
        size = (height or dh, width or dw)
        original = _per_sample_sizes(original_size, n, size)
        crop = _per_sample_sizes(crops_coords_top_left, n, (0, 0))
        target = _per_sample_sizes(target_size, n, size)
        return torch.cat([original, crop, target], dim=1).to(device=self.device, dtype=self.dtype)  # (N, 6)

    def encode_prompt(self, prompts, negative_prompts=None, height=None, width=None, *, do_cfg=False,
                      original_size=None, crops_coords_top_left=None, target_size=None,
                      clip_skip: int | None = None, **kw) -> Cond | tuple[Cond, Cond]:
        """Prompts -> ``{"encoder_hidden_states": (N, L, D1+D2), "text_embeds": (N, P), "time_ids": (N, 6)}``.

        Returns ``cond`` alone, or ``(cond, uncond)`` when ``do_cfg`` is set or negatives are given.
        Without negatives, ``uncond`` is exactly zero if the pipeline's ``force_zeros_for_empty_prompt``
        says so, else the embedding of "". ``uncond`` shares ``cond``'s ``time_ids`` (the pipeline's
        default for ``negative_original_size`` etc.).
        """
        prompts = _as_list(prompts)
        skip = check_clip_skip(self.clip_skip if clip_skip is None else clip_skip, self.text_encoder, extra=1)
        embeds, pooled = self._embed(prompts, clip_skip=skip)
        time_ids = self.time_ids(len(prompts), height, width, original_size, crops_coords_top_left, target_size)
        cond = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
        if not do_cfg and negative_prompts is None:
            return cond
        if negative_prompts is None and self.force_zeros_for_empty_prompt:
            neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            neg_embeds, neg_pooled = self._embed(_negatives(negative_prompts, len(prompts)), embeds.shape[1], skip)
        return cond, {"encoder_hidden_states": neg_embeds, "text_embeds": neg_pooled, "time_ids": time_ids.clone()}


FRONT_ENDS: dict[str, type[FrontEnd]] = {"sd15": SD15FrontEnd, "sdxl": SDXLFrontEnd}
