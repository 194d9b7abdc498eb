#!/usr/bin/env python
"""sitdistill command line: distil a Stable Diffusion teacher into a SiT student.

Thin by design: argparse only, each subcommand calls into the library. Heavy imports (torch,
diffusers) happen inside the subcommand that needs them, so `--help` is instant.

Exit codes: 0 success, 1 a failure while working, 2 a usage or recipe error (one line on stderr,
nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sitdistill.apps import sample_cli
from sitdistill.apps.flags import SEED_TRAIN_FLAGS, SEED_TRAIN_RECIPE, both_spellings, seed_flags_to_overrides
from sitdistill.core.exits import EXIT_FAILED, EXIT_USAGE, fail


SAMPLE_COMMANDS = (  # (name, help, description)
    ("sample", "generate images with a student (the seed's inference flags)",
     "Sample a student checkpoint (checkpoint folder, run folder, or the seed's sit_model.pt) with the "
     "teacher's text encoders and VAE; PNGs carry their settings."),
    ("eval", "student-vs-teacher report (grids, paired distances, per-timestep error)",
     "Same prompts, seeds and sampler for teacher, student and an optional baseline; writes report.md, "
     "metrics.json, PNGs and tensorboard scalars into one folder."),
    ("export", "write a diffusers-loadable pipeline folder from a checkpoint",
     "--format diffusers: a SiTPipeline folder (sitdistill.students.pipeline.SiTPipeline.from_pretrained(DIR)); "
     "--format seed: the seed's sit_model.pt / ema_model.pt files."),
)


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------


def cmd_show_recipe(args: argparse.Namespace) -> int:
    from sitdistill.core.recipe import load_recipe, to_yaml

    print(to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def _run_recipe(recipe_path: str | None, overrides: list[str], dry_run: bool) -> int:
    from sitdistill.train.plan import describe_plan
    from sitdistill.core.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    from sitdistill.train.validate import validate_recipe

    validate_recipe(recipe, recipe_source(recipe_path, overrides))
    if dry_run:
        print(describe_plan(recipe))
        print("dry run: nothing was trained or written.")
        return 0
    from sitdistill.core.checkpoint import CheckpointWriteError, UnsafeFileError
    from sitdistill.train.trainer import TrainingStopped, train

    _quiet_libraries()
    try:
        train(recipe)
    except TrainingStopped as e:
        return fail(str(e), EXIT_FAILED)
    except CheckpointWriteError as e:  # a full disk: the previous checkpoint is still the latest
        return fail(e.strerror, EXIT_FAILED)
    except UnsafeFileError as e:  # a pickle named by the recipe (student.init, a teacher .ckpt)
        return fail(str(e), EXIT_USAGE)
    return 0


def recipe_source(recipe_path: str | None, overrides: list[str]) -> str:
    """How error messages name where a recipe's values came from."""
    base = recipe_path or "the default recipe"
    return f"{base} + command-line overrides" if overrides else base


def cmd_run(args: argparse.Namespace) -> int:
    return _run_recipe(args.recipe, args.overrides, args.dry_run)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = seed_flags_to_overrides(args) + list(args.overrides)
    return _run_recipe(args.recipe, overrides, args.dry_run)


def cmd_data_report(args: argparse.Namespace) -> int:
    from sitdistill.apps.data_report import data_report

    if not Path(args.dir).is_dir():
        return fail(f"data-report: {args.dir} is not a folder", EXIT_USAGE)
    print(data_report(args.dir, args.recipe, args.overrides))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from sitdistill.students import PRESETS, count_parameters

    print(f"{'preset':<8} {'hidden':>6} {'depth':>5} {'heads':>5} {'patch':>5}  parameters (SD1.5 text)")
    for name in PRESETS:
        spec = PRESETS[name]
        n = count_parameters(name, cond_dims={"encoder_hidden_states": 768})
        print(f"{name:<8} {spec['hidden_size']:>6} {spec['depth']:>5} {spec['num_heads']:>5} "
              f"{spec['patch_size']:>5}  {n / 1e6:9.1f} M")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sitdistill.apps.bench import run_bench

    if args.gpu:
        return _gpu_bench(args)
    if args.teacher_build:
        from sitdistill.apps.bench import build_bench_problem, compare_build_processes

        problem = build_bench_problem(args.steps, args.rounds)
        if problem:
            return fail(problem, EXIT_USAGE)
        _quiet_libraries()
        print(compare_build_processes(steps=args.steps, rounds=args.rounds))
        return 0
    from sitdistill.core.recipe import load_recipe

    if args.overrides and not args.compare and "mid" in args.configs:
        return fail(f"bench: recipe overrides ({args.overrides[0]} ...) apply to the toy configuration; "
                    "run them with --configs toy", EXIT_USAGE)
    load_recipe(None, [*args.overrides, *(args.compare or [])])  # a misspelt key: exit 2 before any model
    _quiet_libraries()
    if args.compare:
        from sitdistill.apps.bench import compare_steps

        process_wide = [o for o in args.compare if o.split("=", 1)[0].strip() == "training.mixed_precision"]
        if process_wide:
            return fail("bench --compare: 'training.mixed_precision' is fixed by accelerate at the first Accelerator "
                        "of a process, so the second side cannot take another; time each precision with its own "
                        "`cli.py bench training.mixed_precision=... --configs toy`", EXIT_USAGE)
        print(compare_steps(args.compare, rounds=args.rounds, steps=args.steps, common=tuple(args.overrides)))
        return 0
    print(run_bench(args.configs, steps=args.steps, warmup=args.warmup, as_json=args.json,
                    overrides=tuple(args.overrides)))
    return 0


def _gpu_bench(args: argparse.Namespace) -> int:
    import torch

    if not args.output_dir:
        return fail("bench --gpu needs --output_dir DIR (results.md and results.json go there)", EXIT_USAGE)
    if not args.tiny and not torch.cuda.is_available():
        return fail("bench --gpu needs a CUDA device; --tiny runs the same code on the CPU at stand-in sizes",
                     EXIT_USAGE)
    from sitdistill.apps.bench_gpu import run_gpu_bench

    _quiet_libraries()
    run_gpu_bench(args.output_dir, tiny=args.tiny, budget_s=args.budget_s)
    print((Path(args.output_dir) / "results.md").read_text())
    return 0


def _quiet_libraries() -> None:
    """diffusers/transformers progress bars and advisories would bury the run's own output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_study(args: argparse.Namespace) -> int:
    from sitdistill.apps.study import LETTERS, StudyPlan, quick_plan, run_study

    unknown = [k for k in args.students if k not in LETTERS]
    if unknown:
        return fail(f"--students: unknown {' '.join(unknown)}; choose from {' '.join(LETTERS)}", EXIT_USAGE)
    overrides = list(args.overrides) + ([f"teacher.source={args.teacher}"] if args.teacher else [])
    given = {k: v for k, v in (("seeds", tuple(args.seeds) if args.seeds else None), ("steps", args.steps),
                               ("eval_every", args.eval_every), ("eval_prompts", args.eval_prompts),
                               ("workers", args.workers)) if v is not None}
    kw = {"recipe": args.recipe} if args.recipe else {}
    plan = (quick_plan if args.quick else StudyPlan)(letters=tuple(args.students), overrides=overrides, **kw)
    for key, value in given.items():
        setattr(plan, key, value)
    _quiet_libraries()
    try:
        run_study(args.out, plan)
    except ValueError as e:  # a study folder of another plan, a bad letter in a recipe override...
        return fail(str(e), EXIT_USAGE)
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    from sitdistill.apps.curve import ARMS, CurvePlan, run_curve

    unknown = [k for k in args.students if k not in ARMS]
    if unknown:
        return fail(f"--students: unknown {' '.join(unknown)}; choose from {' '.join(ARMS)}", EXIT_USAGE)
    plan = CurvePlan(arms=tuple(args.students), steps=args.steps, every=args.eval_every, prompts=args.num_prompts,
                     teacher_curve=args.teacher_curve, overrides=list(args.overrides),
                     **({"recipe": args.recipe} if args.recipe else {}))
    _quiet_libraries()
    try:
        run_curve(args.output_dir, plan)
    except ValueError as e:
        return fail(str(e), EXIT_USAGE)
    return 0


def cmd_handoff(args: argparse.Namespace) -> int:
    from sitdistill.apps.handoff import run_handoff

    _quiet_libraries()
    try:
        run_handoff(args.checkpoint, args.output_dir, args.at, args.num_prompts, weights=args.weights)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e), EXIT_USAGE)
    return 0


def cmd_toy_teacher(argv: list[str]) -> int:
    from sitdistill.teachers import toy_cli as toy

    _quiet_libraries()
    parser = both_spellings(toy.build_parser())
    parser.prog = "cli.py toy-teacher"
    toy.run(parser.parse_args(argv))
    return 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def _add_recipe_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("recipe", help="recipe YAML file (may `extends:` another)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides, e.g. training.max_steps=100 student.preset=B/2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cli.py",
        description="Distil a frozen Stable Diffusion 1.5 / SDXL UNet teacher into a SiT transformer student.",
        epilog="Start with: python cli.py run recipes/toy.yaml  (a toy world and toy teacher, CPU, no download).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="train a student from a recipe",
                       description="Train a student from a recipe. Overrides follow the recipe path.")
    _add_recipe_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and stop")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="the seed's train.py flags, mapped onto a recipe",
                       description="Seed-compatible training: each flag sets a recipe key "
                       + ", ".join(f"--{f}={k}" for f, k in SEED_TRAIN_FLAGS.items())
                       + ". Absent flags keep the recipe's values.")
    p.add_argument("--recipe", default=SEED_TRAIN_RECIPE, help="base recipe (default recipes/sdxl_sit_2b.yaml)")
    p.add_argument("--data_root", help="folder of images with same-name .txt captions")
    p.add_argument("--output_dir", help="run folder for checkpoints and logs")
    p.add_argument("--model_size", help="student preset, e.g. 2b or 3b (`cli.py presets` lists all)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--num_epochs", type=int)
    p.add_argument("--use_aspect_ratio_bucket", action="store_true", default=None)
    p.add_argument("--train_vae", action="store_true", default=None)
    p.add_argument("--train_text_encoder", action="store_true", default=None)
    p.add_argument("--mixed_precision", nargs="?", const="bf16", choices=("no", "fp16", "bf16", "auto"),
                   help="mixed precision; the bare flag (as in the seed) means bf16")
    p.add_argument("--use_ema", action="store_true", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and stop")
    _add_recipe_args(p, required=False)
    p.set_defaults(func=cmd_train)

    # Sampling, evaluation and export: their arguments and commands live in distill/apps/sample_cli.py.
    for name, help_text, description in SAMPLE_COMMANDS:
        p = sub.add_parser(name, help=help_text, description=description)
        getattr(sample_cli, f"add_{name}_arguments")(p)
        p.set_defaults(func=getattr(sample_cli, f"{name}_command"))

    p = sub.add_parser("bench", help="time the training step and break it down",
                       description="Times the step on the toy config and on a mid config (SiT-B/2, 32x32 "
                       "latents, SD1.5-shaped random UNet teacher) with warm caches.")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON list")
    p.add_argument("--configs", nargs="+", default=["toy", "mid"], choices=("toy", "mid"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (per round with --compare)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the toy recipe: with --compare "
                   "for both sides, without it with --configs toy")
    p.add_argument("--compare", nargs="+", metavar="key=value", help="time the toy step as it is and with these "
                   "recipe overrides side by side, in alternating rounds, and print the ratio")
    p.add_argument("--rounds", type=int, default=4, help="with --compare: alternating rounds (default 4)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--teacher_build", action="store_true", help="time the SDXL-style toy teacher's UNet steps on one "
                   "and on two processes side by side (--steps UNet steps per build, --rounds alternating rounds; "
                   "the VAE from the cache)")
    p.add_argument("--gpu", action="store_true", help="the real-size GPU benchmark (SD1.5 -> SiT-XL/2 at 512 px, "
                   "SDXL -> 2b at 1024 px, variants, memory levers; <= 8 minutes): writes results.md and results.json")
    p.add_argument("--output_dir", help="with --gpu: where the results go")
    p.add_argument("--tiny", action="store_true", help="with --gpu: the same code on the CPU at stand-in sizes")
    p.add_argument("--budget_s", type=float, help="with --gpu: the time budget in seconds (default 420; 50 with --tiny)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("study", help="the toy-world study: students A-E trained with and without the teacher",
                       description="Trains students A (eps only), B (+ teacher), C (+ perturbation), D (data-free) "
                       "and E (+ feature alignment) on a limited toy data set with held-out colour x shape "
                       "combinations, evaluates each checkpoint on seen and held-out prompts, and writes "
                       "results.md (table, claims), results.json and study.png. Finished runs are reused.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every student; <LETTER>:key=value for one student only (an ablation)")
    p.add_argument("--out", default="runs/study", help="study folder (default runs/study)")
    p.add_argument("--recipe", help="the students' base recipe, which is student B (default: recipes/study.yaml)")
    p.add_argument("--teacher", help="teacher source (default: the recipe's, toy:sdxl)")
    p.add_argument("--students", nargs="+", default=list("ABCDE"), metavar="LETTER")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, help="training steps per student (default: the recipe's)")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="evaluate every N steps (default: the "
                   "recipe's checkpoint_every)")
    p.add_argument("--eval-prompts", dest="eval_prompts", type=int, help="prompts per set (default 24)")
    p.add_argument("--workers", type=int, help="training/eval processes (default 2)")
    p.add_argument("--quick", action="store_true", help="a smoke test: tiny students, 2 steps, 1 seed, 2 prompts")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("curve", help="prompt fidelity against training step: no teacher, teacher, teacher + "
                       "alignment", description="Trains students A (no teacher), B (the teacher as the target) "
                       "and E (B + feature alignment) from one recipe, grades every checkpoint on held-out toy "
                       "prompts beside the teacher, and writes curve.md, curve.json and curve.png with the steps "
                       "each needs to reach 0.5x and 0.8x of the teacher. Finished runs are reused.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every student")
    p.add_argument("--output_dir", "--out", dest="output_dir", default="runs/curve",
                   help="curve folder (default runs/curve)")
    p.add_argument("--recipe", help="the students' recipe (default: recipes/toy.yaml)")
    p.add_argument("--students", nargs="+", default=["A", "B", "E"], metavar="LETTER")
    p.add_argument("--steps", type=int, help="training steps per student (default: the recipe's)")
    p.add_argument("--eval_every", type=int, default=250,
                   help="grade a checkpoint every N steps (default 250)")
    p.add_argument("--num_prompts", type=int, default=64,
                   help="held-out prompts per grading (default 64)")
    p.add_argument("--teacher_curve", action="store_true",
                   help="also build the toy teacher again with snapshots and grade its own training")
    p.set_defaults(func=cmd_curve)

    p = sub.add_parser("handoff", help="where the student loses what the teacher draws: sample with one model "
                       "above a timestep and the other below", description="Grades, on held-out toy prompts with "
                       "the checkpoint's sampler, the teacher and the student alone and every handoff between "
                       "them: the student for t >= T and the teacher below, and the other way round. Prints the "
                       "table; with --output_dir also writes handoff.md and handoff.json.")
    p.add_argument("checkpoint", help="a toy-world checkpoint folder or run folder")
    p.add_argument("--at", nargs="+", type=int, default=[600, 400, 200], metavar="T",
                   help="handoff timesteps (default 600 400 200)")
    p.add_argument("--num_prompts", type=int, default=64, help="held-out prompts (default 64)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--output_dir", "--out", dest="output_dir", help="also write handoff.md and handoff.json here")
    p.set_defaults(func=cmd_handoff)

    p = sub.add_parser("show-recipe", help="print a recipe fully resolved (extends + overrides)")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_show_recipe)

    p = sub.add_parser("data-report", help="scan an image folder: bucket histogram, skipped files and why")
    p.add_argument("dir", help="folder of images with same-name .txt captions")
    p.add_argument("recipe", nargs="?", help="recipe whose data settings to use (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_data_report)

    p = sub.add_parser("presets", help="list the student presets and their sizes")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("toy-teacher", add_help=False,
                       help="train (or reuse) a toy teacher and save it as a diffusers folder",
                       description="Trains a small VAE, a CLIP text encoder with its own tokenizer and a UNet on "
                       "the toy world (CPU, minutes) and saves a StableDiffusion(XL)Pipeline folder; cached.")
    # Its options are the toy builder's own (`python cli.py toy-teacher --help` shows them): `main`
    # hands everything after the command to that parser, so this one stays free of torch imports.
    return both_spellings(parser)


def main(argv: list[str] | None = None) -> int:
    from sitdistill.core.recipe import RecipeError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["toy-teacher"]:  # the toy builder parses its own options
        return cmd_toy_teacher(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as e:
        return fail(str(e), EXIT_USAGE)
    except KeyboardInterrupt:
        return fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
