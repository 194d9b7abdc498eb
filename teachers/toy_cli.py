"""`cli.py toy-teacher`: build (or reuse) a toy teacher and grade it on held-out prompts."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from sitdistill.data import toy as world
from sitdistill.teachers.toy import (FAMILIES, FINISHED_MARKER, PRESETS, ToyTeacherSettings, build_toy_teacher,
                          default_cache_root, is_finished, toy_teacher_dir)
from sitdistill.teachers.toy_probe import token_gains, word_gain


# --- Fidelity -----------------------------------------------------------------------------------
EVAL_SEED = 10_007         # held-out prompts: a seed the training data (seed 0.. by default) does not use
EVAL_STEPS = 25
EVAL_GUIDANCE = 5.0


def _ddim_pipeline(folder: str | Path):
    """The saved pipeline (diffusers' from_pretrained) with a DDIM sampler from its scheduler config."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(Path(folder))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate(folder: str | Path, n: int = 64, seed: int = EVAL_SEED, steps: int = EVAL_STEPS,
             guidance: float = EVAL_GUIDANCE, batch_size: int = 16) -> dict:
    """Sample the saved pipeline (loaded with diffusers' from_pretrained) on n held-out prompts and grade.

    Sampler: DDIM (built from the saved scheduler config), ``steps`` steps, CFG ``guidance``; each
    prompt is sampled at its spec's resolution, so all aspect ratios are covered.
    """
    folder = Path(folder)
    pipe = _ddim_pipeline(folder)
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


def position_probe(folder: str | Path, n_seeds: int = 24, steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE,
                   seed: int = EVAL_SEED) -> dict:
    """Does the teacher put the shape where the caption says, or where its initial noise says?

    For each of ``n_seeds`` initial latents (64 x 64 px), the five captions that differ only in
    their position words are sampled from that same latent (DDIM, CFG). A teacher that reads the
    caption moves the shape with the words; one that ignores them draws it in the same place for
    all five, wherever the noise leads (README, "The SD1.5-style toy teacher"). Returns the
    position rate, the rate at which two captions of one latent land in the same place
    (``same_place``: 0 when the words decide, 1 when the noise does; 0.2 by chance) and the share
    of latents where all five land together.
    """
    pipe = _ddim_pipeline(folder)
    positions = list(world.POSITIONS)
    # The rest of each caption (colour, shape, size, background) comes from held-out specs.
    specs = world.ToyWorld(resolutions=((64, 64),)).sample(n_seeds, seed)
    latent_shape = (1, pipe.unet.config.in_channels, 64 // pipe.vae_scale_factor, 64 // pipe.vae_scale_factor)
    right = same = together = pairs = 0
    for i, spec in enumerate(specs):
        captions = [dataclasses.replace(spec, position=p).caption for p in positions]
        latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed + i)).repeat(5, 1, 1, 1)
        images = pipe(captions, width=64, height=64, num_inference_steps=steps, guidance_scale=guidance,
                      latents=latents, output_type="pil").images
        got = [world.analyse(im)["position"] for im in images]
        right += sum(g == p for g, p in zip(got, positions))
        together += len(set(got)) == 1 and got[0] is not None
        for a, b in itertools.combinations(got, 2):
            pairs += 1
            same += a == b and a is not None
    return {"position": right / (5 * n_seeds), "same_place": same / pairs, "all_five_together": together / n_seeds,
            "latents": n_seeds, "steps": steps, "guidance": guidance}


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
                        help="SD1.5 family: pooled text added to the UNet's time embedding (default off)")
    parser.add_argument("--optimizer", choices=("adamw", "muon"), default=None,
                        help="UNet optimizer (default adamw; muon: Muon for its matrices and kernels)")
    parser.add_argument("--multires-noise", type=int, default=None, metavar="LEVELS",
                        help="UNet training noise with this many coarser levels added (default 0: Gaussian)")
    parser.add_argument("--multires-discount", type=float, default=None,
                        help="weight of multires level i is this ** i (default 0.5)")
    parser.add_argument("--text-norm-warmup", type=int, default=None, metavar="STEPS",
                        help="SD1.5 family: UNet steps reading the text encoder's last layer before its final "
                        "layer norm, which is then blended in (default 0: always the pipeline's states)")
    parser.add_argument("--text-norm-ramp", type=int, default=None, metavar="STEPS",
                        help="steps over which the final layer norm is blended in after the warm-up (default 20 %% of the UNet "
                        "steps)")
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                        help="mirror half of each UNet batch left-right, swapping left and right in its captions")
    parser.add_argument("--caption-words", type=float, default=None, metavar="W",
                        help="weight of the caption-words objective: the text encoder's end-of-text state must "
                        "tell every factor of its caption, as a CLIP encoder's does (default 0.1; 0: off)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice; 1 is faster on a busy shared CPU)")
    parser.add_argument("--processes", type=int, choices=(1, 2), default=None,
                        help="split each UNet step's batch over this many processes, each with half the threads "
                        "(default: 2 where torch runs two threads and the build has >= 500 UNet steps)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished build exists")
    parser.add_argument("--eval", type=int, default=0, metavar="N",
                        help="after building, sample N held-out prompts and print colour/shape/position fidelity")
    parser.add_argument("--probe-position", type=int, default=0, metavar="N",
                        help="after building, sample the five position captions from each of N shared initial "
                        "latents: does the caption or the noise decide where the shape goes? (position_probe)")
    parser.add_argument("--word-gain-every", type=int, default=0, metavar="N",
                        help="while building, every N UNet steps: how much worse the UNet predicts when the "
                        "caption's position, colour or shape words are wrong (the word-gain probe, "
                        "sitdistill.teachers.toy_probe); does not change the build")
    parser.add_argument("--word-gain", action="store_true",
                        help="after building, the word-gain probe on the finished teacher")
    parser.add_argument("--token-gain", action="store_true",
                        help="after building, which token of the text context carries each position axis "
                        "(WordGainProbe.token_gains)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="toy-teacher", description=__doc__.split("\n")[0]))


def run(args: argparse.Namespace) -> Path:
    overrides = {k: v for k, v in (("unet_steps", args.unet_steps), ("vae_steps", args.vae_steps),
                                   ("batch_size", args.batch_size), ("loss_weighting", args.loss_weighting),
                                   ("text_pool", args.text_pool), ("optimizer", args.optimizer),
                                   ("multires_noise", args.multires_noise),
                                   ("multires_discount", args.multires_discount),
                                   ("text_norm_warmup", args.text_norm_warmup),
                                   ("text_norm_ramp", args.text_norm_ramp), ("mirror", args.mirror),
                                   ("caption_words", args.caption_words))
                 if v is not None}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        s = ToyTeacherSettings(family=args.family, preset=args.preset, seed=args.seed, **overrides)
    except ValueError as err:  # a bad combination of flags: one line and exit 2, as argparse does
        print(f"toy-teacher: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    cache = args.cache_dir if args.cache_dir is not None else default_cache_root()
    folder = args.out if args.out is not None else toy_teacher_dir(s, cache)
    done = is_finished(folder) and json.loads((Path(folder) / FINISHED_MARKER).read_text()).get("settings") == \
        json.loads(json.dumps(s.key_settings(), default=list))
    if args.force or not done:
        build_toy_teacher(folder, s, cache_dir=cache, word_gain_every=args.word_gain_every, processes=args.processes)
    else:
        print(f"toy {s.family} teacher already built at {folder}"
              + (" (--word_gain_every applies to a build: add --force)" if args.word_gain_every else ""), flush=True)
    if args.eval:
        print(json.dumps(evaluate(folder, n=args.eval)), flush=True)
    if args.word_gain:
        print(json.dumps({"word_gain": word_gain(folder)}), flush=True)
    if args.token_gain:
        print(json.dumps({"token_gain": token_gains(folder)}), flush=True)
    if args.probe_position:
        print(json.dumps({"position_probe": position_probe(folder, n_seeds=args.probe_position)}), flush=True)
    print(folder)
    return Path(folder)


def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
