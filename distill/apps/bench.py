"""`cli.py bench`: time the distillation step and break it down.

Two configurations, measured in one run:
- `toy`: `recipes/toy.yaml` as users run it (the SD1.5-style toy teacher, its small SiT, toy world);
- `mid`: SiT-B/2 on 32x32 latents (256 px) with an SD1.5-shaped, randomly initialised UNet teacher
  (860 M parameters; text encoder and VAE small, since with caching on they are out of the step).

`key=value ...` alone: overrides of the toy configuration (what `--compare` cannot time side by side,
such as `training.mixed_precision`, which accelerate holds process-wide).
`--compare key=value ...`: the toy configuration as it is and with the overrides, two students built
side by side and timed in alternating rounds, so that a change's cost is a ratio measured under the
same machine load (these machines vary by 17 % from day to day).

Each configuration warms up (fills the latent and text caches, first-call allocations), then
times `steps` steps section by section. The overhead ratio is
step / (teacher forward + student forward + student backward): everything the trainer adds on top
of the two networks' own work (data, conditioning, noise, optimizer, EMA, bookkeeping).
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
CORE = ("teacher", "student_forward", "backward")
COLUMNS = ("data", "conditioning", "noise", "teacher", "student_forward", "backward", "optimizer", "ema", "other")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak)


def sd15_shaped_teacher(device: torch.device):
    """An SD1.5-shaped UNet (random weights, the real config at 32x32 latents) behind the real
    SD15Teacher adapter."""
    from sitdistill.apps.bench_models import random_teacher, real_unet_config

    return random_teacher("sd15", {**real_unet_config("sd15"), "sample_size": 32}, device)


def _config(name: str, workdir: Path, device: torch.device, overrides: tuple[str, ...] = ()):
    from sitdistill.core.recipe import load_recipe

    common = [f"output.dir={workdir / name}", f"data.cache_dir={workdir / 'cache'}", "training.sample_every=0",
              "output.tensorboard=false"]
    if name == "toy":
        return load_recipe(ROOT / "recipes" / "toy.yaml", common + list(overrides)), None
    if name == "mid":
        from sitdistill.data.toy import ToyWorld

        images = workdir / "mid-data"
        ToyWorld(resolutions=((256, 256),)).write_folder(images, 32, seed=0)
        recipe = load_recipe(ROOT / "recipes" / "toy.yaml", common + [
            f"data.root={images}", "data.resolution=256", "data.bucket=false", "data.min_size=64",
            "student.preset=B/2", "training.batch_size=8"])
        return recipe, sd15_shaped_teacher(device)
    raise ValueError(f"unknown bench configuration {name!r}; choose from toy, mid")


def prime_caches(d) -> None:
    """One pass over the data fills the latent and text caches, so timed steps read no image."""
    for batch in d.data.epoch_batches(0):
        d.objective.encode(list(batch["caption"]), batch)


def endless_batches(d):
    """The run's batches, epoch after epoch, for as many steps as asked."""
    epoch = 1
    while True:
        yield from d.data.epoch_batches(epoch)
        epoch += 1


def time_steps(d, steps: int, warmup: int, after_warmup=None) -> dict[str, Any]:
    """Run `warmup` steps of the real `Distiller.step`, call `after_warmup()`, then time `steps`
    steps section by section: step ms, sections (COLUMNS, "other" = what no section holds) and the
    overhead ratio."""
    batches = endless_batches(d)

    def one_step() -> float:
        start = time.perf_counter()
        with d.timer("data"):
            batch = next(batches)
        with d.accelerator.accumulate(d.student):
            d.step(batch)
        if d.timer.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):  # caches filled, allocator and kernels warm
        one_step()
    if after_warmup is not None:
        after_warmup()
    d.timer.enabled = True
    d.timer.reset()
    try:
        total = sum(one_step() for _ in range(steps))
    finally:
        d.timer.enabled = False
    sections = {k: v / steps * 1000 for k, v in d.timer.totals.items()}
    step_ms = total / steps * 1000
    # "other": what no column holds (sections without a column of their own, e.g. the trajectory
    # part's sampling, included), so the columns add up to the step.
    sections["other"] = step_ms - sum(v for k, v in sections.items() if k in COLUMNS)
    core = sum(sections.get(k, 0.0) for k in CORE)
    return {"step_ms": step_ms, "sections_ms": {k: sections.get(k, 0.0) for k in COLUMNS},
            "overhead_ratio": step_ms / core if core else float("nan")}


def bench_config(name: str, workdir: Path, steps: int, warmup: int, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    from sitdistill.train.trainer import Distiller

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe, teacher = _config(name, workdir, device, overrides)
    d = Distiller(recipe, teacher=teacher)
    prime_caches(d)

    def reset_peak() -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    timed = time_steps(d, steps, warmup, after_warmup=reset_peak)
    student = d.accelerator.unwrap_model(d.student)
    return {
        "config": name, "device": str(device), "student": recipe.student.preset,
        "student_params_M": sum(p.numel() for p in student.parameters()) / 1e6,
        "teacher_unet_params_M": sum(p.numel() for p in d.teacher.unet.parameters()) / 1e6,
        "batch_size": recipe.training.batch_size, "latent_hw": list(d.data.example_latent_hw),
        "steps": steps, "step_ms": timed["step_ms"], "sections_ms": timed["sections_ms"],
        "samples_per_s": recipe.training.batch_size / (timed["step_ms"] / 1000),
        "peak_memory_MiB": _peak_memory_mb(device), "overhead_ratio": timed["overhead_ratio"],
        "latent_cache": d.data.cache is not None, "text_cache": d.data.text_cache is not None,
    }


def format_table(results: list[dict]) -> str:
    head = ["config", "batch", "step ms"] + [c.replace("student_forward", "student fwd") for c in COLUMNS] + [
        "samples/s", "peak MiB", "overhead"]
    rows = [head]
    for r in results:
        rows.append([r["config"], str(r["batch_size"]), f"{r['step_ms']:.0f}"]
                    + [f"{r['sections_ms'][c]:.0f}" for c in COLUMNS]
                    + [f"{r['samples_per_s']:.1f}", f"{r['peak_memory_MiB']:.0f}", f"{r['overhead_ratio']:.3f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append("overhead = step / (teacher fwd + student fwd + student bwd); sections in ms per step; "
                 "peak memory: CUDA allocated, or the process's peak RSS on CPU")
    return "\n".join(lines)


def run_bench(configs: list[str], steps: int = 5, warmup: int = 2, as_json: bool = False,
              overrides: tuple[str, ...] = ()) -> str:
    """Each configuration's step, section by section; `overrides` (key=value) apply to the toy one."""
    with tempfile.TemporaryDirectory(prefix="sitdistill-bench-") as tmp:
        results = [bench_config(name, Path(tmp), steps, warmup, overrides if name == "toy" else ())
                   for name in configs]
    return json.dumps(results, indent=2) if as_json else format_table(results)


def compare_steps(overrides: list[str], rounds: int = 4, steps: int = 20, warmup: int = 3,
                  common: tuple[str, ...] = ()) -> str:
    """The toy configuration's step (with `common` overrides) as it is and with `overrides`, timed side
    by side: `rounds` alternating rounds of `steps` steps each. Returns ms/step and the ratio."""
    from sitdistill.train.trainer import Distiller

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="sitdistill-bench-") as tmp:
        runs = {}
        for label, extra in (("as it is", tuple(common)), (" ".join(overrides), (*common, *overrides))):
            recipe, _ = _config("toy", Path(tmp) / str(len(runs)), device, extra)
            d = Distiller(recipe)
            prime_caches(d)
            time_steps(d, 1, warmup)  # caches filled, allocator and kernels warm (not counted)
            runs[label] = (d, [0.0])
        for _ in range(rounds):  # alternating rounds: both sides see the same machine load
            for d, total in runs.values():
                total[0] += time_steps(d, steps, 0)["step_ms"] * steps / 1000
    base = next(iter(runs.values()))[1][0]
    lines = [f"toy step, {rounds} alternating rounds of {steps} steps:"]
    for label, (_, total) in runs.items():
        lines.append(f"  {label}: {total[0] / (rounds * steps) * 1000:.1f} ms/step, ratio {total[0] / base:.3f}")
    return "\n".join(lines)


def build_bench_problem(steps: int, rounds: int) -> str | None:
    """Why `compare_build_processes` cannot run with these counts, or None."""
    if steps < 2 or rounds < 1:
        return "bench --teacher_build needs --steps >= 2 (the first step is timed apart) and --rounds >= 1"
    return None


def compare_build_processes(steps: int = 200, rounds: int = 2, cache_dir: str | Path | None = None,
                            **settings: Any) -> str:
    """The SDXL-style toy teacher's build (its default settings but `steps` UNet steps) on one process
    and on two (sitdistill.teachers.toy_split), in `rounds` alternating rounds. Returns each side's
    ms per UNet step after the first (timed apart: it carries the worker's start, a few seconds)
    and the ratio. The VAE comes from the cache (`cache_dir`, default the toy teachers' cache root:
    built there if missing). `settings`: other ToyTeacherSettings (the tests' tiny builds)."""
    from sitdistill.teachers.toy import ToyTeacherSettings, build_toy_teacher
    from sitdistill.teachers.toy_cache import FINISHED_MARKER, default_cache_root

    problem = build_bench_problem(steps, rounds)
    if problem:
        raise ValueError(problem)
    settings = ToyTeacherSettings(**{"family": "sdxl", **settings, "unet_steps": steps})
    cache = Path(cache_dir) if cache_dir is not None else default_cache_root()
    totals = {1: [0.0, 0.0], 2: [0.0, 0.0]}  # the first steps' seconds, the other steps' seconds
    with tempfile.TemporaryDirectory(prefix="sitdistill-bench-") as tmp:
        for r in range(rounds):
            for processes, total in totals.items():
                out = build_toy_teacher(Path(tmp) / f"{r}-{processes}", settings, cache_dir=cache, processes=processes)
                timings = json.loads((out / FINISHED_MARKER).read_text())["timings"]
                total[0] += timings["unet_first_step_s"]
                total[1] += timings["unet_s"] - timings["unet_first_step_s"]
    lines = [f"toy sdxl teacher build, {rounds} alternating rounds of {steps} UNet steps "
             f"(torch threads {torch.get_num_threads()}, split between the processes):"]
    for processes, (first, rest) in totals.items():
        lines.append(f"  {processes} process{'es' if processes > 1 else ''}: {rest / (rounds * (steps - 1)) * 1000:.1f} "
                     f"ms/step after a first step of {first / rounds:.1f} s, ratio {rest / totals[1][1]:.3f}")
    return "\n".join(lines)
