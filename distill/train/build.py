"""Build the parts of a run from a resolved recipe: teacher, student, optimizer, LR schedule.

Each function takes one recipe section (or two) and returns a ready object, so the trainer reads
as "what happens" and this file as "what it is made of".
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig

from sitdistill.core.muon import MuonAdamW, muon_parameters

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOY_PREFIX = "toy:"


def resolve_teacher_source(source: str) -> str:
    """`toy:sd15` / `toy:sdxl` -> the cached toy teacher folder (built on first use)."""
    if source.startswith(TOY_PREFIX):
        from sitdistill.teachers.toy import ensure_toy_teacher

        return str(ensure_toy_teacher(source[len(TOY_PREFIX):]))
    return source


def _in_hub_cache(repo: str) -> bool:
    """Whether the local hugging-face cache holds a pipeline (model_index.json) for `repo`."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "model_index.json"), str)
    except Exception:  # not a valid repo id
        return False


def load_teacher_from_recipe(cfg: DictConfig, device: torch.device | str = "cpu"):
    """The frozen teacher of the recipe's `teacher` section."""
    from sitdistill.teachers import load_teacher

    options: dict[str, Any] = {"dtype": DTYPES[cfg.dtype], "device": device, "vae_fp32": cfg.vae_fp32,
                               "clip_skip": cfg.clip_skip}
    for key in ("config", "vae", "revision", "variant", "vae_variant", "vae_revision", "prediction_type",
                "zero_terminal_snr"):
        if cfg[key] is not None:
            options[key] = cfg[key]
    source = resolve_teacher_source(cfg.source)
    try:
        return load_teacher(source, family=cfg.family, **options)
    except OSError as e:
        from sitdistill.core.recipe import RecipeError

        if Path(source).exists() or _in_hub_cache(source):
            raise  # the source is here: the error is about something else (teacher.vae, a file in it...)
        offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE",
                                                                                   "TRANSFORMERS_OFFLINE"))
        why = ("offline mode is on (HF_HUB_OFFLINE), so only the local hugging-face cache is read" if offline
               else f"the hub did not provide it: {str(e).splitlines()[0]}")
        raise RecipeError(f"'teacher.source' {source!r} is not a local path and not in the local hugging-face "
                          f"cache; {why}") from None


def official_kind(cfg: DictConfig) -> str | None:
    """`student.init_kind` of an official checkpoint: "sit" (SiT: t in [0, 1], velocity) or "dit"
    (DiT: DDPM steps, eps); null = read from the file name (SiT-..., DiT-...), else None."""
    if cfg.init_kind:
        return cfg.init_kind
    name = Path(str(cfg.init)).name.lower()
    return "sit" if name.startswith("sit") else "dit" if name.startswith("dit") else None


def build_student_from_recipe(cfg: DictConfig, teacher) -> torch.nn.Module:
    """The student of the recipe's `student` section, shaped by the teacher's conditioning."""
    from sitdistill.students import SiT, build_student

    overrides = {k: cfg[k] for k in ("hidden_size", "depth", "num_heads", "mlp_ratio") if cfg[k] is not None}
    overrides.update(in_channels=teacher.latent_channels, prediction_type=cfg.prediction_type, qk_norm=cfg.qk_norm,
                     text_pool=cfg.text_pool, guidance_embed=cfg.guidance_embed)
    if cfg.init and str(cfg.init).endswith((".pt", ".pth", ".ckpt", ".safetensors")) and not Path(
            str(cfg.init)).is_dir():
        dims = build_student(cfg.preset, cond_dims=teacher.cond_dims, **overrides).config
        keep = ("text_dim", "pooled_dim", "time_ids_dim", "in_channels", "prediction_type", "qk_norm", "text_pool",
                "guidance_embed")
        time = {}
        if official_kind(cfg) == "sit":  # SiT's t in [0, 1] on its linear interpolant, velocity out
            wanted = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                      "rescale_betas_zero_snr")
            time = dict(time_input="sit", noise_schedule={k: teacher.scheduler_config[k] for k in wanted
                                                          if teacher.scheduler_config.get(k) is not None})
        student = SiT.from_official_checkpoint(cfg.init, num_classes=0, learn_sigma=False,
                                               **{k: dims[k] for k in keep}, **time)
    elif cfg.init:
        student = SiT.from_pretrained(cfg.init)
    else:
        student = build_student(cfg.preset, cond_dims=teacher.cond_dims, **overrides)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return student


FUSED_ADAMW_DEVICES = ("cuda", "cpu")
# Packages that provide 8-bit AdamW (`optimizer.name: adamw8bit`), in the order they are tried.
# torchao's works on the CPU and CUDA (its first step compiles the update once per weight shape);
# bitsandbytes' is CUDA kernels. Neither is a dependency: `pip install "sitdistill[lowbit]"`.
LOWBIT_PACKAGES = ("torchao", "bitsandbytes")


def lowbit_adamw_backend() -> str | None:
    """The first importable package of LOWBIT_PACKAGES, or None."""
    import importlib.util

    return next((name for name in LOWBIT_PACKAGES if importlib.util.find_spec(name) is not None), None)


def lowbit_missing_message() -> str:
    return ("needs torchao or bitsandbytes, and neither is installed: pip install 'sitdistill[lowbit]' "
            "(or use optimizer.name=adamw)")


def _adamw8bit(groups: list[dict], cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW with both moments stored in 8 bits (blockwise quantised, Dettmers et al. 2022): a
    quarter of AdamW's state memory (2 bytes per weight instead of 8)."""
    backend = lowbit_adamw_backend()
    if backend is None:
        from sitdistill.core.recipe import RecipeError

        raise RecipeError(f"'optimizer.name' is adamw8bit, which {lowbit_missing_message()}")
    if backend == "torchao":
        from torchao.optim import AdamW8bit
    else:
        from bitsandbytes.optim import AdamW8bit
    return AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def student_param_groups(student: torch.nn.Module, cfg: DictConfig) -> list[dict]:
    """The student's trainable parameters as optimizer groups: one AdamW group, or for
    `optimizer.name: muon` the blocks' 2-D weights (Muon, at lr x muon_lr_scale) and the rest (AdamW);
    `optimizer.muon_exclude` keeps the block matrices whose names contain one of its parts on AdamW."""
    if cfg.name != "muon":
        return [{"params": [p for p in student.parameters() if p.requires_grad]}]
    try:
        muon, rest = muon_parameters(student, exclude=cfg.muon_exclude)
    except ValueError as err:
        from sitdistill.core.recipe import RecipeError

        raise RecipeError(f"'optimizer.muon_exclude': {err}") from None
    return [{"params": muon, "muon": True, "lr": cfg.lr * cfg.muon_lr_scale}, {"params": rest}]


def build_optimizer(groups: Iterable[dict], cfg: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused kernel where the device has one (CUDA, and CPU since torch 2.4: about 6x
    faster than the default per-tensor loop for a 30 M-parameter student), unless the recipe says
    otherwise. `optimizer.name: adamw8bit`: 8-bit AdamW from torchao or bitsandbytes; `muon`: Muon
    for the groups marked ``muon=True`` (`student_param_groups`), AdamW for the others."""
    if cfg.name == "adamw8bit":
        return _adamw8bit(list(groups), cfg)
    if cfg.name == "muon":
        return MuonAdamW(list(groups), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                         weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                         ns_dtype=cfg.muon_ns_dtype, ns_form=cfg.muon_ns_form)
    fused = cfg.fused if cfg.fused is not None else device.type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(list(groups), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused)


def lr_multiplier(step: int, *, kind: str, warmup_steps: int, total_steps: int | None, min_ratio: float) -> float:
    """Linear warmup, then constant / cosine / linear decay to `min_ratio` of the peak."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant" or not total_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig, total_steps: int | None):
    def fn(step: int) -> float:
        return lr_multiplier(step, kind=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
                             total_steps=total_steps, min_ratio=cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
