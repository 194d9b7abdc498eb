"""`cli.py handoff`: at which noise levels does the student lose what its teacher draws?

One sampling run hands the denoiser over from one model to the other at a timestep: "the student
for t >= 400, the teacher below" samples with the student while the noise is high and lets the
teacher finish. Graded by the toy grader beside each model alone (same prompts, seeds, sampler and
guidance), the rows show which half of the trajectory costs the student its colour, shape or
position: if the student-then-teacher row draws as well as the teacher, the student's high-noise
steps are sound and what is missing is decided below the handoff.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from sitdistill.infer.sampling import Denoiser, prediction_type_of

RATES = ("colour", "shape", "position", "all")


def handoff(high: Denoiser, low: Denoiser, at: int) -> Denoiser:
    """A denoiser that runs ``high`` at timesteps >= ``at`` and ``low`` below. The sampler converts
    one prediction type for the whole trajectory, so both models must predict the same type."""
    kind = prediction_type_of(high)
    if prediction_type_of(low) != kind:
        raise ValueError(f"handoff between a {kind} and a {prediction_type_of(low)} model")

    def fn(x, t, cond):
        return (high if float(t.flatten()[0]) >= at else low)(x, t, cond)

    return Denoiser(fn, kind)


def rows(at: Sequence[int]) -> list[tuple[str, str, str, int | None]]:
    """(label, model above, model below, timestep) of every row, the two models alone first."""
    out = [("the teacher throughout", "teacher", "teacher", None), ("the student throughout", "student", "student", None)]
    for t in sorted(at, reverse=True):
        out.append((f"the student for t >= {t}, the teacher below", "student", "teacher", t))
    for t in sorted(at, reverse=True):
        out.append((f"the teacher for t >= {t}, the student below", "teacher", "student", t))
    return out


def handoff_rates(recipe, teacher, student: Denoiser, prompts: Sequence[str], at: Sequence[int]) -> dict[str, dict]:
    """Toy-grader rates of every row of ``rows(at)`` with the recipe's sampler:
    {label: {colour, shape, position, all, n}}."""
    from sitdistill.evaluation.evaluate import recipe_toy_fidelity
    from sitdistill.infer.sampling import teacher_denoiser

    models = {"teacher": teacher_denoiser(teacher), "student": student}
    fns = {label: models[hi] if t is None else handoff(models[hi], models[lo], t) for label, hi, lo, t in rows(at)}
    graded = recipe_toy_fidelity(recipe, teacher, fns, prompts)
    return {label: {k: graded[label][k] for k in (*RATES, "n")} for label in fns}


def render(rates: dict[str, dict], sampler: str) -> str:
    lines = [f"Toy-grader rates, {next(iter(rates.values()))['n']} held-out prompts, {sampler}.", "",
             "| who denoises | colour | shape | position | all three |", "|---|---|---|---|---|"]
    lines += [f"| {label} | " + " | ".join(f"{r[k]:.2f}" for k in RATES) + " |" for label, r in rates.items()]
    return "\n".join(lines) + "\n"


def run_handoff(checkpoint: str, out: str | Path | None, at: Sequence[int], num_prompts: int,
                weights: str = "ema", log=print) -> dict[str, Any]:
    """Load a toy-world checkpoint and its teacher, grade every row, print the table and (with
    ``out``) write handoff.md and handoff.json."""
    from sitdistill.evaluation.evaluate import toy_prompts
    from sitdistill.apps.export import load_student, load_teacher_for, resolve_checkpoint
    from sitdistill.infer.samples import student_fn

    source = resolve_checkpoint(checkpoint)
    if source.recipe.data.root is not None:
        raise ValueError("handoff grades with the toy grader: the checkpoint's recipe must train on the toy world")
    teacher = load_teacher_for(source)
    student = student_fn(load_student(source, weights=weights))
    rates = handoff_rates(source.recipe, teacher, student, toy_prompts(source.recipe, num_prompts), at)
    s = source.recipe.sampling
    sampler = f"{s.scheduler}, {s.num_inference_steps} steps, guidance {s.guidance_scale}"
    table = render(rates, sampler)
    log(table)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "handoff.md").write_text(table)
        (out / "handoff.json").write_text(json.dumps({"checkpoint": str(checkpoint), "sampler": sampler,
                                                      "rates": rates}, indent=2))
    return rates
