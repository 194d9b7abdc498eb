"""The convergence curve (`cli.py curve`): students A, B and E, the teacher's own training, the reach table."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sitdistill.apps import curve
from sitdistill.core.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY_TEACHER = dict(preset="tiny", n_images=24, resolutions=((32, 32), (32, 16)), vae_steps=2, vae_batch=4,
                    vae_crop=16, unet_steps=2, batch_size=4, warmup_steps=1)
QUICK = ["student.hidden_size=32", "student.depth=2", "student.num_heads=2", "training.batch_size=4",
         "data.toy.num_images=24", "sampling.num_inference_steps=2", "losses.features.student_blocks=[1]",
         "losses.features.projector_hidden=16"]


def test_first_reach_interpolates_between_evaluations():
    steps, values = [100, 200, 300], [0.1, 0.3, 0.6]
    assert curve.first_reach(steps, values, 0.2) == pytest.approx(150)
    assert curve.first_reach(steps, values, 0.6) == pytest.approx(300)
    assert curve.first_reach(steps, values, 0.05) == pytest.approx(50)  # from 0 at step 0
    assert curve.first_reach(steps, values, 0.7) is None
    assert curve.first_reach([100, 200], [0.5, 0.2], 0.4) == pytest.approx(80)  # the first crossing counts


@pytest.mark.parametrize("arm", list(curve.ARMS))
def test_students_differ_only_in_their_losses(arm):
    base = load_recipe(ROOT / "recipes" / "toy.yaml")
    r = load_recipe(ROOT / "recipes" / "toy.yaml", curve.arm_overrides(arm, base))
    for section in ("data", "student", "optimizer", "training", "sampling", "teacher"):
        assert r[section] == base[section], section
    lo = r.losses
    assert (lo.eps > 0, lo.teacher > 0, lo.feature > 0, lo.perturb) == {
        "A": (True, False, False, 0), "B": (False, True, False, 0), "E": (False, True, True, 0)}[arm]
    with pytest.raises(ValueError, match="unknown student"):
        curve.arm_overrides("Z", base)


@pytest.mark.usefixtures("private_cache")
def test_quick_curve_with_the_teachers_own_training(tmp_path, capsys):
    out = tmp_path / "curve"
    plan = curve.CurvePlan(steps=2, every=1, prompts=2, teacher_curve=True, teacher_snapshots=(1,),
                           teacher_settings=TINY_TEACHER, overrides=QUICK + ["teacher.source=toy:sdxl"])
    results = curve.run_curve(out, plan)
    assert set(results["students"]) == {"A", "B", "E"}
    for graded in list(results["students"].values()) + [results["teacher_curve"]]:
        assert {"1", "2"} <= set(graded)
        for step in ("1", "2"):
            assert all(0.0 <= graded[step][k] <= 1.0 for k in ("colour", "shape", "position", "all"))
    assert results["teacher_curve"]["batch_size"] == 4
    # The final build is the teacher the students learnt from, graded the same way.
    assert results["teacher_curve"]["2"] == results["teacher"]
    for arm in "ABE":
        saved = load_recipe(out / "runs" / arm / "checkpoint-2" / "recipe.yaml")
        assert saved.teacher.source == str(out / "teacher-build")
        assert (saved.losses.feature > 0) == (arm == "E") and (saved.losses.teacher > 0) == (arm != "A")
    # A snapshot swaps the EMA in and out: both sets of weights come back bit for bit, so the
    # training goes on as without snapshots.
    from sitdistill.teachers.toy import _swap

    params, ema = [torch.randn(3, 2), torch.randn(4)], [torch.randn(3, 2), torch.randn(4)]
    before = [t.clone() for t in params + ema]
    _swap(params, ema)
    assert torch.equal(params[0], before[2]) and torch.equal(ema[1], before[1])
    _swap(params, ema)
    assert all(torch.equal(a, b) for a, b in zip(params + ema, before))
    unet = "unet/diffusion_pytorch_model.safetensors"
    a = load_file(str(out / "teacher-build" / unet))
    early = load_file(str(out / "teacher-snapshots" / "step-1" / unet))
    assert any(not torch.equal(a[k], early[k]) for k in a)
    table = (out / "curve.md").read_text()
    assert "| A | 2 |" in table and "steps to 0.8x teacher" in table and "teacher (own training)" in table
    assert set(json.loads((out / "curve.json").read_text())["reach"]) == {"A", "B", "E", "teacher (own training)"}
    assert Image.open(out / "curve.png").size == (640, 380)
    # A second run reuses the runs, the build and the gradings.
    capsys.readouterr()
    again = curve.run_curve(out, plan)
    said = capsys.readouterr().out
    assert ": training" not in said and "building" not in said
    assert again["students"] == results["students"]


def test_cli_curve_refuses_an_unknown_student(capsys):
    from sitdistill import cli

    assert cli.main(["curve", "--students", "A", "Z"]) == 2
    assert "unknown Z" in capsys.readouterr().err


def test_reach_table_gives_the_speed_up_or_its_lower_bound():
    g = lambda *vals: {str(250 * (i + 1)): {"colour": 1, "shape": 1, "position": 1, "all": v} for i, v in enumerate(vals)}
    results = {"teacher": {"colour": 1, "shape": 1, "position": 0.6, "all": 0.6}, "students": {"A": g(0.1, 0.2, 0.3, 0.4), "E": g(0.3, 0.5, 0.6, 0.6)},
               "teacher_curve": {"batch_size": 24, **g(0.0, 0.6)}}
    r = curve.reach_table(results)
    assert r["A"]["0.5"] == pytest.approx(750) and r["E"]["0.5"] == pytest.approx(250)
    assert r["E"]["0.5_fewer_steps_than_A"] == pytest.approx(3.0)
    assert r["A"]["0.8"] is None and r["E"]["0.8"] == pytest.approx(250 + 250 * (0.48 - 0.3) / 0.2)
    assert r["E"]["0.8_fewer_steps_than_A"] is None
    assert r["E"]["0.8_fewer_steps_than_A_at_least"] == pytest.approx(1000 / r["E"]["0.8"])
    assert r["teacher (own training)"]["0.5_fewer_steps_than_A"] is None  # another batch: not compared
    assert "more than" in curve.render({**results, "plan": {"prompts": 2, "teacher": "t"}, "reach": r})
