"""Student vs teacher: the evaluation report (`cli.py eval`).

For one prompt set, the same seeds and the same sampler for every model (teacher, student, and a
baseline checkpoint when given, e.g. a student trained without teacher):

  * side-by-side grids (rows = prompts, columns = teacher | student | baseline), one per seed;
  * paired distances of each model's samples to the teacher's: latent MSE, pixel PSNR, SSIM;
  * noise-prediction MSE against the teacher by timestep range, on fixed x_t made from the
    teacher's own samples (the same x_t for every model), as a table and a plot;
  * toy-world prompt fidelity for every model when the prompts are toy-world captions;
  * CLIP score and a Fréchet distance when local weights are given (nothing is downloaded).

Written into one folder: ``report.md``, ``metrics.json``, the PNGs (grids, plot, every sample with
its settings in the PNG text), and ``tb/`` for tensorboard.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from sitdistill.evaluation.metrics import (clip_score, frechet_distance, image_features, line_plot, noise_prediction_mse,
                             paired_distances, reconstruction_psnr, summary)
from sitdistill.infer.sampling import teacher_denoiser
from sitdistill.infer.samples import generators, grid, png_info, sample_latents, student_fn, to_pil

Tensor = torch.Tensor

# Held-out toy prompts are drawn with the training world's seed plus this offset.
HELD_OUT_SEED_OFFSET = 1_000_003
NOT_COMPUTED = "not computed (no local weights given)"
# Grid cells are enlarged (nearest neighbour, whole factors) to at least this many pixels, so
# 64-px toy samples are readable in the report.
GRID_MIN_CELL = 128


# --------------------------------------------------------------------------- prompts

def toy_prompts(recipe, n: int) -> list[str]:
    """Toy-world captions from a seed the training data did not use (all colour/shape pairs,
    including any the training set excluded)."""
    from sitdistill.data.toy import ToyWorld

    return ToyWorld().prompts(n, seed=int(recipe.data.toy.seed) + HELD_OUT_SEED_OFFSET)


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def evaluation_prompts(recipe, prompts_file: str | None = None, source: str = "auto",
                       num_prompts: int | None = None) -> tuple[list[str], str]:
    """(prompts, where they came from). ``source``: "auto" (a file if given; else held-out toy
    prompts when the recipe trains on the toy world; else the recipe's sampling prompts),
    "file", "recipe" or "toy"."""
    n = num_prompts or recipe.evaluation.num_prompts
    prompts_file = prompts_file or recipe.evaluation.prompts_file
    if source == "auto":
        source = "file" if prompts_file else ("toy" if recipe.data.root is None else "recipe")
    if source == "file":
        if not prompts_file:
            raise ValueError("prompt source 'file' needs --prompts-file or evaluation.prompts_file")
        return read_prompts_file(prompts_file)[:n], f"file {prompts_file}"
    if source == "toy":
        return toy_prompts(recipe, n), f"toy world, held out (seed data.toy.seed + {HELD_OUT_SEED_OFFSET})"
    if source == "recipe":
        if not recipe.sampling.prompts:
            raise ValueError("the recipe has no sampling.prompts; give --prompts-file")
        return list(recipe.sampling.prompts)[:n], "recipe sampling.prompts"
    raise ValueError(f"unknown prompt source {source!r}")


def _toy_targets(prompts: list[str]) -> list[dict] | None:
    """Parsed toy captions, or None when any prompt is not one."""
    from sitdistill.data.toy import parse_caption

    try:
        return [parse_caption(p) for p in prompts]
    except ValueError:
        return None


@torch.no_grad()
def toy_reconstruction_psnr(sides: dict[str, Any], prompts: list[str], *, height: int, width: int,
                            batch_size: int = 8) -> dict[str, float]:
    """PSNR (dB) of real toy images (drawn for the prompts) through each model's VAE, mode encode
    then decode: the teacher's frozen VAE, or a student's own after the end-to-end stage. Models
    sharing one VAE object are computed once."""
    from sitdistill.data.toy import draw, spec_from_caption

    images = [np.asarray(draw(spec_from_caption(p, width=width, height=height, seed=i)))
              for i, p in enumerate(prompts)]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W)
    done: dict[int, float] = {}
    out = {}
    for name, side in sides.items():
        key = id(side.vae)
        if key not in done:
            chunks = pixels.split(batch_size)  # chunk means weighted by size: the mean over all images
            done[key] = sum(reconstruction_psnr(side, c) * len(c) for c in chunks) / len(pixels)
        out[name] = done[key]
    return out


@torch.no_grad()
def toy_fidelity(teacher, models: dict[str, Callable], prompts: Sequence[str], *, scheduler: str, steps: int,
                 guidance_scale: float, seed: int = 0, batch_size: int = 16,
                 sides: dict[str, Any] | None = None) -> dict[str, dict]:
    """Toy-grader rates (colour, shape, position, all three) of every model on the same prompts,
    seeds and sampler. ``models``: name -> eps function ``fn(x, t, cond)``. Each prompt is drawn at
    a resolution of the toy world's (cycled over ``sitdistill.data.toy.RESOLUTIONS``, so every aspect ratio is
    graded), image ``i`` from seed ``seed + i``. ``sides``: a model's own encoders + VAE.

    When ``models`` has a "teacher", every other model also gets ``agreement``: how often the
    grader sees the same colour, shape and position in its sample as in the teacher's sample of
    the same prompt and seed (does the student draw what the teacher draws, right or wrong)."""
    from sitdistill.data.toy import RESOLUTIONS, analyse, match_rates, parse_caption

    prompts = list(prompts)
    targets = [parse_caption(p) for p in prompts]
    sizes = [RESOLUTIONS[i % len(RESOLUTIONS)] for i in range(len(prompts))]
    out, seen = {}, {}
    for name, fn in models.items():
        side = (sides or {}).get(name, teacher)  # a student's own front end, else the teacher
        images: list = [None] * len(prompts)
        for wh in sorted(set(sizes)):
            idx = [i for i, s in enumerate(sizes) if s == wh]
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                z = sample_latents(fn, side, [prompts[i] for i in chunk], height=wh[1], width=wh[0],
                                   scheduler=scheduler, steps=steps, guidance_scale=guidance_scale,
                                   scheduler_config=teacher.scheduler_config, generator=[torch.Generator().manual_seed(seed + i) for i in chunk])
                for i, im in zip(chunk, to_pil(side.decode_latents(z))):
                    images[i] = im
        seen[name] = [analyse(im) for im in images]  # each image analysed once, for both rates
        out[name] = {**match_rates(seen[name], targets), "n": len(images)}
    if "teacher" in seen:
        for name in out:
            if name != "teacher":
                out[name]["agreement"] = match_rates(seen[name], seen["teacher"])
    return out


def recipe_toy_fidelity(recipe, teacher, models: dict[str, Callable], prompts: Sequence[str],
                        sides: dict[str, Any] | None = None) -> dict[str, dict]:
    """``toy_fidelity`` with the recipe's sampler, steps, guidance and seed (``recipe.sampling``):
    how a run, the curve and the handoff grade models alike."""
    s = recipe.sampling
    return toy_fidelity(teacher, models, prompts, scheduler=s.scheduler, steps=s.num_inference_steps,
                        guidance_scale=s.guidance_scale, seed=s.seed, sides=sides)


# --------------------------------------------------------------------------- the report

@dataclass
class EvalSettings:
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str | None
    height: int
    width: int
    seeds: list[int]
    timestep_bins: int
    batch_size: int = 8
    weights: str = "ema"
    fid_weights: str | None = None
    clip_weights: str | None = None
    prompt_source: str = ""
    guidance_rescale: float = 0.0


def settings_from_recipe(recipe, **overrides: Any) -> EvalSettings:
    """The recipe's sampling/evaluation sections; keyword overrides win when not None."""
    from sitdistill.core.recipe import default_pixel_size

    s, e = recipe.sampling, recipe.evaluation
    h, w = default_pixel_size(recipe)
    base = dict(scheduler=s.scheduler, num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                negative_prompt=s.negative_prompt, guidance_rescale=s.guidance_rescale, height=h, width=w,
                seeds=list(e.seeds),
                timestep_bins=e.timestep_bins, fid_weights=e.fid_weights, clip_weights=e.clip_weights)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return EvalSettings(**base)


@torch.no_grad()
def _samples(model_fn, front, prompts: list[str], st: EvalSettings, scheduler_config: dict) -> Tensor:
    """Latents for every (seed, prompt), seed-major; image i of seed s uses seed s + i (as `cli.py sample`)."""
    out = []
    for seed in st.seeds:
        for start in range(0, len(prompts), st.batch_size):
            chunk = prompts[start:start + st.batch_size]
            out.append(sample_latents(model_fn, front, chunk, height=st.height, width=st.width,
                                      scheduler=st.scheduler, steps=st.num_inference_steps,
                                      guidance_scale=st.guidance_scale, negative_prompt=st.negative_prompt,
                                      guidance_rescale=st.guidance_rescale, scheduler_config=scheduler_config,
                                      generator=generators(seed + start, len(chunk))))
    return torch.cat(out)


def evaluate(teacher, students: dict[str, torch.nn.Module], prompts: list[str], st: EvalSettings,
             out_dir: str | Path, *, labels: dict[str, str] | None = None,
             held_out_combos: Sequence[str] = (), sides: dict[str, Any] | None = None,
             teacher_samples: dict | None = None) -> dict[str, Any]:
    """Write the report for ``students`` ({"student": ..., "baseline": ...}) against ``teacher``.

    ``sides``: a student's own front end (``sitdistill.train.e2e.load_student_side``) where the
    end-to-end stage trained them; a student without an entry uses the teacher's.

    ``teacher_samples``: a dict kept by the caller across reports with the same teacher: the
    teacher's latents are computed once per (prompts, settings) and reused (a study evaluating
    many checkpoints on one prompt set samples the teacher once).

    Returns the metrics (also in ``metrics.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for m in students.values():
        m.eval()
    fns: dict[str, Callable] = {"teacher": teacher_denoiser(teacher), **{k: student_fn(m) for k, m in students.items()}}
    names = list(fns)
    all_prompts = [p for _ in st.seeds for p in prompts]  # seed-major, like _samples
    all_seeds = [seed + i for seed in st.seeds for i in range(len(prompts))]
    side = {k: (sides or {}).get(k, teacher) for k in fns}  # encoders + VAE each model samples with
    memo_key = (tuple(prompts), json.dumps(asdict(st), sort_keys=True))
    latents = {}
    for k, fn in fns.items():
        if k == "teacher" and teacher_samples is not None and memo_key in teacher_samples:
            latents[k] = teacher_samples[memo_key]
        else:
            latents[k] = _samples(fn, side[k], prompts, st, teacher.scheduler_config)
    if teacher_samples is not None:
        teacher_samples[memo_key] = latents["teacher"]
    pixels = {k: torch.cat([side[k].decode_latents(z) for z in v.split(st.batch_size)]) for k, v in latents.items()}
    images = {k: to_pil(v) for k, v in pixels.items()}

    files: list[str] = []
    for k in names:  # every sample, with its settings in the PNG text
        folder = out / "images" / k
        folder.mkdir(parents=True, exist_ok=True)
        for i, (img, prompt, seed) in enumerate(zip(images[k], all_prompts, all_seeds)):
            img.save(folder / f"{i:04d}-seed{seed}.png", pnginfo=png_info(
                prompt=prompt, negative_prompt=st.negative_prompt, seed=seed, sampler=st.scheduler,
                steps=st.num_inference_steps, guidance_scale=st.guidance_scale, model=k,
                checkpoint=(labels or {}).get(k)))
    grids = []
    zoom = max(1, GRID_MIN_CELL // max(1, min(st.height, st.width)))
    cells = {k: [im.resize((im.width * zoom, im.height * zoom), Image.NEAREST) for im in images[k]] for k in names}
    for j, seed in enumerate(st.seeds):
        rows = [[cells[k][j * len(prompts) + i] for k in names] for i in range(len(prompts))]
        path = out / f"grid_seed{seed}.png"
        grid(rows, labels=names).save(path)
        grids.append(path.name)
    files += grids

    metrics: dict[str, Any] = {"models": {k: (labels or {}).get(k, k) for k in names}, "prompts": prompts,
                               "settings": asdict(st)}
    metrics["paired"] = {k: {m: summary(v) for m, v in paired_distances(latents[k], latents["teacher"], pixels[k],
                                                                          pixels["teacher"]).items()}
                         for k in students}

    # Fixed x_t from the teacher's own samples, the conditional embeddings of their prompts.
    cond = teacher.encode_prompt(all_prompts, height=st.height, width=st.width)
    own = {k: side[k].encode_prompt(all_prompts, height=st.height, width=st.width)
           for k in students if side[k] is not teacher}
    noise = noise_prediction_mse(teacher, {k: fns[k] for k in students}, latents["teacher"], cond,
                                 bins=st.timestep_bins, batch_size=st.batch_size, model_conds=own)
    metrics["noise_mse"] = noise
    metrics["noise_mse_mean"] = {k: float(np.mean(noise[k])) for k in students}
    edges = noise["bin_edges"]
    centres = [(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:])]
    plot = line_plot(centres, {k: noise[k] for k in students}, title="eps MSE to the teacher",
                     xlabel="timestep t", ylabel="MSE")
    plot.save(out / "noise_mse.png")
    files.append("noise_mse.png")

    targets = _toy_targets(all_prompts)
    metrics["fidelity"] = None
    if targets is not None:
        from sitdistill.data.toy import fidelity

        metrics["fidelity"] = {k: fidelity(images[k], targets) for k in names}
        held = {tuple(c.split()) for c in held_out_combos}
        idx = [i for i, t in enumerate(targets) if (t["colour"], t["shape"]) in held]
        if idx:
            metrics["fidelity_held_out_combos"] = {k: fidelity([images[k][i] for i in idx], [targets[i] for i in idx])
                                                   for k in names}
        metrics["recon_psnr"] = toy_reconstruction_psnr({k: side[k] for k in names}, prompts, height=st.height,
                                                        width=st.width, batch_size=st.batch_size)
    metrics["clip_score"] = ({k: clip_score(images[k], all_prompts, st.clip_weights) for k in names}
                             if st.clip_weights else NOT_COMPUTED)
    if st.fid_weights:
        ref = image_features(images["teacher"], st.fid_weights)
        metrics["frechet_distance_to_teacher"] = {k: frechet_distance(image_features(images[k], st.fid_weights), ref)
                                                  for k in students}
    else:
        metrics["frechet_distance_to_teacher"] = NOT_COMPUTED
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics["files"] = files + ["report.md", "metrics.json", "images/", "tb/"]

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out / "report.md").write_text(render_report(metrics, grids), encoding="utf-8")
    write_tensorboard(out / "tb", metrics, [out / g for g in grids] + [out / "noise_mse.png"])
    return metrics


# --------------------------------------------------------------------------- writing

def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def results_table(metrics: dict[str, Any]) -> str:
    """The report's main table (markdown), one row per model."""
    fid = metrics.get("fidelity") or {}
    recon = metrics.get("recon_psnr") or {}
    head = ("| model | latent MSE ↓ | PSNR dB ↑ | SSIM ↑ | eps MSE to teacher ↓ | toy fidelity all ↑ "
            "| colour | shape | position | VAE recon PSNR dB ↑ |")
    lines = [head, "|" + "---|" * 10]
    for k in metrics["models"]:
        p = metrics["paired"].get(k)
        row = [k]
        if p:
            row += [f"{_fmt(p['latent_mse']['mean'])} ± {_fmt(p['latent_mse']['std'], 2)}",
                    f"{p['psnr']['mean']:.2f}", f"{p['ssim']['mean']:.4f}", _fmt(metrics["noise_mse_mean"][k])]
        else:
            row += ["(reference)"] * 3 + ["—"]
        f = fid.get(k)
        row += [f"{f[c]:.2f}" for c in ("all", "colour", "shape", "position")] if f else ["—"] * 4
        row.append(f"{recon[k]:.2f}" if k in recon else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_report(metrics: dict[str, Any], grids: list[str]) -> str:
    st = metrics["settings"]
    noise = metrics["noise_mse"]
    students = [k for k in metrics["models"] if k != "teacher"]
    edges = noise["bin_edges"]
    lines = ["# Student vs teacher", ""]
    lines += [f"- {k}: `{v}`" for k, v in metrics["models"].items()]
    lines += [f"- prompts: {len(metrics['prompts'])} ({st['prompt_source']}), seeds {st['seeds']} "
              f"(image i of seed s uses seed s + i)",
              f"- sampler: {st['scheduler']}, {st['num_inference_steps']} steps, guidance {st['guidance_scale']}, "
              f"{st['height']}x{st['width']}, negative prompt {st['negative_prompt']!r}, {st['weights']} weights", "",
              "## Results", "",
              "Distances are to the teacher's sample of the same prompt and seed (pixels in [0, 1]); "
              "toy fidelity is the grader's rate of images showing the prompt's colour, shape and position; VAE recon PSNR "
              "is real toy images through the VAE each model samples with (a student's own after the end-to-end stage).", "",
              results_table(metrics), ""]
    if metrics.get("fidelity_held_out_combos"):
        held = metrics["fidelity_held_out_combos"]
        lines += ["Toy fidelity on colour/shape pairs left out of the training data: "
                  + ", ".join(f"{k} {v['all']:.2f} (n={v['n']})" for k, v in held.items()), ""]
    lines += ["## Noise-prediction error by timestep", "",
              "MSE of each model's epsilon to the teacher's on the same x_t (the teacher's samples noised at a "
              "timestep drawn in each range); last column: the teacher's own MSE to the true noise, for scale.", "",
              "| t range | " + " | ".join(students) + " | teacher vs true noise |",
              "|" + "---|" * (len(students) + 2)]
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        lines.append(f"| [{lo}, {hi}) | " + " | ".join(_fmt(noise[k][b]) for k in students)
                     + f" | {_fmt(noise['teacher_vs_true_noise'][b])} |")
    lines += ["", "![noise-prediction error by timestep](noise_mse.png)", "", "## Samples", "",
              "Rows = prompts below, columns = " + " | ".join(metrics["models"]) + ".", ""]
    lines += [f"![samples, {g[:-4]}]({g})" for g in grids]
    lines += [""] + [f"{i + 1}. {p}" for i, p in enumerate(metrics["prompts"])]
    clip, fd = metrics["clip_score"], metrics["frechet_distance_to_teacher"]
    lines += ["", "## CLIP score and Fréchet distance", "",
              "- CLIP score: " + (clip if isinstance(clip, str) else
                                  ", ".join(f"{k} {v['mean']:.2f}" for k, v in clip.items())),
              "- Fréchet distance to the teacher's samples (features of the given local model; few samples "
              "make it noisy): " + (fd if isinstance(fd, str) else ", ".join(f"{k} {v:.4g}" for k, v in fd.items())),
              "", f"_{metrics['seconds']} s; every sample is in `images/` with its prompt, seed and sampler in the "
              "PNG text; `metrics.json` holds all numbers; `tb/` is a tensorboard log._", ""]
    return "\n".join(lines)


def _flat(prefix: str, value: Any) -> dict[str, float]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: float(value)}
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}/{k}" if prefix else str(k), v))
        return out
    return {}


def write_tensorboard(log_dir: Path, metrics: dict[str, Any], figures: list[Path]) -> None:
    """The report's scalars, per-timestep curves, figures and table, as tensorboard events."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        keys = ("paired", "noise_mse_mean", "fidelity", "clip_score", "frechet_distance_to_teacher")
        for tag, value in _flat("", {k: metrics.get(k) for k in keys}).items():
            writer.add_scalar(f"eval/{tag}", value, 0)
        noise = metrics["noise_mse"]
        for name in noise:
            if name == "bin_edges":
                continue
            for b, value in enumerate(noise[name]):
                writer.add_scalar(f"eval/noise_mse_by_t/{name}", value, noise["bin_edges"][b])
        for path in figures:
            writer.add_image(f"eval/{path.stem}", np.asarray(Image.open(path).convert("RGB")), 0, dataformats="HWC")
        writer.add_text("eval/results", results_table(metrics), 0)
    finally:
        writer.close()
