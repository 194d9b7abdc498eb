"""`cli.py sample`, `cli.py eval`, `cli.py export`: arguments and the functions they run.

`--checkpoint` (and the positional CHECKPOINT) may be a checkpoint folder, a run folder (its latest
checkpoint) or a seed-format ``sit_model.pt``; see ``sitdistill.apps.export``. Sampling settings that are
not given come from the recipe stored with the checkpoint (its ``sampling`` section), so a toy run
samples the way its training-time grids did.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sitdistill.core.exits import fail

# sitdistill.apps.export.WEIGHTS, spelled here so that building the parser imports no torch (`--help` stays instant).
WEIGHTS = ("ema", "raw")
DEFAULT_BATCH = 8


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipe naming the teacher (default: the recipe.yaml stored with the checkpoint)")
    p.add_argument("--model_size", help="student preset of a seed-format .pt without config.json")
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA (default) or raw student weights")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")


def _sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num_inference_steps", type=int)
    p.add_argument("--guidance_scale", type=float)
    p.add_argument("--guidance_rescale", type=float, help="Lin et al.'s rescale of the guided prediction "
                   "(default: the recipe's sampling.guidance_rescale; e.g. 0.7 for zero-terminal-SNR teachers)")
    p.add_argument("--scheduler", help="ddim, ddpm, euler, euler_a, dpm, unipc, heun, lms, pndm")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH, help="prompts per forward batch")
    p.add_argument("--clip_skip", type=int, help="text-encoder layers to skip (default: the teacher's, "
                   "teacher.clip_skip of the recipe; 0 = none)")


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    """`cli.py sample`: the seed's inference flags + --prompts-file, --weights, --recipe."""
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder, or the seed's sit_model.pt")
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("--prompts-file", dest="prompts_file", help="one prompt per line (# comments skipped)")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed + i (written into each PNG)")
    p.add_argument("--output_dir", default="outputs")
    _sampler_args(p)
    _common(p)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """`cli.py eval CHECKPOINT [--baseline CKPT] [--out DIR]` + prompt and sampler choices."""
    p.add_argument("checkpoint", help="checkpoint folder, run folder, or sit_model.pt")
    p.add_argument("--baseline", help="a checkpoint trained without teacher, shown beside (default: "
                                      "evaluation.baseline of the recipe)")
    p.add_argument("--out", help="report folder (default: eval-<checkpoint> beside the checkpoint)")
    p.add_argument("--prompts-file", dest="prompts_file")
    p.add_argument("--prompts", dest="prompt_source", choices=("auto", "file", "recipe", "toy"), default="auto",
                   help="prompt set: a file, the recipe's sampling prompts, or held-out toy-world prompts "
                        "(auto: file if given, else toy for toy-world recipes, else recipe)")
    p.add_argument("--num_prompts", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--timestep_bins", type=int)
    p.add_argument("--clip_weights", help="local CLIP folder for the CLIP score (never downloaded)")
    p.add_argument("--fid_weights", help="local vision-model folder for the Fréchet distance (never downloaded)")
    _sampler_args(p)
    _common(p)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """`cli.py export CHECKPOINT --out DIR [--format diffusers|seed]`."""
    p.add_argument("checkpoint", help="checkpoint folder, run folder, or sit_model.pt")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=("diffusers", "seed"), default="diffusers")
    p.add_argument("--scheduler", help="the exported pipeline's sampler (default: the recipe's sampling.scheduler)")
    _common(p)


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_scheduler(name: str | None) -> None:
    from sitdistill.infer.sampling import SCHEDULERS

    if name is not None and name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")


def sample_command(args: argparse.Namespace) -> int:
    """Generate PNGs (prompt, seed, sampler, steps, guidance... in their text chunks)."""
    from sitdistill.evaluation.evaluate import read_prompts_file
    from sitdistill.apps.export import build_pipeline, resolve_checkpoint
    from sitdistill.infer.samples import generators, png_info

    try:
        _check_scheduler(args.scheduler)
        source = resolve_checkpoint(args.checkpoint, args.recipe)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e))
    prompts = list(args.prompt or []) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    s = source.recipe.sampling
    prompts = prompts or list(s.prompts)
    if not prompts:
        return fail("no prompt: give --prompt or --prompts-file (the recipe has no sampling.prompts)")
    device = _device(args)
    pipe = build_pipeline(source, weights=args.weights, scheduler=args.scheduler, model_size=args.model_size,
                          device=device)
    if getattr(args, "clip_skip", None) is not None:
        pipe.register_to_config(clip_skip=args.clip_skip or None)
    scale = s.guidance_scale if args.guidance_scale is None else args.guidance_scale
    if source.recipe.losses.guided_teacher and not pipe.transformer.config.guidance_embed and scale > 1:
        print(f"warning: this student learnt a guided teacher's prediction (losses.guided_teacher) without a "
              f"guidance input; guidance {scale:g} guides it a second time (use --guidance_scale 1)", file=sys.stderr)
    dh, dw = pipe.default_hw()
    settings = dict(height=args.height or dh, width=args.width or dw,
                    num_inference_steps=args.num_inference_steps or s.num_inference_steps,
                    guidance_scale=s.guidance_scale if args.guidance_scale is None else args.guidance_scale,
                    guidance_rescale=s.guidance_rescale if args.guidance_rescale is None else args.guidance_rescale)
    negative = s.negative_prompt if args.negative_prompt is None else args.negative_prompt
    sampler = args.scheduler or s.scheduler
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        images = pipe(chunk, negative_prompt=negative, generator=generators(args.seed + start, len(chunk)),
                      **settings).images
        for i, (prompt, image) in enumerate(zip(chunk, images), start=start):
            seed = args.seed + i
            path = out / f"{i:04d}-seed{seed}.png"
            image.save(path, pnginfo=png_info(
                prompt=prompt, negative_prompt=negative, seed=seed, sampler=sampler,
                steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                height=settings["height"], width=settings["width"], weights=args.weights,
                clip_skip=pipe.config.clip_skip, guidance_rescale=settings["guidance_rescale"] or None,
                checkpoint=source.label))
            print(path)
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """The student-vs-teacher report: report.md, metrics.json, PNGs and tb/ in one folder."""
    from sitdistill.train.e2e import load_student_side
    from sitdistill.evaluation.evaluate import evaluate, evaluation_prompts, settings_from_recipe
    from sitdistill.apps.export import load_student, load_teacher_for, resolve_checkpoint

    try:
        _check_scheduler(args.scheduler)
        source = resolve_checkpoint(args.checkpoint, args.recipe)
        recipe = source.recipe
        baseline_path = args.baseline or recipe.evaluation.baseline
        baseline = resolve_checkpoint(baseline_path) if baseline_path else None
        prompts, origin = evaluation_prompts(recipe, args.prompts_file, args.prompt_source, args.num_prompts)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e))
    device = _device(args)
    teacher = load_teacher_for(source, device)
    if args.clip_skip is not None:  # the teacher's (and so the student's) prompt encoding
        teacher.front.clip_skip = args.clip_skip or None
    students = {"student": load_student(source, weights=args.weights, teacher=teacher, model_size=args.model_size,
                                        device=device)}
    labels = {"teacher": str(recipe.teacher.source), "student": source.label}
    if baseline is not None:
        if str(baseline.recipe.teacher.source) != str(recipe.teacher.source):
            print(f"note: the baseline's recipe names teacher {baseline.recipe.teacher.source}; "
                  f"it is sampled with {recipe.teacher.source}'s encoders and VAE")
        students["baseline"] = load_student(baseline, weights=args.weights, teacher=teacher, device=device)
        labels["baseline"] = baseline.label
    st = settings_from_recipe(recipe, scheduler=args.scheduler, num_inference_steps=args.num_inference_steps,
                              guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                              guidance_rescale=args.guidance_rescale,
                              height=args.height, width=args.width, seeds=args.seeds,
                              timestep_bins=args.timestep_bins, batch_size=args.batch_size, weights=args.weights,
                              fid_weights=args.fid_weights, clip_weights=args.clip_weights, prompt_source=origin)
    out = Path(args.out) if args.out else source.path.parent / f"eval-{source.path.stem}"
    # After the end-to-end stage a checkpoint holds its own VAE / text encoders.
    checkpoints = {"student": source, "baseline": baseline}
    sides = {k: load_student_side(checkpoints[k].path, teacher) for k in students if checkpoints[k].kind == "checkpoint"}
    sides = {k: side for k, side in sides.items() if side is not None}
    metrics = evaluate(teacher, students, prompts, st, out, labels=labels,
                       held_out_combos=list(recipe.data.toy.exclude_combos), sides=sides)
    from sitdistill.evaluation.evaluate import results_table

    print(results_table(metrics))
    print(f"report: {out / 'report.md'}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """A diffusers folder (``SiTPipeline.from_pretrained(out)``) or the seed's file names."""
    from sitdistill.apps.export import export_diffusers, export_seed, resolve_checkpoint

    try:
        _check_scheduler(args.scheduler)
        source = resolve_checkpoint(args.checkpoint, args.recipe)
        if Path(args.out).exists() and any(Path(args.out).iterdir()):
            raise FileExistsError(f"{args.out} exists and is not empty; choose a new folder")
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        return fail(str(e))
    if args.format == "seed":
        out = export_seed(source, args.out, model_size=args.model_size)
        print(f"wrote {out} (sit_model.pt, ema_model.pt when kept, config.json, recipe.yaml)")
    else:
        out = export_diffusers(source, args.out, weights=args.weights, scheduler=args.scheduler,
                               model_size=args.model_size)
        print(f"wrote {out}; load it with:\n  from sitdistill.students.pipeline import SiTPipeline\n"
              f"  pipe = SiTPipeline.from_pretrained({str(out)!r})")
    return 0
