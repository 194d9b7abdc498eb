"""`cli.py curve`: prompt fidelity against training step, with and without the teacher.

The SDiT headline as a number. Three students of one recipe (`recipes/toy.yaml` by default), the
same initialisation, data order and budget; only the loss differs:

  A  no teacher: the data noise loss alone
  B  the teacher: the teacher's prediction on the same noisy latent as the target (no data term)
  E  B + feature alignment to the teacher UNet's features (the recipe's `losses.features`)

Every checkpoint's EMA student is graded by the toy grader on held-out prompts, with the recipe's
sampler, guidance and seeds, beside the teacher on the same prompts. Optionally (`teacher_curve`)
the toy teacher is built once more with snapshots of its EMA weights, so that its own training from
data is on the plot as the reference (its steps are UNet steps at its own batch size).

From the curves: the step at which each student first reaches 0.5x and 0.8x of the teacher's
all-three rate (linear between evaluations), and how many times fewer steps the teacher's students
need than A. Output: ``curve.json``, ``curve.md`` and ``curve.png``; finished runs and gradings are
reused when the command is run again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

ARMS = {
    "A": "no teacher (data noise loss)",
    "B": "the teacher (its prediction as the target)",
    "E": "the teacher + feature alignment",
}
FRACTIONS = (0.5, 0.8)
LABELS = {"A": "A: no teacher", "B": "B: teacher", "E": "E: + align", "teacher": "teacher (own)"}  # the legend fits 14
COLOURS = {"A": (200, 60, 60), "B": (40, 110, 200), "E": (30, 150, 70), "teacher": (90, 90, 90)}


def arm_overrides(arm: str, recipe) -> list[str]:
    """Recipe overrides that make student ``arm`` out of ``recipe`` (whatever its own losses are)."""
    lo = recipe.losses
    if arm == "A":
        return ["losses.eps=1.0", "losses.teacher=0", "losses.feature=0", "losses.perturb=0"]
    if arm == "B":
        return ["losses.eps=0", "losses.teacher=1.0", "losses.feature=0", "losses.perturb=0"]
    if arm == "E":
        if not lo.features.student_blocks or not lo.features.teacher_modules:
            raise ValueError("student E needs losses.features.student_blocks and teacher_modules in the recipe")
        return ["losses.eps=0", "losses.teacher=1.0", f"losses.feature={lo.feature or 0.5}", "losses.perturb=0"]
    raise ValueError(f"unknown student {arm!r}; choose from {', '.join(ARMS)}")


@dataclass
class CurvePlan:
    recipe: str = str(Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml")
    arms: tuple = tuple(ARMS)
    steps: int | None = None     # None: the recipe's training.max_steps
    every: int = 250             # evaluate a checkpoint every this many steps
    prompts: int = 64            # held-out prompts graded per evaluation
    teacher_curve: bool = False  # rebuild the toy teacher with snapshots (minutes)
    teacher_snapshots: tuple = (500, 1000, 2000, 3000)
    teacher_settings: dict = field(default_factory=dict)  # ToyTeacherSettings fields of that rebuild
    overrides: list = field(default_factory=list)


def _rates(rates: dict) -> dict:
    return {k: rates[k] for k in ("colour", "shape", "position", "all")}


def first_reach(steps: Sequence[int], values: Sequence[float], level: float) -> float | None:
    """The first step at which ``values`` reach ``level``, linear between evaluations (from 0 at step 0)."""
    prev_s, prev_v = 0, 0.0
    for s, v in zip(steps, values):
        if v >= level:
            if v == prev_v:
                return float(s)
            return prev_s + (s - prev_s) * (level - prev_v) / (v - prev_v) if level > prev_v else float(prev_s)
        prev_s, prev_v = s, v
    return None


def _save(out: Path, results: dict) -> None:
    tmp = out / "curve.json.tmp"
    tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    tmp.replace(out / "curve.json")


def run_curve(out: str | Path, plan: CurvePlan, log=print) -> dict[str, Any]:
    from sitdistill.core import checkpoint as ckpt
    from sitdistill.train.build import load_teacher_from_recipe, resolve_teacher_source
    from sitdistill.evaluation.evaluate import recipe_toy_fidelity, toy_prompts
    from sitdistill.apps.export import load_student, resolve_checkpoint
    from sitdistill.core.recipe import load_recipe
    from sitdistill.infer.samples import student_fn
    from sitdistill.infer.sampling import teacher_denoiser
    from sitdistill.train.trainer import train

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = load_recipe(plan.recipe, list(plan.overrides))
    if base.data.root is not None:
        raise ValueError("the curve grades toy-world prompts: its recipe must train on the toy world (data.root: null)")
    steps = int(base.training.max_steps if plan.steps is None else plan.steps)
    if steps < 1 or plan.every < 1:
        raise ValueError(f"the curve needs at least 1 step and an evaluation every >= 1 steps (got {steps}, {plan.every})")
    source = str(base.teacher.source)
    snapshots: dict[int, Path] = {}
    if plan.teacher_curve:  # the rebuilt teacher (the cached one, for default settings) teaches too
        teacher_dir, snapshots, teacher_batch = build_with_snapshots(out, source, plan, log)
    else:
        teacher_dir = resolve_teacher_source(source)
    common = list(plan.overrides) + [
        f"teacher.source={teacher_dir}", f"training.max_steps={steps}", f"training.checkpoint_every={plan.every}",
        f"training.keep_checkpoints={steps // plan.every + 2}", "training.sample_every=0", "evaluation.at_end=0"]
    results: dict[str, Any] = {"plan": {**asdict(plan), "steps": steps, "teacher": source, "descriptions": ARMS},
                               "students": {}}
    previous = json.loads((out / "curve.json").read_text()) if (out / "curve.json").is_file() else {}
    if all(previous.get("plan", {}).get(k) == results["plan"][k] for k in ("recipe", "prompts", "every", "overrides",
                                                                          "teacher")):
        # The same plan's gradings are reused; another plan's are not.
        results.update({k: previous[k] for k in ("students", "teacher", "teacher_curve") if k in previous})
    prompts = toy_prompts(base, plan.prompts)
    teacher = load_teacher_from_recipe(load_recipe(plan.recipe, common).teacher)
    if "teacher" not in results:
        results["teacher"] = _rates(recipe_toy_fidelity(base, teacher, {"teacher": teacher_denoiser(teacher)}, prompts)["teacher"])
        _save(out, results)
    log(f"teacher: all three right {results['teacher']['all']:.2f} on {plan.prompts} held-out prompts")

    for arm in plan.arms:
        run_dir = out / "runs" / arm
        recipe = load_recipe(plan.recipe, common + arm_overrides(arm, base) + [
            f"output.dir={run_dir}", f"name=curve-{arm}", "training.resume=latest"])
        latest = ckpt.find_latest(run_dir)
        if latest is None or ckpt.checkpoint_step(latest) < steps:
            log(f"student {arm} ({ARMS[arm]}): training {steps} steps")
            t0 = time.perf_counter()
            train(recipe)
            results.setdefault("seconds", {})[arm] = round(time.perf_counter() - t0, 1)
        graded = results["students"].setdefault(arm, {})
        for folder in ckpt.list_checkpoints(run_dir):
            step = str(ckpt.checkpoint_step(folder))
            if step in graded:
                continue
            student = load_student(resolve_checkpoint(folder), weights="ema")
            graded[step] = _rates(recipe_toy_fidelity(base, teacher, {arm: student_fn(student)}, prompts)[arm])
            log(f"student {arm} step {step}: all three {graded[step]['all']:.2f} "
                f"(colour {graded[step]['colour']:.2f}, shape {graded[step]['shape']:.2f}, "
                f"position {graded[step]['position']:.2f})")
            _save(out, results)

    if plan.teacher_curve:
        done = results.setdefault("teacher_curve", {"batch_size": teacher_batch})
        for step, folder in snapshots.items():
            if str(folder) == str(teacher_dir):  # the final build is the students' teacher: graded above
                done[str(step)] = results["teacher"]
            if str(step) not in done:
                snap = load_teacher_from_recipe(load_recipe(plan.recipe, common + [f"teacher.source={folder}"]).teacher)
                done[str(step)] = _rates(recipe_toy_fidelity(base, snap, {"teacher": teacher_denoiser(snap)}, prompts)["teacher"])
                log(f"the teacher's own training, step {step}: all three {done[str(step)]['all']:.2f}")
            _save(out, results)
    results["reach"] = reach_table(results)
    results["seconds_total"] = round(time.perf_counter() - t_start, 1)
    _save(out, results)
    (out / "curve.md").write_text(render(results), encoding="utf-8")
    plot(results).save(out / "curve.png")
    log(render(results))
    return results


def build_with_snapshots(out: Path, source: str, plan: CurvePlan, log=print) -> tuple[str, dict[int, Path], int]:
    """Build the toy teacher of ``source`` again into ``out``, saving its EMA weights at
    ``plan.teacher_snapshots``: (the final folder, {step: folder} with the final build's step too,
    the build's batch size)."""
    from sitdistill.train.build import TOY_PREFIX
    from sitdistill.teachers.toy import ToyTeacherSettings, build_toy_teacher, default_cache_root, is_finished

    if not source.startswith(TOY_PREFIX):
        raise ValueError(f"the teacher's own curve needs a toy teacher (toy:sd15 or toy:sdxl), not {source!r}")
    settings = ToyTeacherSettings(family=source[len(TOY_PREFIX):], **plan.teacher_settings)
    snaps = sorted(int(s) for s in plan.teacher_snapshots if 0 < int(s) < settings.unet_steps)
    final, snap_dir = out / "teacher-build", out / "teacher-snapshots"
    folders = {s: snap_dir / f"step-{s}" for s in snaps}
    if not is_finished(final) or not all(is_finished(f) for f in folders.values()):
        log(f"building the toy teacher again, with snapshots at {snaps} (its own training curve)")
        build_toy_teacher(final, settings, cache_dir=default_cache_root(), snapshots=snaps, snapshot_dir=snap_dir)
    return str(final), {**folders, settings.unet_steps: final}, settings.batch_size


def _series(graded: dict) -> tuple[list[int], list[float]]:
    steps = sorted(int(s) for s in graded if s.isdigit())
    return steps, [graded[str(s)]["all"] for s in steps]


def reach_table(results: dict) -> dict:
    """Steps to 0.5x / 0.8x of the teacher's all-three rate, per student, and the speed-up over A."""
    target = results["teacher"]["all"]
    table: dict[str, dict] = {}
    curves = dict(results["students"])
    if "teacher_curve" in results:
        curves["teacher (own training)"] = results["teacher_curve"]
    for who, graded in curves.items():
        steps, values = _series(graded)
        table[who] = {str(f): first_reach(steps, values, f * target) for f in FRACTIONS}
    a_budget = max(_series(results["students"]["A"])[0], default=None) if "A" in results["students"] else None
    for who in table:
        for f in FRACTIONS:
            a, w = table.get("A", {}).get(str(f)), table[who][str(f)]
            if who not in ARMS:  # the teacher's own steps are at another batch: not comparable
                a = w = None
            table[who][f"{f}_fewer_steps_than_A"] = (a / w) if a and w else None
            # A never got there within its budget: the speed-up is at least budget / steps.
            table[who][f"{f}_fewer_steps_than_A_at_least"] = (a_budget / w) if (a is None and w and a_budget) else None
    return table


def _fmt_fewer(r: dict, f: float) -> str:
    if r[f"{f}_fewer_steps_than_A"] is not None:
        return f"{r[f'{f}_fewer_steps_than_A']:.1f}x"
    at_least = r.get(f"{f}_fewer_steps_than_A_at_least")
    return "—" if at_least is None else f"more than {at_least:.1f}x (A never got there)"


def _fmt_steps(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.0f}"


def render(results: dict) -> str:
    p, t = results["plan"], results["teacher"]
    lines = [f"# Prompt fidelity against training step ({p['prompts']} held-out prompts; teacher {p['teacher']})", "",
             f"Teacher: colour {t['colour']:.2f}, shape {t['shape']:.2f}, position {t['position']:.2f}, "
             f"all three {t['all']:.2f}.", "",
             "| student | step | colour | shape | position | all three | / teacher |", "|---|---|---|---|---|---|---|"]
    curves = dict(results["students"])
    if "teacher_curve" in results:
        curves["teacher (own training)"] = results["teacher_curve"]
    for who, graded in curves.items():
        for s in sorted(int(k) for k in graded if k.isdigit()):
            r = graded[str(s)]
            ratio = r["all"] / t["all"] if t["all"] else float("nan")
            lines.append(f"| {who} | {s} | {r['colour']:.2f} | {r['shape']:.2f} | {r['position']:.2f} | "
                         f"{r['all']:.2f} | {ratio:.2f} |")
    lines += ["", "| student | steps to 0.5x teacher | steps to 0.8x teacher | fewer steps than A (0.5x / 0.8x) |",
              "|---|---|---|---|"]
    for who, r in results.get("reach", {}).items():
        fewer = " / ".join(_fmt_fewer(r, f) for f in FRACTIONS)
        lines.append(f"| {who} | {_fmt_steps(r['0.5'])} | {_fmt_steps(r['0.8'])} | {fewer} |")
    if "teacher_curve" in results:
        lines.append(f"\nThe teacher's own steps are UNet steps at batch {results['teacher_curve']['batch_size']}, "
                     "the students' at the recipe's batch.")
    return "\n".join(lines) + "\n"


def plot(results: dict):
    from sitdistill.evaluation.metrics import line_plot

    curves = dict(results["students"])
    if "teacher_curve" in results:
        curves["teacher"] = results["teacher_curve"]
    xs = [0] + sorted({int(s) for g in curves.values() for s in g if s.isdigit()})  # the axis starts at 0
    series = {LABELS.get(who, who): [g[str(x)]["all"] if str(x) in g else float("nan") for x in xs]
              for who, g in curves.items()}
    colours = {LABELS[k]: v for k, v in COLOURS.items()}
    target = results["teacher"]["all"]
    for f, grey in zip(FRACTIONS, (200, 150)):
        name = f"{f}x teacher"
        series[name] = [f * target] + [float("nan")] * (len(xs) - 2) + [f * target]  # a level line
        colours[name] = (grey, grey, grey)
    return line_plot(xs, series, title="colour, shape and position all right (held-out prompts)",
                     xlabel="training step", ylabel="rate", colours=colours, size=(640, 380))


__all__ = ["ARMS", "CurvePlan", "run_curve", "arm_overrides", "first_reach", "reach_table", "render", "plot"]
