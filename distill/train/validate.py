"""All recipe validation in one place, run before anything is loaded or written.

`validate_recipe(recipe, where)` is the one entry point: `cli.py run --dry_run`, `cli.py run` and
the trainer call it before a model is loaded. Each problem is a `RecipeError` whose message is one
line naming the key (and the file or folder concerned), which the command line turns into exit
code 2 with nothing written.

What is checked, from the recipe alone:
* names that select from the project's dicts (presets, samplers, timestep samplers, weightings);
* ranges: counts >= 1 (or >= 0 where 0 means "off"), probabilities in [0, 1], rates > 0, pairs in
  order, a student whose width divides into its heads;
* combinations of keys: the loss terms, feature alignment, the guidance input, the end-to-end
  stage, FSDP, the sampler against a zero-terminal-SNR teacher, sizes against VAE factor x patch;
* what the recipe names on disk (`sitdistill.train.validate_files`): paths, a single-file teacher's type,
  and, when the run resumes, that the checkpoint was written by a compatible recipe.

What needs the loaded models is `check_loaded(recipe, teacher, student)`, run by the trainer right
after loading them (before any step): that the teacher UNet has the modules named for feature
alignment, and a note for a guided-teacher target without a guidance input.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from sitdistill.train import validate_files
from sitdistill.core.recipe import RecipeError
from sitdistill.train.validate_files import fail


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
    "optimizer.text_encoder_lr": _POS, "optimizer.muon_lr_scale": _POS, "optimizer.muon_momentum": _DECAY,
    "data.caption_dropout": _PROB, "data.min_size": _GE1, "data.max_pixels": _GE1, "data.resolution": _GE1,
    "data.bucket_min_side": _GE1, "data.bucket_max_side": _GE1, "data.bucket_step": _GE1,
    "data.keep_tokens": _GE0, "data.num_workers": _GE0, "data.toy.num_images": _GE1,
    "teacher.clip_skip": _GE0, "student.hidden_size": _GE1, "student.depth": _GE1, "student.num_heads": _GE1, "student.mlp_ratio": _POS,
    "losses.eps": _GE0, "losses.teacher": _GE0, "losses.perturb": _GE0, "losses.feature": _GE0,
    "losses.min_snr_gamma": _POS, "losses.features.projector_hidden": _GE1,
    "losses.perturbations.input_noise.gamma": _GE0, "losses.perturbations.embedding_noise.sigma": _GE0,
    "losses.perturbations.timestep_jitter.max_delta": _GE0, "losses.perturbations.trajectory.num_steps": _GE1,
    "losses.perturbations.trajectory.guidance_scale": _GE0, "losses.perturbations.trajectory.swap_prompts": _PROB,
    "e2e.lora_rank": _GE1, "e2e.lora_alpha": _POS, "e2e.vae_recon": _GE0, "e2e.vae_kl": _GE0, "e2e.vae_align": _GE0,
    "e2e.text_encoder_align": _GE0,
    "sampling.num_inference_steps": _GE1, "sampling.guidance_scale": _GE0, "sampling.guidance_rescale": _PROB, "sampling.height": _GE1,
    "sampling.width": _GE1,
    "evaluation.num_prompts": _GE1, "evaluation.timestep_bins": _GE1, "evaluation.at_end": _GE0,
}
for _part in ("input_noise", "caption_mix", "prompt_file", "embedding_noise", "trajectory", "timestep_jitter"):
    RANGES[f"losses.perturbations.{_part}.weight"] = _GE0


def check_names(recipe: DictConfig) -> None:
    """Names that select from the project's dicts (presets, samplers, timestep samplers) exist.

    Raises RecipeError naming the key and the valid names, so a typo in a real-size recipe shows
    on `--dry_run`, before any weight is loaded.
    """
    from sitdistill.train.build import lowbit_adamw_backend, lowbit_missing_message
    from sitdistill.infer.sampling import SCHEDULERS
    from sitdistill.core.schedule import LOSS_WEIGHTINGS, TIMESTEP_SAMPLERS
    from sitdistill.students import PRESETS

    for key, value, valid in (("student.preset", recipe.student.preset, PRESETS),
                              ("sampling.scheduler", recipe.sampling.scheduler, SCHEDULERS),
                              ("losses.timestep_sampling", recipe.losses.timestep_sampling, TIMESTEP_SAMPLERS),
                              ("losses.teacher_weighting", recipe.losses.teacher_weighting, LOSS_WEIGHTINGS)):
        if value not in valid:
            raise RecipeError(f"'{key}' is {value!r}; choose one of {', '.join(valid)}")
    if recipe.losses.teacher_weighting == "min_snr" and recipe.losses.min_snr_gamma is None:
        raise RecipeError("'losses.teacher_weighting' is 'min_snr', which needs losses.min_snr_gamma (e.g. 5)")
    if recipe.optimizer.fused and recipe.optimizer.name != "adamw":
        raise RecipeError(f"'optimizer.fused' is true, and optimizer.name={recipe.optimizer.name} has no fused "
                          "kernel (only adamw has); leave it null")
    if recipe.optimizer.name == "adamw8bit" and lowbit_adamw_backend() is None:
        raise RecipeError(f"'optimizer.name' is adamw8bit, which {lowbit_missing_message()}")


def _check_ranges(r: DictConfig, where: str) -> None:
    for key, (ok, must) in RANGES.items():
        value = OmegaConf.select(r, key)
        if value is None:
            continue
        if isinstance(value, float) and math.isnan(value) or not ok(value):
            raise fail(key, f"must be {must}, got {value!r}", where)


def _check_training(r: DictConfig, where: str) -> None:
    t, d, o = r.training, r.data, r.optimizer
    if t.max_steps is None and t.num_epochs is None:
        raise fail("training.max_steps", "is null and so is training.num_epochs: set one of them", where)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise fail("optimizer.betas", f"must be two values in [0, 1), got {list(o.betas)}", where)
    if d.bucket_min_side > d.bucket_max_side:
        raise fail("data.bucket_min_side", f"({d.bucket_min_side}) is above data.bucket_max_side ({d.bucket_max_side})",
                    where)
    for combo in d.toy.exclude_combos:
        if len(str(combo).split()) != 2:
            raise fail("data.toy.exclude_combos", f"holds {combo!r}, which is not '<colour> <shape>'", where)
    if t.fsdp:  # (the launch itself, processes and plugin, is checked by sitdistill.train.sharding.check_fsdp)
        if t.mixed_precision == "fp16":
            raise fail("training.fsdp", "runs in bf16 or float32 (fp16 would need a sharded gradient scaler): "
                        "set training.mixed_precision=bf16", where)
        if t.train_vae or t.train_text_encoder:
            raise fail("training.fsdp", "shards the student only: the end-to-end stage "
                        "(training.train_vae / train_text_encoder) runs without it", where)
        if r.optimizer.name == "muon":
            raise fail("optimizer.name", "is muon, which orthogonalises whole matrices, and training.fsdp shards "
                        "them: use adamw with FSDP", where)


def _check_losses(r: DictConfig, where: str) -> None:
    lo = r.losses
    if len(lo.guidance_range) != 2 or not 0 <= lo.guidance_range[0] <= lo.guidance_range[1]:
        raise fail("losses.guidance_range", f"must be [low, high] with 0 <= low <= high, got {list(lo.guidance_range)}",
                    where)
    if not (lo.eps or lo.teacher or lo.feature or lo.perturb):
        raise fail("losses", "has every weight at 0: nothing would be trained", where)
    f = lo.features
    if lo.feature and (not f.student_blocks or len(f.student_blocks) != len(f.teacher_modules)):
        raise fail("losses.features.student_blocks", "and losses.features.teacher_modules need the same non-zero "
                    f"length when losses.feature > 0 (got {len(f.student_blocks)} and {len(f.teacher_modules)})", where)
    if lo.guidance_pairs < 0:
        raise fail("losses.guidance_pairs", f"must be >= 0, got {lo.guidance_pairs}", where)
    if lo.guidance_pairs and not (lo.teacher or lo.feature):
        raise fail("losses.guidance_pairs", "needs the teacher's prediction: losses.teacher (or losses.feature) > 0",
                    where)
    if lo.guidance_pairs and lo.guided_teacher:
        raise fail("losses.guidance_pairs", "cannot run with losses.guided_teacher: a guided target has no "
                    "unconditional half to pair", where)
    if lo.guidance_pairs and r.training.batch_size < 2:
        raise fail("losses.guidance_pairs", f"needs training.batch_size >= 2 (pairs), got {r.training.batch_size}", where)
    if lo.guidance_pairs and r.training.train_text_encoder:
        raise fail("losses.guidance_pairs", "cannot run with training.train_text_encoder: the pairs use the "
                    "teacher's unconditional input, not the student side's", where)
    pf = lo.perturbations.prompt_file
    if pf.enabled and not pf.path:
        raise fail("losses.perturbations.prompt_file.path", "is null but losses.perturbations.prompt_file.enabled is true",
                    where)
    traj = lo.perturbations.trajectory
    if traj.enabled and traj.prompts == "prompt_file" and not pf.path:
        raise fail("losses.perturbations.prompt_file.path", "is null but the trajectory part reads its prompts from it",
                    where)
    if traj.align and not lo.feature:
        raise fail("losses.perturbations.trajectory.align", "is true but losses.feature is 0: nothing to align with",
                    where)
    if traj.align and not (lo.perturb and traj.enabled):
        raise fail("losses.perturbations.trajectory.align", "is true but the trajectory part is off (it needs "
                    "losses.perturb > 0 and losses.perturbations.trajectory.enabled=true)", where)
    if lo.guidance_pairs:
        from sitdistill.data.pipeline import needs_images

        if not needs_images(r):
            raise fail("losses.guidance_pairs", "pairs rows of a data batch, and this run is data-free "
                        "(trajectory states only)", where)


def _check_student(r: DictConfig, where: str, shape: bool = True) -> None:
    """The student section; `shape=False` skips its preset's shape (a caller brings its own student)."""
    from sitdistill.students import PRESETS

    lo, s = r.losses, r.student
    preset = PRESETS.get(s.preset)
    if preset is not None and shape:
        hidden = s.hidden_size or preset["hidden_size"]
        heads = s.num_heads or preset["num_heads"]
        depth = s.depth or preset["depth"]
        if hidden % heads:
            raise fail("student.hidden_size", f"{hidden} is not divisible by student.num_heads {heads}", where)
        if hidden % 4:
            raise fail("student.hidden_size", f"{hidden} must be a multiple of 4 (2-D sin-cos positions)", where)
        for block in lo.features.student_blocks if lo.feature else []:
            if not 0 <= block < depth:
                raise fail("losses.features.student_blocks", f"holds block {block}; the student has blocks 0..{depth - 1}",
                            where)
    if s.guidance_embed and not lo.guided_teacher:
        raise fail("student.guidance_embed", "needs losses.guided_teacher: the w input is only ever trained at 1 "
                    "otherwise, and sampling would feed it the guidance scale", where)
    if s.guidance_embed and lo.eps:
        raise fail("losses.eps", f"is {lo.eps} with student.guidance_embed: the data term has no guidance scale to "
                    "give the student's w input (it would be trained at the teacher's guided w); set losses.eps=0",
                    where)
    if s.init and str(s.init).endswith((".pt", ".pth", ".ckpt", ".safetensors")) and not Path(str(s.init)).is_dir():
        from sitdistill.train.build import official_kind

        if official_kind(s) is None:
            raise fail("student.init_kind", f"is null and the name of {s.init} does not say SiT or DiT: "
                        "set sit (t in [0, 1], velocity) or dit (DDPM steps, eps)", where)


def _check_e2e(r: DictConfig, where: str) -> None:
    """What the end-to-end stage cannot do."""
    from sitdistill.data.pipeline import needs_images

    t, lo, e = r.training, r.losses, r.e2e
    if t.train_vae and not needs_images(r):
        raise fail("training.train_vae", "needs image data (a data-free run, every term from teacher trajectories, "
                    "has no pixels to reconstruct)", where)
    if e.feature_grad_to_vae and not (t.train_vae and lo.feature):
        raise fail("e2e.feature_grad_to_vae", "needs training.train_vae and losses.feature > 0", where)
    if e.feature_grad_to_vae and t.mixed_precision == "fp16":
        raise fail("e2e.feature_grad_to_vae", "runs without fp16 loss scaling (its extra backward is not scaled): "
                    "set training.mixed_precision=bf16 or no", where)
    if t.train_text_encoder and lo.perturb and lo.perturbations.trajectory.enabled:
        raise fail("losses.perturbations.trajectory", "cannot run with training.train_text_encoder: trajectory "
                    "states carry the teacher's conditioning, not the student side's", where)


def vae_factor_of(r: DictConfig) -> int | None:
    """The teacher VAE's downsampling factor, from its config where it can be read without loading
    anything (toy teachers: 4; a local folder: its vae/config.json); None when unknown here."""
    import json

    from sitdistill.teachers.frontend import vae_scale_factor

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
            return vae_scale_factor(blocks) if blocks else None
    return None


def _check_grid(r: DictConfig, where: str) -> None:
    """The bucket grid exists, and its step (or the square resolution) suits VAE factor x patch
    when the VAE factor is known (sitdistill.data.buckets' own rules, run early)."""
    from sitdistill.data.buckets import make_buckets, validate_step
    from sitdistill.students import PRESETS

    d = r.data
    if d.bucket:
        try:
            make_buckets(d.resolution, d.bucket_min_side, d.bucket_max_side, d.bucket_step)
        except ValueError as e:
            raise fail("data.bucket_step", f"gives no bucket: {e}", where) from None
    factor, preset = vae_factor_of(r), PRESETS.get(r.student.preset)
    if factor is None or preset is None:
        return
    key = "data.bucket_step" if d.bucket else "data.resolution"
    try:
        validate_step(d.bucket_step if d.bucket else d.resolution, factor, int(preset["patch_size"]), key)
    except ValueError as e:
        raise fail(key, str(e).split(" ", 1)[1], where) from None
    unit, s = factor * int(preset["patch_size"]), r.sampling
    for key, value in (("sampling.height", s.height), ("sampling.width", s.width)):
        if value is not None and value % unit:
            raise fail(key, f"{value} must be a multiple of VAE factor {factor} x student patch "
                        f"{preset['patch_size']} = {unit}", where)


def zero_terminal_snr_of(r: DictConfig) -> bool | None:
    """Whether the teacher's schedule has zero terminal SNR, where that is known without loading
    anything: the recipe's `teacher.zero_terminal_snr`, else a single file's marker key, else a
    local folder's scheduler config; None when unknown here."""
    import json

    te = r.teacher
    if te.zero_terminal_snr is not None:
        return bool(te.zero_terminal_snr)
    if te.source.startswith("toy:"):
        return False
    from sitdistill.teachers.sd import SINGLE_FILE_SUFFIXES

    source = Path(te.source)
    if source.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not source.is_file():
            return None
        from sitdistill.teachers.single_file import markers, read_shapes

        try:
            if markers(read_shapes(source))["zero_terminal_snr"]:
                return True
        except Exception:  # unreadable: the path checks say why
            return None
        source = Path(te.config) if te.config else None
        if source is None:
            return False  # the package's own configs: no zero terminal SNR
    file = source / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return None
    try:
        return bool(json.loads(file.read_text()).get("rescale_betas_zero_snr", False))
    except (OSError, ValueError):
        return None


def _check_sampling(r: DictConfig, where: str) -> None:
    """The sampler can follow the teacher's schedule (sample grids and the final grading use it)."""
    from sitdistill.infer.sampling import zero_snr_schedulers

    if zero_terminal_snr_of(r) and r.sampling.scheduler not in zero_snr_schedulers():
        raise fail("sampling.scheduler", f"is {r.sampling.scheduler!r}, which cannot follow the teacher's "
                    f"zero-terminal-SNR schedule; choose one of {', '.join(zero_snr_schedulers())}", where)




# --------------------------------------------------------------------------- entry points

def validate_recipe(r: DictConfig, where: str = "the recipe", files: bool = True, student: bool = True) -> None:
    """Every check above; raises RecipeError (one line) at the first problem. For a caller that
    brings its own models (notebooks, benchmarks): `files=False` skips what the recipe names on
    disk (its own teacher), `student=False` the shape of the recipe's student preset (its own student)."""
    check_names(r)
    _check_ranges(r, where)
    _check_training(r, where)
    _check_losses(r, where)
    _check_student(r, where, shape=student)
    _check_e2e(r, where)
    if not files:
        return
    _check_sampling(r, where)
    validate_files.check_paths(r, where)
    _check_grid(r, where)
    path = validate_files.resume_checkpoint(r, where)
    if path is not None:
        validate_files.check_resume_compatible(r, path, where)


def check_loaded(r: DictConfig, teacher, student, log: Callable[[str], Any] = print) -> None:
    """What only the loaded models can tell, run right after loading them: the teacher UNet has the
    modules named for feature alignment; a guided-teacher target without a guidance input is said.
    (A student brought by the caller takes any block index modulo its depth, as `SiT.forward` does.)"""
    if r.losses.feature:
        modules = dict(teacher.unet.named_modules())
        for path in r.losses.features.teacher_modules:
            if path not in modules:
                sample = ", ".join(name for name in modules if name and "." not in name)
                raise RecipeError(f"'losses.features.teacher_modules' names {path!r}, which the teacher UNet "
                                  f"({type(teacher.unet).__name__}) does not have; e.g. {sample}")
    if r.losses.guided_teacher and not student.config.guidance_embed:
        log("warning: losses.guided_teacher without student.guidance_embed: the student learns the "
            "teacher's guided prediction at the mean scale; sample it with guidance 1 (classifier-free "
            "guidance on top would guide twice), or set student.guidance_embed")
