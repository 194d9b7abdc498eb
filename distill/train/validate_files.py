"""What a recipe names on disk, checked before anything is loaded: files, folders, checkpoints.

Part of the one validation pass (`sitdistill.train.validate.validate_recipe`, its entry point):
* paths: that each file or folder exists, is the right kind and is readable. A teacher or VAE
  named like a hub id (``org/name``) that is not a local path is left to the hub client: only then
  can the network be the cause; a single-file teacher must show its model type in its keys;
* resume: the settings a checkpoint cannot change (`FIXED_ON_RESUME`) are the same in the
  checkpoint's `recipe.yaml` as in this recipe. Optimizer settings may change: the trainer applies
  them on resume and says so.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from sitdistill.core import checkpoint as ckpt
from sitdistill.core.recipe import RecipeError, load_yaml

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOY_FAMILIES = ("sd15", "sdxl")

# What a checkpoint fixes: a resumed run must have the same values (the weights' shapes, the
# sampler's batch order, the parts that are saved). Everything else may change on resume.
FIXED_ON_RESUME = (
    "student.preset", "student.hidden_size", "student.depth", "student.num_heads", "student.mlp_ratio",
    "student.qk_norm", "student.text_pool", "student.prediction_type", "student.guidance_embed", "student.init_kind",
    "training.batch_size", "training.seed", "training.fsdp", "training.use_ema",
    "training.train_vae", "training.train_text_encoder", "e2e.vae_mode", "e2e.text_encoder_mode", "e2e.lora_rank",
    "losses.features.student_blocks", "losses.features.teacher_modules", "losses.features.projector_hidden",
    "optimizer.name",
)


def fail(key: str, message: str, where: str) -> RecipeError:
    """The one-line error of every recipe check: the key, what is wrong, where the value came from."""
    return RecipeError(f"'{key}' {message} ({where})")


# --------------------------------------------------------------------------- paths

def _looks_like_hub_id(value: str) -> bool:
    return bool(HUB_ID.match(value)) and not value.startswith((".", "~")) and not os.path.exists(value)


def _check_path(key: str, value: str | None, where: str, kind: str = "any", hub: bool = False) -> None:
    """`value` must exist (a file, a folder or either) and be readable; hub ids pass when `hub`."""
    if value is None or value == "":
        return
    value = str(value)
    if hub and _looks_like_hub_id(value):
        return
    path = Path(os.path.expanduser(value))
    if not path.exists():
        what = {"file": "file", "dir": "folder"}.get(kind, "file or folder")
        hint = " (nor a hub id of the form org/name)" if hub else ""
        raise fail(key, f"names a {what} that does not exist: {path}{hint}", where)
    if kind == "file" and not path.is_file():
        raise fail(key, f"must be a file, and {path} is a folder", where)
    if kind == "dir" and not path.is_dir():
        raise fail(key, f"must be a folder, and {path} is a file", where)
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise fail(key, f"cannot be read: permission denied on {path}", where)



def _check_single_file(source: str, where: str) -> None:
    """A single file without teacher.config: its model type must be readable from its keys."""
    from sitdistill.core.checkpoint import UnsafeFileError
    from sitdistill.teachers.single_file import SingleFileError, detect, read_shapes

    try:
        found = detect(read_shapes(source))
        if found["unet_only"]:
            raise SingleFileError("it holds a UNet only; set teacher.config to a diffusers folder of its base model "
                                  "(for the VAE and text encoders)")
    except SingleFileError as e:
        raise fail("teacher.source", f"{source}: {e}", where) from None
    except UnsafeFileError as e:
        raise fail("teacher.source", str(e), where) from None
    except Exception as e:  # not a safetensors / torch file at all, truncated, ...
        raise fail("teacher.source", f"{source} cannot be read as a checkpoint ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); set teacher.config if it is one", where) from None


def check_paths(r: DictConfig, where: str) -> None:
    from sitdistill.teachers.sd import SINGLE_FILE_SUFFIXES  # (torch only; diffusers is imported when loading)

    te = r.teacher
    if te.source.startswith("toy:"):
        family = te.source[len("toy:"):]
        if family not in TOY_FAMILIES:
            raise fail("teacher.source", f"{te.source!r} is not a toy teacher; choose toy:sd15 or toy:sdxl", where)
    else:
        _check_path("teacher.source", te.source, where, hub=True)
        if Path(te.source).suffix.lower() in SINGLE_FILE_SUFFIXES and te.config is None:
            _check_single_file(te.source, where)
    _check_path("teacher.config", te.config, where, kind="dir", hub=True)
    _check_path("teacher.vae", te.vae, where, hub=True)
    _check_path("data.root", r.data.root, where, kind="dir")
    _check_path("data.cache_dir", r.data.cache_dir if r.data.cache_dir and os.path.exists(r.data.cache_dir)
                else None, where, kind="dir")
    _check_path("student.init", r.student.init, where)
    pf = r.losses.perturbations.prompt_file
    if pf.enabled or (r.losses.perturbations.trajectory.enabled and r.losses.perturbations.trajectory.prompts
                      == "prompt_file"):
        _check_path("losses.perturbations.prompt_file.path", pf.path, where, kind="file")
    ev = r.evaluation
    _check_path("evaluation.prompts_file", ev.prompts_file, where, kind="file")
    _check_path("evaluation.baseline", ev.baseline, where)
    _check_path("evaluation.fid_weights", ev.fid_weights, where)
    _check_path("evaluation.clip_weights", ev.clip_weights, where)
    out = Path(r.output.dir)
    if out.exists() and not out.is_dir():
        raise fail("output.dir", f"is a file, not a folder: {out}", where)
    parent = next((p for p in (out, *out.parents) if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise fail("output.dir", f"cannot be written: permission denied on {parent}", where)
    if r.training.init_from and not (r.training.resume and resume_checkpoint(r, where) is not None):
        # (ignored by a run that resumes from a checkpoint of its own)
        source = Path(r.training.init_from)
        _check_path("training.init_from", str(source), where, kind="dir")
        if not ckpt.is_complete(source) and ckpt.find_latest(source) is None:
            raise fail("training.init_from", f"{source} is neither a complete checkpoint nor a run folder holding one",
                        where)


# --------------------------------------------------------------------------- resume

def resume_checkpoint(r: DictConfig, where: str) -> Path | None:
    """The checkpoint a run will try first (None for a fresh run); checks an explicit path."""
    resume = r.training.resume
    if resume is None:
        return None
    if str(resume) == "latest":
        return ckpt.find_latest(r.output.dir)
    path = Path(resume)
    if not path.exists():
        raise fail("training.resume", f"names a checkpoint that does not exist: {path} (use 'latest' or a "
                    f"{ckpt.CHECKPOINT_PREFIX}N folder)", where)
    if not ckpt.is_complete(path):
        raise fail("training.resume", f"{path} is not a complete checkpoint (a {ckpt.CHECKPOINT_PREFIX}N folder "
                    f"holding {ckpt.COMPLETE})", where)
    return path


def check_resume_compatible(r: DictConfig, path: Path, where: str) -> None:
    """The keys of FIXED_ON_RESUME must equal those of the checkpoint's recipe."""
    try:
        saved = load_yaml(ckpt.read_recipe(path))
    except (OSError, yaml.YAMLError):
        return  # a damaged checkpoint: the trainer's fallback deals with it
    if not isinstance(saved, dict):
        return
    current = OmegaConf.to_container(r, resolve=True)
    for key in FIXED_ON_RESUME:
        old, new = _lookup(saved, key), _lookup(current, key)
        if old is not _MISSING and old != new:
            raise fail(key, f"is {new!r} but {path} was trained with {old!r}; a resumed run cannot change it "
                        "(start a new run, or training.init_from for a new stage)", where)
    if bool(_lookup(saved, "losses.feature") or 0) != bool(r.losses.feature):
        raise fail("losses.feature", f"turns feature alignment {'on' if r.losses.feature else 'off'}, but {path} "
                    "was trained the other way (its projectors are saved with it)", where)


_MISSING = object()


def _lookup(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node

