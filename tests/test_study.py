"""The toy-world study (`cli.py study`): students A-E, their recipes, the claims check, a quick run."""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from sitdistill.data.pipeline import needs_images
from sitdistill.data.toy import parse_caption
from sitdistill.apps import study, study_report
from sitdistill.core.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
HELD = ["red circle", "green square", "blue triangle", "yellow diamond"]


@pytest.mark.parametrize("letter", study.LETTERS)
def test_every_student_recipe_resolves_and_differs_only_in_its_losses(letter, tmp_path):
    prompts = study.write_prompt_file(tmp_path / "p.txt", n=50)
    base = load_recipe(study.STUDY_RECIPE)
    r = load_recipe(study.STUDY_RECIPE, study.letter_overrides(letter, str(prompts)))
    lo = r.losses
    # Same data, student, optimizer and budget as every other letter.
    for section in ("data", "student", "optimizer", "training", "sampling"):
        assert r[section] == base[section], section
    assert list(r.data.toy.exclude_combos) == HELD
    expected = {"A": (1.0, 0.0, 0.0, 0.0), "B": (1.0, 1.0, 0.0, 0.0), "C": (1.0, 1.0, 1.0, 0.0),
                "D": (0.0, 0.0, 1.0, 0.5), "E": (1.0, 1.0, 1.0, 0.5)}[letter]
    assert (lo.eps, lo.teacher, lo.perturb, lo.feature) == expected
    assert needs_images(r) == (letter != "D")  # D is data-free: trajectories only, aligned on them
    assert lo.perturbations.trajectory.align == (letter == "D")
    assert lo.perturbations.trajectory.swap_prompts == (0.3 if letter == "D" else 0.0)
    assert lo.perturbations.trajectory.enabled == (letter in "CDE")
    if letter in "CDE":
        assert lo.perturbations.trajectory.prompts == "prompt_file" and lo.perturbations.prompt_file.path == str(prompts)
    assert lo.perturbations.prompt_file.enabled == (letter in "CE")


def test_a_letter_prefixed_override_reaches_that_student_only():
    shared, per = study.split_overrides(["training.seed=3", "C:losses.perturbations.caption_mix.enabled=false",
                                         "teacher.source=C:/teachers/x", "C:losses.perturb=0.5"])
    assert shared == ["training.seed=3", "teacher.source=C:/teachers/x"]
    assert per == {"C": ["losses.perturbations.caption_mix.enabled=false", "losses.perturb=0.5"]}
    with pytest.raises(ValueError, match="unknown student 'F'"):
        study.split_overrides(["F:losses.perturb=1"])


@pytest.mark.usefixtures("private_cache")
def test_a_per_student_override_applies_after_its_letter_and_a_bad_one_fails_before_training(tiny_teachers, tmp_path):
    from sitdistill.core.recipe import RecipeError

    plan = study.quick_plan(letters=("C",), overrides=[f"teacher.source={tiny_teachers['sd15']}",
                                                       "C:losses.perturbations.caption_mix.enabled=false"])
    plan.steps, plan.eval_every = 1, 1
    study.run_study(tmp_path / "ok", plan)
    ran = load_recipe(tmp_path / "ok" / "runs" / "seed0" / "C" / "recipe.yaml")
    assert not ran.losses.perturbations.caption_mix.enabled  # the letter turns it on; the override wins
    assert ran.losses.perturbations.prompt_file.enabled
    plan.overrides = plan.overrides[:-1] + ["C:losses.perturbations.no_such_key=1"]
    with pytest.raises(RecipeError, match="no_such_key"):
        study.run_study(tmp_path / "bad", plan)
    assert not (tmp_path / "bad").exists()  # nothing written


def test_prompt_sets_split_seen_and_held_out_combinations():
    sets = study.eval_prompt_sets(HELD, 40)
    held = {tuple(c.split()) for c in HELD}
    seen = [parse_caption(p) for p in sets["seen"]]
    out = [parse_caption(p) for p in sets["held_out"]]
    assert len(seen) == len(out) == 40
    assert not any((c["colour"], c["shape"]) in held for c in seen)
    assert {(c["colour"], c["shape"]) for c in out} == held  # every held-out combination is represented


def test_prompt_file_covers_the_whole_world(tmp_path):
    lines = [ln for ln in study.write_prompt_file(tmp_path / "p.txt", n=400).read_text().splitlines()
             if not ln.startswith("#")]
    combos = {(c["colour"], c["shape"]) for c in map(parse_caption, lines)}
    assert {tuple(c.split()) for c in HELD} <= combos and len(combos) == 24


def _results(values: dict) -> dict:
    """A results dict with one seed, one step; values: {set: {who: {metric: v}}}."""
    r = {"plan": {"letters": list("ABCD"), "eval_steps": [10], "seeds": [0]}, "by_seed": {"0": {"10": values}}}
    r["summary"] = study_report.summarise(r)
    return r


def test_claims_follow_the_numbers():
    good = {name: {"A": {"noise_mse": 0.5, "latent_mse": 0.9, "fidelity": 0.1},
                   "B": {"noise_mse": 0.2, "latent_mse": 0.5, "fidelity": 0.3},
                   "C": {"noise_mse": 0.1, "latent_mse": 0.4, "fidelity": 0.4},
                   "D": {"noise_mse": 0.3, "latent_mse": 0.6, "fidelity": 0.3},
                   "teacher": {"fidelity": 0.5}} for name in study_report.SETS}
    claims = study_report.check_claims(_results(good))
    assert [c["holds"] for c in claims] == [True, True, True]
    assert "60 %" in claims[2]["detail"]
    bad = json.loads(json.dumps(good))
    bad["held_out"]["B"]["fidelity"] = 0.05  # B worse than A on one metric, and better than C there
    bad["held_out"]["C"]["fidelity"] = 0.04
    bad["seen"]["D"]["fidelity"] = 0.1       # 20 % of the teacher
    claims = study_report.check_claims(_results(bad))
    assert [c["holds"] for c in claims] == [False, False, False]
    assert "B not better" in claims[0]["detail"] and "C not better" in claims[1]["detail"]
    short = json.loads(json.dumps(good))
    short["seen"]["D"]["fidelity"] = 0.275   # 55 % of the teacher: short of the 0.6x goal
    assert study_report.check_claims(_results(short))[2]["holds"] is False


def test_summary_is_mean_and_sample_std_over_seeds():
    r = {"plan": {"letters": ["A"], "eval_steps": [5], "seeds": [0, 1, 2]},
         "by_seed": {str(s): {"5": {"seen": {"A": {"noise_mse": v}}}} for s, v in enumerate((1.0, 2.0, 6.0))}}
    mean, std = study_report.summarise(r)["seen"]["5"]["A"]["noise_mse"]
    assert mean == pytest.approx(3.0) and std == pytest.approx(math.sqrt(7.0))


@pytest.mark.usefixtures("private_cache")
def test_quick_study_trains_evaluates_and_reports_every_student(tiny_teachers, tmp_path, capsys):
    out = tmp_path / "study"
    plan = study.quick_plan(overrides=[f"teacher.source={tiny_teachers['sd15']}"])
    results = study.run_study(out, plan)
    assert results["plan"]["eval_steps"] == [1, 2]
    for step in ("1", "2"):
        for name in study_report.SETS:
            cell = results["by_seed"]["0"][step][name]
            for k in study.LETTERS:
                assert all(math.isfinite(cell[k][m]) for m in study_report.METRICS), (step, name, k)
            assert "fidelity" in cell["teacher"]
    for k in study.LETTERS:  # ordinary training runs, one checkpoint per evaluation step
        run = out / "runs" / "seed0" / k
        assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
        assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert (out / "eval" / "seed0" / "step000002" / "held_out" / "report.md").is_file()
    # The teacher's samples (same prompts, seeds, sampler) are the same at every evaluated step.
    teacher_png = [(out / "eval" / "seed0" / f"step00000{s}" / "held_out" / "images" / "teacher" / "0000-seed0.png")
                   for s in (1, 2)]
    assert teacher_png[0].read_bytes() == teacher_png[1].read_bytes()
    # Students were trained with their own losses (read back from the recipe each run saved).
    d = load_recipe(next((out / "runs" / "seed0" / "D").glob("checkpoint-2")) / "recipe.yaml")
    assert d.losses.eps == 0 and d.losses.perturbations.trajectory.prompts == "prompt_file"
    table = (out / "results.md").read_text()
    for k in study.LETTERS:
        assert f"| {k}: {study.DESCRIPTIONS[k]} |" in table
    assert "## The expected results" in table
    plot = Image.open(out / "study.png")
    assert plot.size[0] > plot.size[1] > 0
    # A second run reuses every finished run and report: nothing is trained again.
    capsys.readouterr()
    again = study.run_study(out, plan)
    assert "training" not in capsys.readouterr().out
    assert again["by_seed"] == results["by_seed"]


@pytest.mark.usefixtures("private_cache")
def test_study_runs_in_two_processes(tiny_teachers, tmp_path):
    """The process-pool path: training jobs, then each seed's evaluations queued behind them."""
    plan = study.quick_plan(letters=("A", "D"), overrides=[f"teacher.source={tiny_teachers['sd15']}"])
    plan.steps, plan.eval_every, plan.workers = 1, 1, 2
    results = study.run_study(tmp_path / "study", plan)
    assert results["plan"]["eval_steps"] == [1] and results["seconds"]["workers"] == 2
    for name in study_report.SETS:
        assert set(results["by_seed"]["0"]["1"][name]) == {"A", "D", "teacher"}
    assert (tmp_path / "study" / "results.md").is_file()


def test_claims_say_when_a_difference_is_within_the_seeds_spread():
    by_seed = {str(s): {"10": {"seen": {"A": {"noise_mse": a}, "B": {"noise_mse": b}}}}
               for s, (a, b) in enumerate([(0.50, 0.30), (0.52, 0.31), (0.48, 0.29)])}
    r = {"plan": {"letters": ["A", "B"], "eval_steps": [10], "seeds": [0, 1, 2]}, "by_seed": by_seed}
    r["summary"] = study_report.summarise(r)
    assert "within the seeds' spread" not in study_report.check_claims(r)[0]["detail"]  # 0.2 apart, std 0.02
    for seed, (a, b) in zip(by_seed, [(0.50, 0.45), (0.40, 0.47), (0.45, 0.40)]):
        by_seed[seed]["10"]["seen"] = {"A": {"noise_mse": a}, "B": {"noise_mse": b}}
    r["summary"] = study_report.summarise(r)
    claim = study_report.check_claims(r)[0]
    assert claim["holds"] and "B better, within the seeds' spread" in claim["detail"]


@pytest.mark.usefixtures("private_cache")
def test_cli_study_command(tiny_teachers, tmp_path, capsys):
    from sitdistill import cli

    assert cli.main(["study", "--students", "A", "X"]) == 2  # a bad letter: one line, nothing run
    assert "unknown X" in capsys.readouterr().err
    out = tmp_path / "study"
    assert cli.main(["study", "--quick", "--teacher", str(tiny_teachers["sd15"]), "--students", "A", "B",
                     "--steps", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["plan"]["letters"] == ["A", "B"] and results["plan"]["eval_steps"] == [1]
    assert results["plan"]["teacher"] == str(tiny_teachers["sd15"])
    # Bad plans and a folder of a longer study are refused (exit 2), not silently mixed.
    base = ["study", "--quick", "--teacher", str(tiny_teachers["sd15"]), "--students", "A", "--out", str(out)]
    assert cli.main(base + ["--steps", "0"]) == 2
    assert cli.main(base + ["--steps", "2"]) == 0
    (out / "runs" / "seed0" / "A" / "summary.json").unlink()  # as if that run had been interrupted
    assert cli.main(base + ["--steps", "1"]) == 2
    assert "belongs to a longer study" in capsys.readouterr().err
