"""SD1.5- and SDXL-family teachers via diffusers (a pipeline folder, a hub id, or a single file).

``encode_prompt`` reproduces what ``StableDiffusionPipeline.encode_prompt`` /
``StableDiffusionXLPipeline.encode_prompt`` (+ ``_get_add_time_ids``) hand to the UNet, step for
step (diffusers 0.42): max-length padding with truncation, the negative batch padded to the prompt
length, SDXL's penultimate hidden states of both encoders concatenated, the pooled projection of
encoder 2, zeroed negatives under ``force_zeros_for_empty_prompt``. The tests compare the two
tensor for tensor.

Clip skip (``clip_skip``, the teacher's own setting or per call) is diffusers' definition: SD1.x
takes the hidden state ``clip_skip`` layers before the last and applies the final layer norm;
SDXL takes ``hidden_states[-(clip_skip + 2)]`` of both encoders (the pooled embedding is
unchanged). One deliberate difference: diffusers 0.42 applies clip skip to the prompt only and
encodes the negative prompt without it; here the negative (and so the unconditional input of
caption dropout and CFG) is encoded with the same clip skip, as kohya's scripts train and sample
a clip-skip model. The tests check the prompt against the pipeline and the negative against the
formula. (With transformers 5.x, ``StableDiffusionPipeline.encode_prompt(clip_skip=...)`` of
diffusers 0.42 fails: it reads ``text_encoder.text_model``, which 5.x no longer has; there the SD1.x
prompt is checked against the formula too. SDXL's path reads no such attribute and is compared.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .base import Cond, Teacher

Tensor = torch.Tensor
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# SDXL micro-conditioning: original (h, w) + crop (top, left) + target (h, w).
NUM_TIME_IDS = 6


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


class SD15Teacher(Teacher):
    """UNet2DConditionModel + one CLIP text encoder (SD1.x; SD2.x-style v-prediction too)."""

    family = "sd15"
    clip_skip: int | None = None

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config, *, clip_skip: int | None = None):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.clip_skip = check_clip_skip(clip_skip, text_encoder)
        super().__init__(unet, vae, scheduler_config)

    def modules(self) -> dict[str, nn.Module]:
        return {**super().modules(), "text_encoder": self.text_encoder}

    @property
    def cond_dims(self) -> dict[str, int]:
        return {"encoder_hidden_states": int(self.unet.config.cross_attention_dim)}

    def _embed(self, prompts: list[str], max_length: int, clip_skip: int | None = None) -> Tensor:
        ids = _tokenize(self.tokenizer, prompts, max_length)
        inputs = {"input_ids": ids.to(self.text_encoder.device)}
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                  return_tensors="pt").attention_mask
            inputs["attention_mask"] = mask.to(self.text_encoder.device)
        with torch.set_grad_enabled(self.encoders_grad):  # no grad on a teacher (see Teacher.encoders_grad)
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
        uniform signature across families and unused here. ``clip_skip``: None = the teacher's own.
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


class SDXLTeacher(Teacher):
    """Two CLIP text encoders, pooled ``text_embeds`` of encoder 2, ``time_ids`` micro-conditioning."""

    family = "sdxl"
    clip_skip: int | None = None

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler_config, *,
                 force_zeros_for_empty_prompt: bool = True, clip_skip: int | None = None):
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.clip_skip = check_clip_skip(clip_skip, text_encoder, extra=1)
        super().__init__(unet, vae, scheduler_config)

    def modules(self) -> dict[str, nn.Module]:
        return {**super().modules(), "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    @property
    def cond_dims(self) -> dict[str, int]:
        return {"encoder_hidden_states": int(self.unet.config.cross_attention_dim),
                "text_embeds": int(self.text_encoder_2.config.projection_dim), "time_ids": NUM_TIME_IDS}

    def _embed(self, prompts: list[str], max_length: int | None = None,
               clip_skip: int | None = None) -> tuple[Tensor, Tensor]:
        """-> (penultimate hidden states of both encoders concatenated (N, L, D1+D2), pooled (N, P));
        with ``clip_skip``, ``hidden_states[-(clip_skip + 2)]`` of both (diffusers' SDXL rule)."""
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = _tokenize(tokenizer, prompts, max_length or tokenizer.model_max_length)
            with torch.set_grad_enabled(self.encoders_grad):  # no grad on a teacher (Teacher.encoders_grad)
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


# ---------------------------------------------------------------------- loading
def detect_family(unet_config: dict[str, Any]) -> str:
    """SDXL's UNet takes pooled text + time ids (``addition_embed_type="text_time"``); else SD1.x/2.x."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd15"


def _is_single_file(source: str | Path) -> bool:
    return Path(str(source)).suffix.lower() in SINGLE_FILE_SUFFIXES


def _has_prefix(keys: Sequence[str], prefixes: Sequence[str]) -> bool:
    return any(k.startswith(p) for k in keys for p in prefixes)


# Original (ldm / sgm) key prefixes of the non-UNet parts of a full single-file checkpoint.
_LDM_VAE_PREFIXES = ("first_stage_model.",)
_LDM_TEXT_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[family]


def _dtype_kw(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns in recent releases); older
    releases only know ``torch_dtype``. The deprecation helper's presence tells which one is current."""
    from diffusers.utils import deprecation_utils

    new_name = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype" if new_name else "torch_dtype": dtype}


def _override_kwargs(load_kwargs: dict, vae_kwargs: dict) -> dict:
    """``from_pretrained`` options of a VAE override: the teacher's, but never its ``variant`` or
    ``revision`` (those name files and commits of the teacher's repo); the override's own instead."""
    return {**{k: v for k, v in load_kwargs.items() if k not in ("variant", "revision")},
            **{k: v for k, v in vae_kwargs.items() if v is not None}}


def _load_vae(source, config, vae, vae_dtype: torch.dtype, keys: list[str] | None, load_kwargs: dict,
              vae_kwargs: dict | None = None):
    """The VAE in ``vae_dtype``, loaded at that precision (never rounded through a lower one)."""
    from diffusers import AutoencoderKL

    if isinstance(vae, nn.Module):
        return vae.to(dtype=vae_dtype)
    if vae is not None:
        return AutoencoderKL.from_pretrained(vae, **_dtype_kw(vae_dtype), **_override_kwargs(load_kwargs, vae_kwargs or {}))
    if keys is not None and _has_prefix(keys, _LDM_VAE_PREFIXES):
        return AutoencoderKL.from_single_file(str(source), config=str(config), subfolder="vae",
                                              **_dtype_kw(vae_dtype), **load_kwargs)
    return AutoencoderKL.from_pretrained(config if keys is not None else source, subfolder="vae",
                                         **_dtype_kw(vae_dtype), **load_kwargs)


def _vae_config(source, config, vae, load_kwargs: dict, vae_kwargs: dict | None = None) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    if isinstance(vae, nn.Module):
        return dict(vae.config)
    if vae is not None:
        options = {k: v for k, v in _override_kwargs(load_kwargs, vae_kwargs or {}).items() if k != "variant"}
        return dict(AutoencoderKL.load_config(vae, **options))
    return dict(AutoencoderKL.load_config(config if _is_single_file(source) else source, subfolder="vae",
                                          **load_kwargs))


def load_teacher(source: str | Path, family: str | None = None, *, config: str | Path | None = None,
                 vae: str | Path | nn.Module | None = None, dtype: torch.dtype | str = torch.float32,
                 device: torch.device | str = "cpu", vae_fp32: bool | None = None, clip_skip: int | None = None,
                 vae_variant: str | None = None, vae_revision: str | None = None, prediction_type: str | None = None,
                 zero_terminal_snr: bool | None = None, **load_kwargs: Any) -> Teacher:
    """Load a frozen teacher.

    Args:
        source: a diffusers pipeline folder, a hub id (the same ``from_pretrained`` call), or a single
            ``.safetensors`` / ``.ckpt`` file in the original layout (a full ldm SD1.x or sgm SDXL
            checkpoint, or a UNet alone).
        family: one of ``TEACHER_FAMILIES``; detected from the UNet config when None.
        config: for a single file, the diffusers folder or hub id holding the configs (and, for a
            UNet-only file, the other components). None: the model type is read from the file's keys
            and the configs that ship with the package are used, offline (``teachers.single_file``).
        vae: a VAE override (folder / hub id / module), e.g. the fp16-fix SDXL VAE. It is loaded with
            ``vae_variant`` / ``vae_revision`` (default none), never the teacher's ``variant`` /
            ``revision``.
        dtype: dtype of UNet and text encoders ("float16", "bfloat16" or a torch dtype).
        vae_fp32: keep the VAE in float32. None: like diffusers, only when dtype is float16 and the
            VAE config says ``force_upcast``.
        clip_skip: text-encoder layers to skip, diffusers' definition (see the module docstring).
        prediction_type, zero_terminal_snr: the teacher's schedule where its files cannot tell (a single
            file, a folder whose scheduler config is wrong): ``"epsilon"`` / ``"v_prediction"``, and
            ``rescale_betas_zero_snr`` with trailing spacing. None keeps what the source says.
        load_kwargs: passed to ``from_pretrained`` (``variant``, ``revision``, ``local_files_only``...).
    """
    from diffusers import UNet2DConditionModel

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    vae_kwargs = {"variant": vae_variant, "revision": vae_revision}
    single = _is_single_file(source)
    from .single_file import SingleFileError, config_folder, detect, markers, read_shapes, scheduler_overrides

    detected: dict[str, Any] = {}
    if single:
        shapes = read_shapes(source)
        # With the user's configs only the marker keys matter; without, the model type must be known.
        detected = markers(shapes) if config is not None else detect(shapes)
    # The recipe's prediction type / zero terminal SNR, else what a single file's marker keys say.
    overrides = scheduler_overrides(detected, prediction_type, zero_terminal_snr)
    if single:
        if config is None and detected["unet_only"]:
            raise SingleFileError(f"{source} holds a UNet only: its VAE and text encoders come from teacher.config "
                                  f"(a diffusers folder of the base model, {detected['kind']})")
        if config is None:
            config = config_folder(detected["kind"], scheduler_overrides=overrides)
            load_kwargs = {**load_kwargs, "local_files_only": True}
    config_source = config if single else source
    family = family or detect_family(dict(UNet2DConditionModel.load_config(config_source, subfolder="unet",
                                                                         **load_kwargs)))
    if family not in TEACHER_FAMILIES:
        raise ValueError(f"unknown teacher family {family!r}; choose from {sorted(TEACHER_FAMILIES)}")
    if vae_fp32 is None:
        force_upcast = bool(_vae_config(source, config, vae, load_kwargs, vae_kwargs).get("force_upcast", False))
        vae_fp32 = dtype == torch.float16 and force_upcast
    keys = list(shapes) if single else None  # tensor names (teachers.single_file.read_shapes)
    extra: dict[str, Any] = {**_dtype_kw(dtype), **load_kwargs}
    extra["vae"] = _load_vae(source, config, vae, torch.float32 if vae_fp32 else dtype, keys, load_kwargs, vae_kwargs)
    if family == "sd15":
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe_cls = _pipeline_class(family)
    if not single:
        pipe = pipe_cls.from_pretrained(source, **extra)
    elif _has_prefix(keys, _LDM_TEXT_PREFIXES):
        # A full original-layout checkpoint: diffusers converts every part (weights_only for .ckpt).
        pipe = pipe_cls.from_single_file(str(source), config=str(config), **extra)
    else:
        # UNet weights only (or UNet + VAE): the rest comes from the config pipeline.
        unet = UNet2DConditionModel.from_single_file(str(source), config=str(config), subfolder="unet", **_dtype_kw(dtype),
                                                     **load_kwargs)
        pipe = pipe_cls.from_pretrained(config, unet=unet, **extra)

    if overrides:  # the recipe's (or the file's) prediction type and zero-terminal-SNR schedule
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
    common = dict(scheduler_config=dict(pipe.scheduler.config), clip_skip=clip_skip)
    if family == "sd15":
        teacher = SD15Teacher(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, **common)
    else:
        teacher = SDXLTeacher(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer,
                              pipe.tokenizer_2, force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
                              **common)
    return teacher.to(device)


TEACHER_FAMILIES: dict[str, type[Teacher]] = {"sd15": SD15Teacher, "sdxl": SDXLTeacher}
