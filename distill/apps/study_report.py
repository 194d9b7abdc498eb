"""The study's results read back: mean +- std over seeds, the claims checked against that spread,
the table, `results.md` and the plot (`sitdistill.apps.study` runs the students and writes them)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# The vocabulary of the results: the students' descriptions, prompt sets, attributes and metrics.
DESCRIPTIONS = {
    "A": "eps only (no teacher)",
    "B": "eps + teacher",
    "C": "eps + teacher + perturbation",
    "D": "teacher trajectories only, aligned, prompts swapped (data-free)",
    "E": "C + feature alignment",
}
SETS = ("seen", "held_out")
D_FRACTION = 0.6  # the data-free student's goal: this fraction of the teacher's prompt fidelity
D_CLAIM = f"D (no images) reaches {D_FRACTION:.1f}x the teacher's prompt fidelity"
ATTRIBUTES = ("colour", "shape", "position")
METRICS = {  # name in results -> (label, lower is better)
    "noise_mse": ("eps MSE to teacher", True),
    "latent_mse": ("sample latent MSE to teacher", True),
    "fidelity": ("prompt fidelity", False),  # the grader's colour, shape and position rates, averaged
}


def _values(results: dict, step: int | str, name: str, who: str, metric: str) -> list[float]:
    vals = []
    for r in results["by_seed"].values():
        v = r.get(str(step), {}).get(name, {}).get(who, {}).get(metric)
        if v is not None and math.isfinite(v):
            vals.append(float(v))
    return vals


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; nan for none)."""
    if not values:
        return float("nan"), float("nan")
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarise(results: dict) -> dict:
    """{set: {step: {letter|teacher: {metric: [mean, std]}}}} over seeds."""
    plan = results["plan"]
    names = {n for r in results["by_seed"].values() for by_set in r.values() for n in by_set}
    out: dict = {}
    for name in [s for s in SETS if s in names]:
        for step in plan["eval_steps"]:
            cell = out.setdefault(name, {}).setdefault(str(step), {})
            for who in list(plan["letters"]) + ["teacher"]:
                metrics = {}
                for metric in list(METRICS) + ["fidelity_all"] + [f"fidelity_{f}" for f in ATTRIBUTES]:
                    vals = _values(results, step, name, who, metric)
                    if vals:
                        metrics[metric] = list(mean_std(vals))
                if metrics:
                    cell[who] = metrics
    return out


def _final(results: dict, name: str, who: str, metric: str) -> float | None:
    step = str(results["plan"]["eval_steps"][-1])
    v = results["summary"].get(name, {}).get(step, {}).get(who, {}).get(metric)
    return None if v is None else v[0]


def _spread_note(results: dict, name: str, x: str, y: str, metric: str) -> str:
    """", within the seeds' spread" when the two means differ by less than the larger standard
    deviation (a difference the seeds do not separate), else ""."""
    step = str(results["plan"]["eval_steps"][-1])
    cell = results["summary"].get(name, {}).get(step, {})
    vx, vy = cell.get(x, {}).get(metric), cell.get(y, {}).get(metric)
    if not vx or not vy or len(results["by_seed"]) < 2:
        return ""
    return ", within the seeds' spread" if abs(vx[0] - vy[0]) < max(vx[1], vy[1]) else ""


def _better(a: float, b: float, lower: bool) -> bool:
    return a < b if lower else a > b


def check_claims(results: dict) -> list[dict]:
    """The study's expected results, each marked holds / does not hold from the final-step means."""
    letters = results["plan"]["letters"]
    claims = []

    def add(text: str, holds: bool | None, detail: str) -> None:
        claims.append({"claim": text, "holds": holds, "detail": detail})

    def compare(new: str, old: str, sets: Sequence[str], claim: str) -> None:
        """``new`` better than ``old`` on every metric of every set in ``sets``, final-step means."""
        parts, ok = [], True
        for name in sets:
            for metric, (label, lower) in METRICS.items():
                a, b = _final(results, name, old, metric), _final(results, name, new, metric)
                if a is None or b is None:
                    continue
                win = _better(b, a, lower)
                ok &= win
                where = f"{name} " if len(sets) > 1 else ""
                parts.append(f"{where}{label}: {new} {b:.4g} vs {old} {a:.4g} ({new} {'better' if win else 'not better'}"
                             f"{_spread_note(results, name, old, new, metric)})")
        add(claim, ok if parts else None, "; ".join(parts))

    if "A" in letters and "B" in letters:
        compare("B", "A", SETS, "B (eps + teacher) is better than A (eps only) on every metric")
    if "B" in letters and "C" in letters:
        compare("C", "B", ["held_out"], "C (+ perturbation) is better than B on held-out combinations")
    if "D" in letters:
        d, t = _final(results, "seen", "D", "fidelity"), _final(results, "seen", "teacher", "fidelity")
        dh, th = _final(results, "held_out", "D", "fidelity"), _final(results, "held_out", "teacher", "fidelity")
        if d is not None and t:
            frac = d / t
            held = f"; held out: {dh:.3g} vs {th:.3g}" if dh is not None and th else ""
            add(D_CLAIM, bool(frac >= D_FRACTION),
                f"seen combinations: D {d:.3g} vs teacher {t:.3g} = {100 * frac:.0f} %{held}")
        else:
            add(D_CLAIM, None,
                "the teacher's fidelity is zero or missing: no fraction to take")
    return claims


def _fmt(v: list | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    m, s = v
    return f"{m:.{digits}g} ± {s:.{digits - 1}g}" if math.isfinite(m) else "—"


def render_table(results: dict) -> str:
    """Final-step table: one row per student (and the teacher's fidelity), mean ± std over seeds."""
    step = str(results["plan"]["eval_steps"][-1])
    names = [n for n in SETS if n in results["summary"]]
    head = ["student"] + [f"{METRICS[m][0]} ({n.replace('_', '-')})" for m in METRICS for n in names]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for who in list(results["plan"]["letters"]) + ["teacher"]:
        label = f"{who}: {DESCRIPTIONS[who]}" if who in DESCRIPTIONS else "teacher"
        cells = [label]
        for m in METRICS:
            for n in names:
                cells.append(_fmt(results["summary"][n].get(step, {}).get(who, {}).get(m)))
        rows.append("| " + " | ".join(cells) + " |")
    n_seeds = len(results["by_seed"])
    return (f"After {step} steps; mean ± standard deviation over {n_seeds} seed(s); lower is better for the MSEs, "
            f"higher for fidelity.\n\n" + "\n".join(rows))


def render_results(results: dict) -> str:
    p = results["plan"]
    lines = ["# Toy-world study: does the teacher help?", "",
             f"Teacher: `{p['teacher']}`. Students see {p['num_images']} images; held-out combinations "
             f"(no image in training): {', '.join(p['held_out']) or 'none'}. Every student: {p['steps']} steps, "
             f"seeds {p['seeds']}.", "", render_table(results), "", "## The expected results", ""]
    for c in results["claims"]:
        mark = {True: "holds", False: "does not hold", None: "not measured"}[c["holds"]]
        lines.append(f"- **{c['claim']}: {mark}.** {c['detail']}")
    step = str(p["eval_steps"][-1])
    names = [s for s in SETS if s in results["summary"]]
    lines += ["", "Prompt fidelity is the mean of the grader's three rates; by attribute, and all three right "
              "at once, final step (mean over seeds):", "",
              "| student | " + " | ".join(f"{n.replace('_', '-')}: colour / shape / position / all" for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for who in list(p["letters"]) + ["teacher"]:
        cells = []
        for n in names:
            cell = results["summary"][n].get(step, {}).get(who, {})
            keys = [f"fidelity_{f}" for f in ATTRIBUTES] + ["fidelity_all"]
            cells.append(" / ".join(f"{cell[k][0]:.2f}" for k in keys) if all(k in cell for k in keys) else "—")
        lines.append(f"| {who} | " + " | ".join(cells) + " |")
    lines += ["", f"Time: {results['seconds']}", "", "![metric vs step](study.png)", ""]
    return "\n".join(lines)


LETTER_COLOURS = {"A": (214, 39, 40), "B": (31, 119, 180), "C": (44, 160, 44), "D": (148, 103, 189),
                  "E": (255, 127, 14), "teacher": (40, 40, 40)}


def plot_study(results: dict):
    """A grid of line charts: rows = prompt sets, columns = metrics; x = training step; one line per student."""
    from PIL import Image

    from sitdistill.evaluation.metrics import line_plot

    p = results["plan"]
    names = [n for n in SETS if n in results["summary"]]
    panels = []
    for n in names:
        row = []
        for m, (label, _) in METRICS.items():
            series = {}
            for who in list(p["letters"]) + (["teacher"] if m == "fidelity" else []):
                ys = [results["summary"][n].get(str(s), {}).get(who, {}).get(m, [float("nan")])[0]
                      for s in p["eval_steps"]]
                if any(math.isfinite(y) for y in ys):
                    series[who] = ys
            row.append(line_plot(p["eval_steps"], series, title=f"{n.replace('_', '-')}: {label}",
                                 xlabel="training step", ylabel="mean over seeds", colours=LETTER_COLOURS,
                                 size=(440, 300)))
        panels.append(row)
    w, h = panels[0][0].size
    out = Image.new("RGB", (w * len(METRICS), h * len(panels)), "white")
    for i, row in enumerate(panels):
        for j, im in enumerate(row):
            out.paste(im, (j * w, i * h))
    return out


__all__ = ["summarise", "check_claims", "render_table", "render_results", "plot_study", "mean_std"]
