"""Does the teacher help? The toy-world study of the losses (`cli.py study`).

Five students, one budget. Every student starts from the same initialisation, sees the same
limited data set in the same order and trains for the same number of steps; only the loss differs:

  A  eps only: the data noise loss, no teacher
  B  eps + teacher: the teacher's eps on the same x_t as a second target
  C  B + perturbation: input noise, caption recombination, prompts from a text-only prompt list and
     timestep jitter on the data's states, plus states from the teacher's own sampling trajectories
     for prompts of the list (the teacher is the only target on all of them)
  D  data-free: the trajectory states alone, no image at all, with E's feature alignment on them
     (the teacher's eps and its mid-block features on its own states are the only targets)
  E  C + feature alignment (a student block to the teacher's mid block)

The data set is small (``data.toy.num_images``) and some colour x shape combinations are held out
entirely (``data.toy.exclude_combos``). The prompt list given to C, D and E is text only, drawn from
the whole world (held-out combinations included): the situation the SDiT seed describes, where
captions are cheap and the teacher knows what the images do not show.

Each student is evaluated at every checkpoint with the eval report (`sitdistill.evaluation.evaluate.evaluate`)
on two prompt sets, combinations seen in training and held-out combinations: noise-prediction MSE
to the teacher, paired latent distance of its samples to the teacher's (same seeds, same sampler),
and prompt fidelity by the toy grader. Everything is repeated over seeds (the training seed: the
initialisation, the data order and every random draw) and summarised as mean +- standard deviation.

Output folder: ``runs/seed<s>/<letter>/`` (ordinary training runs), ``eval/`` (the reports),
``results.json``, ``results.md`` (the table and the claims checked against it) and ``study.png``.
A study that is run again skips the runs and evaluations it finished before, and a run that was
interrupted continues from its last checkpoint (exactly: resume is bit-exact).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sitdistill.apps.study_report import (ATTRIBUTES, DESCRIPTIONS, check_claims, plot_study, render_results,
                                       render_table, summarise)

STUDY_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "study.yaml"
LETTERS = ("A", "B", "C", "D", "E")
PROMPT_FILE = "prompts_all_combos.txt"
PROMPT_FILE_SEED = 424242  # the text-only prompt list; neither the training images nor the eval use it
EVAL_SEED = 777_001        # eval prompts: a seed the training set (data.toy.seed) does not use


def letter_overrides(letter: str, prompt_file: str) -> list[str]:
    """The recipe overrides that make student ``letter`` out of the study recipe (which is B)."""
    pp = "losses.perturbations"
    trajectories = [f"{pp}.trajectory.enabled=true", f"{pp}.trajectory.prompts=prompt_file",
                    f"{pp}.prompt_file.path={prompt_file}"]
    perturb = ["losses.perturb=1.0", f"{pp}.input_noise.enabled=true", f"{pp}.caption_mix.enabled=true",
               f"{pp}.prompt_file.enabled=true", f"{pp}.timestep_jitter.enabled=true", *trajectories]
    feature = ["losses.feature=0.5", "losses.features.student_blocks=[1]",
               "losses.features.teacher_modules=[mid_block]"]
    table = {
        "A": ["losses.teacher=0"],
        "B": [],
        "C": perturb,
        "D": ["losses.eps=0", "losses.teacher=0", "losses.perturb=1.0", *trajectories, *feature,
              f"{pp}.trajectory.align=true", f"{pp}.trajectory.swap_prompts=0.3"],
        "E": perturb + feature,
    }
    if letter not in table:
        raise ValueError(f"unknown student {letter!r}; choose from {', '.join(LETTERS)}")
    return table[letter]


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``key=value`` overrides for every student, and ``<LETTER>:key=value`` ones for one student
    only, applied after that student's own (an ablation of one student: ``C:losses.perturbations.
    caption_mix.enabled=false``)."""
    shared, per_letter = [], {}
    for item in overrides:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head and len(head) == 1 and head.isalpha():
            if head not in LETTERS:
                raise ValueError(f"override {item!r}: unknown student {head!r}; choose from {', '.join(LETTERS)}")
            per_letter.setdefault(head, []).append(rest)
        else:
            shared.append(item)
    return shared, per_letter


@dataclass
class StudyPlan:
    """What the study runs. ``overrides`` apply to every student's recipe (after the plan's own);
    ``<LETTER>:key=value`` ones to that student only, after its letter's (``split_overrides``)."""
    recipe: str = str(STUDY_RECIPE)
    letters: tuple = LETTERS
    seeds: tuple = (0, 1, 2)
    steps: int | None = None        # None: the recipe's training.max_steps
    eval_every: int | None = None   # None: the recipe's training.checkpoint_every
    eval_prompts: int = 24          # per prompt set (seen / held out), one sample each
    workers: int = 2                # processes; each gets cpu_count // workers torch threads
    overrides: list = field(default_factory=list)


# The smoke-test plan: a tiny student, a few steps, two prompts (seconds per run on a CPU).
QUICK_OVERRIDES = ["student.hidden_size=32", "student.depth=2", "student.num_heads=2", "training.batch_size=4",
                   "data.toy.num_images=24", "sampling.num_inference_steps=2",
                   "losses.perturbations.trajectory.num_steps=2", "losses.features.projector_hidden=16"]


def quick_plan(**kw: Any) -> StudyPlan:
    plan = StudyPlan(seeds=(0,), steps=2, eval_every=1, eval_prompts=2, workers=1, **kw)
    plan.overrides = QUICK_OVERRIDES + list(plan.overrides)
    return plan


# --------------------------------------------------------------------------- prompts

def write_prompt_file(path: Path, n: int = 2000) -> Path:
    """The text-only prompt list of C, D and E: captions from the whole world, held-out combos included."""
    from sitdistill.data.toy import ToyWorld

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ToyWorld().prompts(n, seed=PROMPT_FILE_SEED)
    path.write_text("# text-only prompts of the whole toy world (no images); `cli.py study` wrote this\n"
                    + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def eval_prompt_sets(held_out: Sequence[str], n: int) -> dict[str, list[str]]:
    """Toy captions for combinations seen in training and for held-out ones: each set draws its
    colour x shape pairs uniformly from its own combinations, with seeds the training data and the
    prompt list do not use."""
    from sitdistill.data.toy import ToyWorld, all_combos

    held = [tuple(c.split()) for c in held_out]
    seen_world = ToyWorld(exclude_combos=tuple(held))
    out = {"seen": seen_world.prompts(n, seed=EVAL_SEED)}
    if held:
        others = tuple(c for c in all_combos() if c not in held)
        out["held_out"] = ToyWorld(exclude_combos=others).prompts(n, seed=EVAL_SEED + 1)
    return out


# --------------------------------------------------------------------------- one training run (a worker)

def _threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _train_job(recipe_path: str, overrides: list[str], threads: int) -> dict:
    import torch

    from sitdistill.core.recipe import load_recipe
    from sitdistill.train.trainer import train

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    summary = train(load_recipe(recipe_path, overrides))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _finished(run_dir: Path, steps: int) -> bool:
    f = run_dir / "summary.json"
    return f.is_file() and json.loads(f.read_text()).get("steps") == steps


# --------------------------------------------------------------------------- evaluation of one seed (a worker)

def _metrics_of(m: dict, letters: Sequence[str]) -> dict:
    """The study's three numbers per student (and the teacher's fidelity) from one eval report."""
    def fidelity(rates: dict) -> dict[str, float]:
        # The mean of the three attribute rates: "all three right" alone is too coarse for a small
        # teacher (it multiplies the misses), so it is kept beside, as are the three rates.
        out = {f"fidelity_{f}": rates[f] for f in ATTRIBUTES}
        return {"fidelity": float(np.mean([rates[f] for f in ATTRIBUTES])), "fidelity_all": rates["all"], **out}

    out: dict[str, dict[str, float]] = {}
    for k in letters:
        out[k] = {"noise_mse": m["noise_mse_mean"][k], "latent_mse": m["paired"][k]["latent_mse"]["mean"]}
        if m.get("fidelity"):
            out[k].update(fidelity(m["fidelity"][k]))
    if m.get("fidelity"):
        out["teacher"] = fidelity(m["fidelity"]["teacher"])
    return out


_PROCESS_TEACHERS: dict[str, tuple[Any, dict]] = {}  # teacher source -> (teacher, its samples), per process


def _eval_job(out: str, seed: int, letters: Sequence[str], steps: Sequence[int], prompt_sets: dict[str, list[str]],
              threads: int) -> dict:
    """Every checkpoint of one seed's students, on every prompt set -> {step: {set: metrics}}."""
    import torch

    from sitdistill.evaluation.evaluate import evaluate, settings_from_recipe
    from sitdistill.apps.export import load_teacher_for, load_student, resolve_checkpoint

    torch.set_num_threads(threads)
    out_dir = Path(out)
    results: dict[str, Any] = {}
    for step in steps:
        for name, prompts in prompt_sets.items():
            report = out_dir / "eval" / f"seed{seed}" / f"step{step:06d}" / name
            done = report / "metrics.json"
            if done.is_file():
                m = json.loads(done.read_text())
            else:
                sources = {k: resolve_checkpoint(out_dir / "runs" / f"seed{seed}" / k / f"checkpoint-{step}")
                           for k in letters}
                recipe = sources[letters[0]].recipe
                source = str(recipe.teacher.source)
                if source not in _PROCESS_TEACHERS:  # once per process: later jobs here reuse it
                    _PROCESS_TEACHERS[source] = (load_teacher_for(sources[letters[0]], "cpu"), {})
                # The teacher's samples of a prompt set are the same at every step: sampled once.
                teacher, teacher_samples = _PROCESS_TEACHERS[source]
                students = {k: load_student(s, weights="ema", teacher=teacher) for k, s in sources.items()}
                st = settings_from_recipe(recipe, seeds=[seed], prompt_source=f"study, {name} combinations")
                m = evaluate(teacher, students, prompts, st, report,
                             labels={k: f"{k}: {DESCRIPTIONS[k]}" for k in letters},
                             held_out_combos=list(recipe.data.toy.exclude_combos), teacher_samples=teacher_samples)
            results.setdefault(str(step), {})[name] = _metrics_of(m, letters)
    return results


# --------------------------------------------------------------------------- the study

# Relative cost of one training step of each student (recipes/study.yaml, one CPU thread): the
# longest runs start first, so that the last ones do not leave a process idle.
STEP_COST = {"A": 1.0, "B": 1.5, "C": 5.1, "D": 2.6, "E": 5.2}


def _run_jobs(train: list[tuple[int, str, tuple]], evals: dict[int, list[tuple]], workers: int) -> tuple[dict, dict]:
    """Training jobs ``(seed, name, args)`` and each seed's evaluation jobs -> (summaries by name,
    {seed: {step: metrics}}). In ``workers`` processes (in this one when workers == 1), a seed's
    evaluations are queued as soon as its students are trained, so they fill the processes that the
    last training runs leave idle."""
    summaries: dict[str, dict] = {}
    results: dict[int, dict] = {seed: {} for seed in evals}
    if workers <= 1:
        for _, name, args in train:
            summaries[name] = _train_job(*args)
        for seed, jobs in evals.items():
            for args in jobs:
                results[seed].update(_eval_job(*args))
        return summaries, results
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending: dict[Future, tuple[str, int, str | None]] = {}
        left = {seed: 0 for seed in evals}

        def queue_evals(seed: int) -> None:
            for args in evals[seed]:
                pending[pool.submit(_eval_job, *args)] = ("eval", seed, None)

        for seed, name, args in train:
            pending[pool.submit(_train_job, *args)] = ("train", seed, name)
            left[seed] += 1
        for seed in evals:
            if left[seed] == 0:
                queue_evals(seed)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, seed, name = pending.pop(future)
                value = future.result()  # a failed job stops the study with its own error
                if kind == "eval":
                    results[seed].update(value)
                    continue
                summaries[name] = value
                left[seed] -= 1
                if left[seed] == 0:
                    queue_evals(seed)
    return summaries, results


def run_study(out: str | Path, plan: StudyPlan, log=print) -> dict:
    """Train, evaluate, summarise; returns the results (also in ``results.json``)."""
    from sitdistill.train.build import resolve_teacher_source
    from sitdistill.core.checkpoint import checkpoint_step, find_latest
    from sitdistill.core.recipe import load_recipe, save_recipe

    out = Path(out).resolve()
    # Every recipe problem, a per-student override's included, fails here, before anything is written.
    shared, per_letter = split_overrides(list(plan.overrides))
    base = load_recipe(plan.recipe, shared)
    for k, extra in per_letter.items():
        load_recipe(plan.recipe, shared + letter_overrides(k, str(out / PROMPT_FILE)) + extra)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    prompt_file = write_prompt_file(out / PROMPT_FILE)
    steps = int(base.training.max_steps if plan.steps is None else plan.steps)
    every = int(base.training.checkpoint_every if plan.eval_every is None else plan.eval_every)
    if steps < 1 or every < 1:
        raise ValueError(f"the study needs at least 1 step and an evaluation every >= 1 steps (got {steps}, {every})")
    eval_steps = sorted({*range(every, steps + 1, every), steps})
    # The toy teacher is built here, once, before any worker starts (workers would race to build it).
    teacher_source = resolve_teacher_source(str(base.teacher.source))
    common = shared + [
        f"teacher.source={teacher_source}", f"training.max_steps={steps}", f"training.checkpoint_every={every}",
        f"training.keep_checkpoints={len(eval_steps) + 1}", "training.sample_every=0",
        f"data.cache_dir={out / '.cache'}"]
    save_recipe(load_recipe(plan.recipe, common), out / "study_recipe.yaml")
    held_out = list(base.data.toy.exclude_combos)
    log(f"study: students {', '.join(plan.letters)}; seeds {list(plan.seeds)}; {steps} steps, "
        f"evaluated at {eval_steps}; {base.data.toy.num_images} images, held out: {', '.join(held_out) or 'none'}")

    threads = _threads(plan.workers)
    train = []
    for seed in plan.seeds:
        for k in plan.letters:
            run_dir = out / "runs" / f"seed{seed}" / k
            if _finished(run_dir, steps):
                continue
            latest = find_latest(run_dir)
            if latest is not None and checkpoint_step(latest) > steps:
                raise ValueError(f"{run_dir} already went past {steps} steps ({latest.name}): this study folder "
                                 "belongs to a longer study; choose another --out")
            ov = common + letter_overrides(k, str(prompt_file)) + per_letter.get(k, []) + [
                f"training.seed={seed}", f"output.dir={run_dir}", f"name=study-{k}-seed{seed}", "training.resume=latest"]
            train.append((seed, f"seed {seed} {k}", (plan.recipe, ov, threads)))
    train.sort(key=lambda job: -STEP_COST.get(job[1][-1], 1.0))  # longest first (stable: seeds stay in order)
    if train:
        log(f"training {len(train)} students in {plan.workers} process(es) of {threads} thread(s): "
            f"{', '.join(name for _, name, _ in train)}")
    sets = eval_prompt_sets(held_out, plan.eval_prompts)
    evals = {seed: [(str(out), seed, list(plan.letters), [step], sets, threads) for step in eval_steps]
             for seed in plan.seeds}
    summaries, per_seed = _run_jobs(train, evals, plan.workers)
    for name, s in summaries.items():
        log(f"  {name}: {s['steps']} steps in {s['seconds']} s")
    results = {"plan": {**asdict(plan), "steps": steps, "eval_steps": eval_steps, "held_out": held_out,
                        "num_images": int(base.data.toy.num_images), "teacher": teacher_source,
                        "descriptions": DESCRIPTIONS},
               "by_seed": {str(s): dict(sorted(per_seed[s].items(), key=lambda kv: int(kv[0]))) for s in plan.seeds}}
    results["summary"] = summarise(results)
    results["claims"] = check_claims(results)
    results["seconds"] = {"training_runs": round(sum(s["seconds"] for s in summaries.values()), 1),
                          "total": round(time.perf_counter() - t_start, 1), "workers": plan.workers}
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out / "results.md").write_text(render_results(results), encoding="utf-8")
    plot_study(results).save(out / "study.png")
    log(render_table(results))
    log(f"study written to {out} (results.md, results.json, study.png) in {results['seconds']['total']:.0f} s")
    return results


__all__ = ["StudyPlan", "quick_plan", "run_study", "letter_overrides", "split_overrides", "eval_prompt_sets", "LETTERS", "DESCRIPTIONS"]
