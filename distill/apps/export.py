"""Reading student checkpoints in every form, and exporting them.

A student can come from
  * a checkpoint folder ``run/checkpoint-{step}/`` (``student/`` and ``ema/`` save_pretrained
    folders + the run's resolved ``recipe.yaml``),
  * a run folder (its latest complete checkpoint),
  * a seed-format file ``sit_model.pt`` / ``ema_model.pt`` (the seed's ``torch.save`` of a state
    dict, read with ``weights_only=True``). Its architecture comes from a ``config.json`` beside it
    (what ``export_seed`` writes), else from ``--model_size`` + the teacher's conditioning sizes;
    its teacher from a ``recipe.yaml`` beside it, else from the recipe given.

The teacher (VAE, text encoders, scheduler config) is never inside a checkpoint: it is loaded from
the recipe's ``teacher`` section (``sitdistill.train.build.load_teacher_from_recipe``).

Exports: ``export_diffusers`` writes a ``sitdistill.students.pipeline.SiTPipeline`` folder (student + the
teacher's VAE, text encoders, tokenizers and the sampler's scheduler config);
``export_seed`` writes the seed's file names (``sit_model.pt``, ``ema_model.pt``) + config + recipe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from sitdistill.core import checkpoint as ckpt
from sitdistill.core.recipe import default_pixel_size, load_recipe, save_recipe

SEED_MODEL_FILE = "sit_model.pt"
SEED_EMA_FILE = "ema_model.pt"
SEED_FILES = {"raw": SEED_MODEL_FILE, "ema": SEED_EMA_FILE}
CONFIG_FILE = "config.json"
WEIGHTS = ("ema", "raw")
# Checkpoint sub-folder of each weight choice.
WEIGHT_FOLDERS = {"ema": "ema", "raw": "student"}


@dataclass
class StudentSource:
    """Where a student's weights, architecture and recipe come from (see the module docstring)."""

    path: Path            # checkpoint folder, or the seed-format file
    kind: str             # "checkpoint" | "seed"
    recipe: DictConfig    # the resolved recipe of the run (for the teacher and the sampling defaults)

    @property
    def label(self) -> str:
        return str(self.path)


def resolve_checkpoint(path: str | os.PathLike, recipe: str | os.PathLike | None = None,
                       overrides: list[str] | None = None) -> StudentSource:
    """A checkpoint folder, a run folder (latest checkpoint) or a seed-format ``.pt`` file."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in (".pt", ".pth", ".bin", ".safetensors"):
            raise ValueError(f"{path}: expected a checkpoint folder, a run folder or a .pt weights file")
        recipe_path = Path(recipe) if recipe else path.parent / ckpt.RECIPE_FILE
        if not recipe_path.is_file():
            raise FileNotFoundError(f"{path} has no {ckpt.RECIPE_FILE} beside it: give --recipe (it names the teacher)")
        return StudentSource(path, "seed", load_recipe(recipe_path, overrides))
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not ckpt.is_complete(path):
        latest = ckpt.find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run folder with one")
        path = latest
    recipe_path = Path(recipe) if recipe else path / ckpt.RECIPE_FILE
    return StudentSource(path, "checkpoint", load_recipe(recipe_path, overrides))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = ckpt.load_weights_only(path)
    for key in ("ema", "model", "state_dict"):  # training-state dicts keep the weights under a key
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def load_student(source: StudentSource, *, weights: str = "ema", teacher=None, model_size: str | None = None,
                 device: torch.device | str = "cpu"):
    """The student in eval mode. ``weights``: "ema" (falls back to raw, with a note, when the run
    kept no EMA) or "raw". ``teacher`` is needed only for a seed file without ``config.json``."""
    from sitdistill.students import SiT, build_student

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if source.kind == "checkpoint":
        folder = source.path / WEIGHT_FOLDERS[weights]
        if not folder.is_dir() and weights == "ema":
            print(f"note: {source.path} holds no EMA weights; using the raw student")
            folder = source.path / WEIGHT_FOLDERS["raw"]
        return SiT.from_pretrained(folder).to(device).eval()
    state = _read_state(source.path)
    config_file = source.path.parent / CONFIG_FILE
    if config_file.is_file():
        config = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
        student = SiT(**config)
    else:
        if teacher is None:
            raise ValueError("a seed-format file without config.json needs the teacher (for its conditioning sizes)")
        s = source.recipe.student
        preset = model_size or s.preset
        shape = {k: s[k] for k in ("hidden_size", "depth", "num_heads", "mlp_ratio") if s[k] is not None and not model_size}
        student = build_student(preset, cond_dims=teacher.cond_dims, in_channels=teacher.latent_channels,
                                prediction_type=s.prediction_type, qk_norm=s.qk_norm, **shape)
    hint = "check --model_size and the recipe"
    try:
        result = student.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise RuntimeError(f"{source.path} does not fit the student: {str(e).splitlines()[1:3]}; {hint}") from None
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"{source.path} does not fit the student: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}; {hint}")
    return student.to(device).eval()


def load_teacher_for(source: StudentSource, device: torch.device | str = "cpu"):
    """The frozen teacher named by the source's recipe."""
    from sitdistill.train.build import load_teacher_from_recipe

    return load_teacher_from_recipe(source.recipe.teacher, device)


def build_pipeline(source: StudentSource, *, weights: str = "ema", scheduler: str | None = None,
                   model_size: str | None = None, device: torch.device | str = "cpu", teacher=None):
    """An in-memory ``SiTPipeline`` for a checkpoint (what `cli.py sample` runs and `export` saves)."""
    from sitdistill.train.e2e import load_student_side
    from sitdistill.infer.sampling import make_scheduler
    from sitdistill.students.pipeline import SiTPipeline

    teacher = teacher or load_teacher_for(source, device)
    student = load_student(source, weights=weights, teacher=teacher, model_size=model_size, device=device)
    sampler = make_scheduler(scheduler or source.recipe.sampling.scheduler, teacher.scheduler_config,
                             student.config.prediction_type)  # the student's own output type
    # After the end-to-end stage the student has its own VAE / text encoders (else: the teacher's).
    own = load_student_side(source.path, teacher) if source.kind == "checkpoint" else None
    pipe = SiTPipeline.from_front_end(own or teacher.front, student, sampler,
                                      default_hw=default_pixel_size(source.recipe))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _empty_folder(out: str | os.PathLike) -> Path:
    """An export never mixes with older files (a stale component folder would be loaded)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_diffusers(source: StudentSource, out: str | os.PathLike, *, weights: str = "ema",
                     scheduler: str | None = None, model_size: str | None = None) -> Path:
    """Write a folder that ``SiTPipeline.from_pretrained(out)`` loads (safetensors everywhere)."""
    out = _empty_folder(out)
    pipe = build_pipeline(source, weights=weights, scheduler=scheduler, model_size=model_size)
    pipe.save_pretrained(out, safe_serialization=True)
    save_recipe(source.recipe, out / ckpt.RECIPE_FILE)  # provenance: what trained it, from which teacher
    return out


def export_seed(source: StudentSource, out: str | os.PathLike, *, model_size: str | None = None) -> Path:
    """The seed's layout: ``sit_model.pt`` (raw), ``ema_model.pt`` (when kept), plus ``config.json``
    (the student's architecture) and ``recipe.yaml`` (its teacher), so ``--checkpoint out/sit_model.pt``
    works without further flags."""
    out = _empty_folder(out)
    teacher = None if source.kind == "checkpoint" else load_teacher_for(source)
    written = None
    for weights, name in SEED_FILES.items():
        if source.kind == "checkpoint" and not (source.path / WEIGHT_FOLDERS[weights]).is_dir():
            continue
        if source.kind == "seed" and weights == "ema":
            continue  # a single seed file is one set of weights
        student = load_student(source, weights=weights, teacher=teacher, model_size=model_size)
        torch.save({k: v.contiguous() for k, v in student.state_dict().items()}, out / name)
        written = student
    if written is None:
        raise FileNotFoundError(f"no student weights in {source.path}")
    config = {k: v for k, v in dict(written.config).items() if not k.startswith("_")}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_recipe(source.recipe, out / ckpt.RECIPE_FILE)
    return out
