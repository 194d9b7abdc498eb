"""SD1.5- and SDXL-family teachers via diffusers (a pipeline folder, a hub id, or a single file).

A teacher here is the frozen UNet plus the family's front end (``sitdistill.teachers.frontend``: the prompt
encoding that reproduces the diffusers pipelines, and the VAE); ``load_teacher`` reads both from
one source.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .base import Teacher, unet_pixel_size
from .frontend import NUM_TIME_IDS, SD15FrontEnd, SDXLFrontEnd, first_weight

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class SD15Teacher(Teacher):
    """UNet2DConditionModel + one CLIP text encoder (SD1.x; SD2.x-style v-prediction too)."""

    family = "sd15"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config, *, clip_skip: int | None = None):
        front = SD15FrontEnd(vae, text_encoder, tokenizer, dtype=first_weight(unet).dtype,
                             default_hw=unet_pixel_size(unet, vae), clip_skip=clip_skip)
        super().__init__(unet, front, scheduler_config)

    @property
    def cond_dims(self) -> dict[str, int]:
        return {"encoder_hidden_states": int(self.unet.config.cross_attention_dim)}


class SDXLTeacher(Teacher):
    """Two CLIP text encoders, pooled ``text_embeds`` of encoder 2, ``time_ids`` micro-conditioning."""

    family = "sdxl"

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler_config, *,
                 force_zeros_for_empty_prompt: bool = True, clip_skip: int | None = None):
        front = SDXLFrontEnd(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, dtype=first_weight(unet).dtype,
                             default_hw=unet_pixel_size(unet, vae),
                             force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, clip_skip=clip_skip)
        super().__init__(unet, front, scheduler_config)

    @property
    def cond_dims(self) -> dict[str, int]:
        return {"encoder_hidden_states": int(self.unet.config.cross_attention_dim),
                "text_embeds": int(self.front.text_encoder_2.config.projection_dim), "time_ids": NUM_TIME_IDS}


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
            and the configs that ship with the package are used, offline (``sitdistill.teachers.single_file``).
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
    keys = list(shapes) if single else None  # tensor names (sitdistill.teachers.single_file.read_shapes)
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
