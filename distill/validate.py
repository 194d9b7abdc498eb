"""One validation pass over a resolved recipe, before anything is loaded or written.

`validate_recipe(recipe, where)` checks every range and every path the recipe names, and, when the
run resumes, that the checkpoint was written by a compatible recipe. Each problem is a
`RecipeError` whose message is one line naming the key (and the file or folder concerned), which
the command line turns into exit code 2 with nothing written.

What is checked:
* ranges: counts >= 1 (or >= 0 where 0 means "off"), probabilities in [0, 1], rates > 0, pairs in
  order, a student whose width divides into its heads;
* paths: that each file or folder exists, is the right kind and is readable. A teacher or VAE
  named like a hub id (``org/name``) that is not a local path is left to the hub client: only then
  can the network be the cause;
* resume: the settings a checkpoint cannot change (`FIXED_ON_RESUME`) are the same in the
  checkpoint's `recipe.yaml` as in this recipe. Optimizer settings may change: the trainer applies
  them on resume and says so.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, OmegaConf

from distill import checkpoint as ckpt
from distill.recipe import RecipeError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOY_FAMILIES = ("sd15", "sdxl")

# (key, test, what it must be). Keys whose value may be null are skipped when null.
_GE1, _GE0 = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0")
_POS = (lambda v: v > 0 and math.isfinite(v), "> 0")
_PROB = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_DECAY = (lambda v: 0.0 <= v < 1.0, "in [0, 1)")
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "training.max_steps": _GE1, "training.num_epochs": _GE1, "training.batch_size": _GE1,
    "training.gradient_accumulation_steps": _GE1, "training.max_grad_norm": _POS,
    "training.ema_decay": _DECAY, "training.checkpoint_every": _GE1, "training.keep_checkpoints": _GE1,
    "training.log_every": _GE1, "training.sample_every": _GE0, "training.max_bad_steps": _GE1,
    "optimizer.lr": _POS, "optimizer.weight_decay": _GE0, "optimizer.eps": _POS,
    "optimizer.warmup_steps": _GE0, "optimizer.min_lr_ratio": _PROB, "optimizer.vae_lr": _POS,
    "optimizer.text_encoder_lr": _POS,
    "data.caption_dropout": _PROB, "data.min_size": _GE1, "data.max_pixels": _GE1, "data.resolution": _GE1,
    "data.bucket_min_side": _GE1, "data.bucket_max_side": _GE1, "data.bucket_step": _GE1,
    "data.keep_tokens": _GE0, "data.num_workers": _GE0, "data.toy.num_images": _GE1,
    "teacher.clip_skip": _GE0, "student.hidden_size": _GE1, "student.depth": _GE1, "student.num_heads": _GE1, "student.mlp_ratio": _POS,
    "losses.eps": _GE0, "losses.teacher": _GE0, "losses.perturb": _GE0, "losses.feature": _GE0,
    "losses.min_snr_gamma": _POS, "losses.features.projector_hidden": _GE1,
    "losses.perturbations.input_noise.gamma": _GE0, "losses.perturbations.embedding_noise.sigma": _GE0,
    "losses.perturbations.timestep_jitter.max_delta": _GE0, "losses.perturbations.trajectory.num_steps": _GE1,
    "losses.perturbations.trajectory.guidance_scale": _GE0,
    "e2e.lora_rank": _GE1, "e2e.lora_alpha": _POS, "e2e.vae_recon": _GE0, "e2e.vae_kl": _GE0, "e2e.vae_align": _GE0,
    "e2e.text_encoder_align": _GE0,
    "sampling.num_inference_steps": _GE1, "sampling.guidance_scale": _GE0, "sampling.guidance_rescale": _PROB, "sampling.height": _GE1,
    "sampling.width": _GE1,
    "evaluation.num_prompts": _GE1, "evaluation.timestep_bins": _GE1, "evaluation.at_end": _GE0,
}
for _part in ("input_noise", "caption_mix", "prompt_file", "embedding_noise", "trajectory", "timestep_jitter"):
    RANGES[f"losses.perturbations.{_part}.weight"] = _GE0

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


def _fail(key: str, message: str, where: str) -> RecipeError:
    return RecipeError(f"'{key}' {message} ({where})")


def _check_ranges(r: DictConfig, where: str) -> None:
    for key, (ok, must) in RANGES.items():
        value = OmegaConf.select(r, key)
        if value is None:
            continue
        if isinstance(value, float) and math.isnan(value) or not ok(value):
            raise _fail(key, f"must be {must}, got {value!r}", where)


def _check_consistency(r: DictConfig, where: str) -> None:
    from students import PRESETS

    t, d, lo, o = r.training, r.data, r.losses, r.optimizer
    if t.max_steps is None and t.num_epochs is None:
        raise _fail("training.max_steps", "is null and so is training.num_epochs: set one of them", where)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise _fail("optimizer.betas", f"must be two values in [0, 1), got {list(o.betas)}", where)
    if len(lo.guidance_range) != 2 or not 0 <= lo.guidance_range[0] <= lo.guidance_range[1]:
        raise _fail("losses.guidance_range", f"must be [low, high] with 0 <= low <= high, got {list(lo.guidance_range)}",
                    where)
    if d.bucket_min_side > d.bucket_max_side:
        raise _fail("data.bucket_min_side", f"({d.bucket_min_side}) is above data.bucket_max_side ({d.bucket_max_side})",
                    where)
    if not (lo.eps or lo.teacher or lo.feature or lo.perturb):
        raise _fail("losses", "has every weight at 0: nothing would be trained", where)
    f = lo.features
    if lo.feature and (not f.student_blocks or len(f.student_blocks) != len(f.teacher_modules)):
        raise _fail("losses.features.student_blocks", "and losses.features.teacher_modules need the same non-zero "
                    f"length when losses.feature > 0 (got {len(f.student_blocks)} and {len(f.teacher_modules)})", where)
    preset = PRESETS.get(r.student.preset)
    if preset is not None:
        hidden = r.student.hidden_size or preset["hidden_size"]
        heads = r.student.num_heads or preset["num_heads"]
        depth = r.student.depth or preset["depth"]
        if hidden % heads:
            raise _fail("student.hidden_size", f"{hidden} is not divisible by student.num_heads {heads}", where)
        if hidden % 4:
            raise _fail("student.hidden_size", f"{hidden} must be a multiple of 4 (2-D sin-cos positions)", where)
        for block in f.student_blocks if lo.feature else []:
            if not 0 <= block < depth:
                raise _fail("losses.features.student_blocks", f"holds block {block}; the student has blocks 0..{depth - 1}",
                            where)
    if r.student.guidance_embed and not lo.guided_teacher:
        raise _fail("student.guidance_embed", "needs losses.guided_teacher: the w input is only ever trained at 1 "
                    "otherwise, and sampling would feed it the guidance scale", where)
    if r.student.guidance_embed and lo.eps:
        raise _fail("losses.eps", f"is {lo.eps} with student.guidance_embed: the data term has no guidance scale to "
                    "give the student's w input (it would be trained at the teacher's guided w); set losses.eps=0",
                    where)
    if r.student.init and str(r.student.init).endswith((".pt", ".pth", ".ckpt", ".safetensors")) and \
            not Path(str(r.student.init)).is_dir():
        from distill.build import official_kind

        if official_kind(r.student) is None:
            raise _fail("student.init_kind", f"is null and the name of {r.student.init} does not say SiT or DiT: "
                        "set sit (t in [0, 1], velocity) or dit (DDPM steps, eps)", where)
    for combo in d.toy.exclude_combos:
        if len(str(combo).split()) != 2:
            raise _fail("data.toy.exclude_combos", f"holds {combo!r}, which is not '<colour> <shape>'", where)
    pf = lo.perturbations.prompt_file
    if pf.enabled and not pf.path:
        raise _fail("losses.perturbations.prompt_file.path", "is null but losses.perturbations.prompt_file.enabled is true",
                    where)
    traj = lo.perturbations.trajectory
    if traj.enabled and traj.prompts == "prompt_file" and not pf.path:
        raise _fail("losses.perturbations.prompt_file.path", "is null but the trajectory part reads its prompts from it",
                    where)


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
        raise _fail(key, f"names a {what} that does not exist: {path}{hint}", where)
    if kind == "file" and not path.is_file():
        raise _fail(key, f"must be a file, and {path} is a folder", where)
    if kind == "dir" and not path.is_dir():
        raise _fail(key, f"must be a folder, and {path} is a file", where)
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise _fail(key, f"cannot be read: permission denied on {path}", where)


def vae_factor_of(r: DictConfig) -> int | None:
    """The teacher VAE's downsampling factor, from its config where it can be read without loading
    anything (toy teachers: 4; a local folder: its vae/config.json); None when unknown here."""
    import json

    source = r.teacher.source
    if source.startswith("toy:"):
        return 4
    config = Path(r.teacher.vae or (r.teacher.config or source))
    for file in (config / "vae" / "config.json", config / "config.json"):
        if file.is_file():
            try:
                blocks = json.loads(file.read_text()).get("block_out_channels")
            except (OSError, ValueError):
                return None
            return 2 ** (len(blocks) - 1) if blocks else None
    return None


def _check_grid(r: DictConfig, where: str) -> None:
    """The bucket grid exists, and its step (or the square resolution) suits VAE factor x patch
    when the VAE factor is known (data.buckets' own rules, run early)."""
    from data.buckets import make_buckets, validate_step
    from students import PRESETS

    d = r.data
    if d.bucket:
        try:
            make_buckets(d.resolution, d.bucket_min_side, d.bucket_max_side, d.bucket_step)
        except ValueError as e:
            raise _fail("data.bucket_step", f"gives no bucket: {e}", where) from None
    factor, preset = vae_factor_of(r), PRESETS.get(r.student.preset)
    if factor is None or preset is None:
        return
    key = "data.bucket_step" if d.bucket else "data.resolution"
    try:
        validate_step(d.bucket_step if d.bucket else d.resolution, factor, int(preset["patch_size"]), key)
    except ValueError as e:
        raise _fail(key, str(e).split(" ", 1)[1], where) from None


def _check_single_file(source: str, where: str) -> None:
    """A single file without teacher.config: its model type must be readable from its keys."""
    from distill.checkpoint import UnsafeFileError
    from teachers.single_file import SingleFileError, detect, read_shapes

    try:
        found = detect(read_shapes(source))
        if found["unet_only"]:
            raise SingleFileError("it holds a UNet only; set teacher.config to a diffusers folder of its base model "
                                  "(for the VAE and text encoders)")
    except SingleFileError as e:
        raise _fail("teacher.source", f"{source}: {e}", where) from None
    except UnsafeFileError as e:
        raise _fail("teacher.source", str(e), where) from None
    except Exception as e:  # not a safetensors / torch file at all, truncated, ...
        raise _fail("teacher.source", f"{source} cannot be read as a checkpoint ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); set teacher.config if it is one", where) from None


def _check_paths(r: DictConfig, where: str) -> None:
    from teachers.sd import SINGLE_FILE_SUFFIXES  # (torch only; diffusers is imported when loading)

    te = r.teacher
    if te.source.startswith("toy:"):
        family = te.source[len("toy:"):]
        if family not in TOY_FAMILIES:
            raise _fail("teacher.source", f"{te.source!r} is not a toy teacher; choose toy:sd15 or toy:sdxl", where)
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
        raise _fail("output.dir", f"is a file, not a folder: {out}", where)
    parent = next((p for p in (out, *out.parents) if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise _fail("output.dir", f"cannot be written: permission denied on {parent}", where)
    if r.training.init_from and not (r.training.resume and resume_checkpoint(r, where) is not None):
        # (ignored by a run that resumes from a checkpoint of its own)
        source = Path(r.training.init_from)
        _check_path("training.init_from", str(source), where, kind="dir")
        if not ckpt.is_complete(source) and ckpt.find_latest(source) is None:
            raise _fail("training.init_from", f"{source} is neither a complete checkpoint nor a run folder holding one",
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
        raise _fail("training.resume", f"names a checkpoint that does not exist: {path} (use 'latest' or a "
                    f"{ckpt.CHECKPOINT_PREFIX}N folder)", where)
    if not ckpt.is_complete(path):
        raise _fail("training.resume", f"{path} is not a complete checkpoint (a {ckpt.CHECKPOINT_PREFIX}N folder "
                    f"holding {ckpt.COMPLETE})", where)
    return path


def check_resume_compatible(r: DictConfig, path: Path, where: str) -> None:
    """The keys of FIXED_ON_RESUME must equal those of the checkpoint's recipe."""
    try:
        saved = yaml.safe_load(ckpt.read_recipe(path))
    except (OSError, yaml.YAMLError):
        return  # a damaged checkpoint: the trainer's fallback deals with it
    if not isinstance(saved, dict):
        return
    current = OmegaConf.to_container(r, resolve=True)
    for key in FIXED_ON_RESUME:
        old, new = _lookup(saved, key), _lookup(current, key)
        if old is not _MISSING and old != new:
            raise _fail(key, f"is {new!r} but {path} was trained with {old!r}; a resumed run cannot change it "
                        "(start a new run, or training.init_from for a new stage)", where)
    if bool(_lookup(saved, "losses.feature") or 0) != bool(r.losses.feature):
        raise _fail("losses.feature", f"turns feature alignment {'on' if r.losses.feature else 'off'}, but {path} "
                    "was trained the other way (its projectors are saved with it)", where)


_MISSING = object()


def _lookup(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


# --------------------------------------------------------------------------- entry point

def validate_recipe(r: DictConfig, where: str = "the recipe") -> None:
    """Every check above; raises RecipeError (one line) at the first problem."""
    from distill.build import check_names

    check_names(r)
    _check_ranges(r, where)
    _check_consistency(r, where)
    _check_paths(r, where)
    _check_grid(r, where)
    path = resume_checkpoint(r, where)
    if path is not None:
        check_resume_compatible(r, path, where)
