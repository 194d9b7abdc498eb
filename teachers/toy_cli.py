"""`cli.py toy-teacher`: build (or reuse) a toy teacher and grade it on held-out prompts."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from sitdistill.data import toy as world
from sitdistill.teachers.toy import (FAMILIES, FINISHED_MARKER, PRESETS, ToyTeacherSettings, build_toy_teacher,
                          default_cache_root, is_finished, toy_teacher_dir)


# --- Fidelity -----------------------------------------------------------------------------------
EVAL_SEED = 10_007         # held-out prompts: a seed the training data (seed 0.. by default) does not use
EVAL_STEPS = 25
EVAL_GUIDANCE = 5.0


def evaluate(folder: str | Path, n: int = 64, seed: int = EVAL_SEED, steps: int = EVAL_STEPS,
             guidance: float = EVAL_GUIDANCE, batch_size: int = 16) -> dict:
    """Sample the saved pipeline (loaded with diffusers' from_pretrained) on n held-out prompts and grade.

    Sampler: DDIM (built from the saved scheduler config), ``steps`` steps, CFG ``guidance``; each
    prompt is sampled at its spec's resolution, so all aspect ratios are covered.
    """
    from diffusers import DDIMScheduler, DiffusionPipeline

    folder = Path(folder)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    info = json.loads((folder / FINISHED_MARKER).read_text()) if (folder / FINISHED_MARKER).exists() else {}
    res = tuple(map(tuple, info.get("settings", {}).get("resolutions", world.RESOLUTIONS)))
    specs = world.ToyWorld(resolutions=res).sample(n, seed)
    images: list = [None] * n
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    for wh in sorted({(s.width, s.height) for s in specs}):
        idx = [i for i, s in enumerate(specs) if (s.width, s.height) == wh]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            out = pipe([specs[i].caption for i in chunk], width=wh[0], height=wh[1], num_inference_steps=steps,
                       guidance_scale=guidance, generator=gen, output_type="pil").images
            for i, im in zip(chunk, out):
                images[i] = im
    rates = world.fidelity(images, specs)
    rates.update(sampler="DDIM", steps=steps, guidance=guidance, seed=seed, sample_s=round(time.time() - t0, 1),
                 build_s=round(info.get("timings", {}).get("total_s", float("nan")), 1))
    return rates


# --- Command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--family", choices=FAMILIES, default="sd15")
    parser.add_argument("--out", type=Path, default=None,
                        help="build into this folder (default: the cache, <cache>/toy-teacher/<family>-<key>)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (default $SITDISTILL_CACHE)")
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--loss-weighting", default=None, help="UNet loss weighting: none, min_snr or v "
                        "(sitdistill.core.schedule.LOSS_WEIGHTINGS; default min_snr)")
    parser.add_argument("--text-pool", action=argparse.BooleanOptionalAction, default=None,
                        help="SD1.5 family: pooled text added to the UNet's time embedding (default on)")
    parser.add_argument("--optimizer", choices=("adamw", "muon"), default=None,
                        help="UNet optimizer (default adamw; muon: Muon for its matrices and kernels)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice; 1 is faster on a busy shared CPU)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished build exists")
    parser.add_argument("--eval", type=int, default=0, metavar="N",
                        help="after building, sample N held-out prompts and print colour/shape/position fidelity")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="toy-teacher", description=__doc__.split("\n")[0]))


def run(args: argparse.Namespace) -> Path:
    overrides = {k: v for k, v in (("unet_steps", args.unet_steps), ("vae_steps", args.vae_steps),
                                   ("batch_size", args.batch_size), ("loss_weighting", args.loss_weighting),
                                   ("text_pool", args.text_pool), ("optimizer", args.optimizer))
                 if v is not None}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    s = ToyTeacherSettings(family=args.family, preset=args.preset, seed=args.seed, **overrides)
    cache = args.cache_dir if args.cache_dir is not None else default_cache_root()
    folder = args.out if args.out is not None else toy_teacher_dir(s, cache)
    done = is_finished(folder) and json.loads((Path(folder) / FINISHED_MARKER).read_text()).get("settings") == \
        json.loads(json.dumps(s.key_settings(), default=list))
    if args.force or not done:
        build_toy_teacher(folder, s, cache_dir=cache)
    else:
        print(f"toy {s.family} teacher already built at {folder}", flush=True)
    if args.eval:
        print(json.dumps(evaluate(folder, n=args.eval)), flush=True)
    print(folder)
    return Path(folder)


def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
