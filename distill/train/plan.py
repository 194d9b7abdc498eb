"""A readable summary of what a resolved recipe will do (`cli.py run --dry-run`).

Nothing here loads weights or touches the data: the plan is built from the recipe alone, plus the
student's parameter count from a `meta`-device build (no memory) when the teacher family is known.
"""

from __future__ import annotations

from omegaconf import DictConfig

# Conditioning sizes of the real teacher families (what the student's text projection takes).
FAMILY_COND_DIMS = {
    "sd15": {"encoder_hidden_states": 768},
    "sdxl": {"encoder_hidden_states": 2048, "text_embeds": 1280, "time_ids": 6},
}


def _precision(choice: str) -> str:
    """The recipe's mixed precision, with what "auto" becomes on this machine."""
    if choice != "auto":
        return choice
    import torch

    from sitdistill.core.precision import resolve_mixed_precision
    return f"auto ({resolve_mixed_precision(choice, 'cuda' if torch.cuda.is_available() else 'cpu')} here)"


def _student_line(r: DictConfig) -> str:
    s = r.student
    line = f"{s.preset}, prediction {s.prediction_type}"
    shape = {k: s[k] for k in ("hidden_size", "depth", "num_heads", "mlp_ratio") if s[k] is not None}
    if shape:
        line += ", overrides " + ", ".join(f"{k}={v}" for k, v in shape.items())
    if s.text_pool:
        line += ", pooled text in the adaLN input"
    if s.init:
        line += f", initialised from {s.init}"
    family = r.teacher.family  # toy teachers' sizes are known only once they are built
    if family in FAMILY_COND_DIMS:
        try:
            from sitdistill.students import count_parameters

            n = count_parameters(s.preset, cond_dims=FAMILY_COND_DIMS[family], **shape)
            line += f", {n / 1e6:.1f} M parameters"
        except (ImportError, KeyError, ValueError) as e:  # an unknown preset is reported by the trainer
            line += f" ({e})"
    return line


def _losses_line(r: DictConfig) -> list[str]:
    lo = r.losses
    terms = [f"{name} x{lo[name]:g}" for name in ("eps", "teacher", "perturb", "feature") if lo[name]]
    lines = ["losses:      " + (" + ".join(terms) or "none (every weight is 0)")]
    if lo.min_snr_gamma is not None:
        lines.append(f"             eps weighted by min-SNR-gamma {lo.min_snr_gamma:g}")
    if lo.teacher_weighting != "none":
        lines.append(f"             teacher-target terms weighted {lo.teacher_weighting}"
                     + (f" (gamma {lo.min_snr_gamma:g})" if lo.teacher_weighting == "min_snr" else ""))
    if lo.guided_teacher:
        lines.append(f"             teacher target guided, scale drawn in {list(lo.guidance_range)}")
    parts = [name for name, cfg in lo.perturbations.items() if cfg.enabled]
    if lo.perturb:
        lines.append("             perturbations: " + (", ".join(parts) or "none enabled"))
    if lo.feature:
        f = lo.features
        lines.append(f"             features: student blocks {list(f.student_blocks)} -> {list(f.teacher_modules)} ({f.kind})")
    lines.append(f"             timesteps sampled {lo.timestep_sampling}")
    return lines


def describe_plan(r: DictConfig) -> str:
    d, t, o = r.data, r.training, r.optimizer
    data = f"toy world, {d.toy.num_images} images (seed {d.toy.seed})" if d.root is None else d.root
    if d.toy.exclude_combos and d.root is None:
        data += f", held out: {', '.join(d.toy.exclude_combos)}"
    if d.bucket:
        grid = f"aspect buckets around {d.resolution}^2 px, sides {d.bucket_min_side}-{d.bucket_max_side} step {d.bucket_step}"
    else:
        grid = f"{d.resolution}x{d.resolution} px"
    length = f"{t.max_steps} steps" if t.max_steps is not None else f"{t.num_epochs} epochs"
    teacher = r.teacher.source + (f" ({r.teacher.family})" if r.teacher.family else "")
    if r.teacher.vae:
        teacher += f", VAE {r.teacher.vae}"
    lines = [
        f"recipe:      {r.name}",
        f"teacher:     {teacher}, {r.teacher.dtype}, frozen",
        f"student:     {_student_line(r)}",
        f"data:        {data}; {grid}, {d.crop} crop; caption dropout {d.caption_dropout:g}"
        + (f", tags shuffled keeping {d.keep_tokens}" if d.shuffle_tags else ""),
        *_losses_line(r),
        f"optimizer:   {o.name} lr {o.lr:g}, {o.lr_scheduler} schedule, warmup {o.warmup_steps}, weight decay {o.weight_decay:g}",
        f"training:    {length}, batch {t.batch_size} x accumulation {t.gradient_accumulation_steps} per process, "
        f"precision {_precision(t.mixed_precision)}, EMA {'%g' % t.ema_decay if t.use_ema else 'off'}, seed {t.seed}",
        f"             checkpoint every {t.checkpoint_every} steps, keep {t.keep_checkpoints}"
        + (f", resume from {t.resume}" if t.resume else "")
        + (f", weights from {t.init_from}" if t.init_from else ""),
    ]
    if t.train_vae or t.train_text_encoder:
        what = " and ".join(n for n, on in (("VAE", t.train_vae), ("text encoders", t.train_text_encoder)) if on)
        lines.append(f"end to end:  student-side {what} trainable; the teacher keeps its frozen copies")
    if r.evaluation.at_end and d.root is None:
        s = r.sampling
        lines.append(f"at the end:  teacher and student graded on {r.evaluation.at_end} held-out toy prompts "
                     f"({s.scheduler}, {s.num_inference_steps} steps, guidance {s.guidance_scale:g})")
    lines.append(f"output:      {r.output.dir}")
    return "\n".join(lines)
