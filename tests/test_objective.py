"""The objective alone: a tiny teacher, a tiny student, no accelerate, no trainer."""

from pathlib import Path

import pytest
import torch

from sitdistill.train.build import build_student_from_recipe, load_teacher_from_recipe
from sitdistill.train.losses import combine
from sitdistill.train.objective import DistillObjective
from sitdistill.train.perturb import PERTURBATIONS
from test_trainer import tiny_recipe

pytestmark = pytest.mark.usefixtures("private_cache")  # tiny_teachers: tests/conftest.py

PP = "losses.perturbations"


def build(teacher_dir: Path, tmp_path: Path, *overrides: str) -> DistillObjective:
    from sitdistill.data.pipeline import build_train_data
    from sitdistill.train.features import FeatureProjector, FeatureProjectors

    prompts = tmp_path / "prompts.txt"
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts.write_text("a red circle\na blue square\n")
    r = tiny_recipe(teacher_dir, tmp_path / "run", f"{PP}.prompt_file.path={prompts}", *overrides)
    teacher = load_teacher_from_recipe(r.teacher, torch.device("cpu"))
    torch.manual_seed(0)
    student = build_student_from_recipe(r.student, teacher)
    projector = None
    if r.losses.feature:  # the teacher's mid block is 64 channels wide in the tiny UNets
        projector = FeatureProjectors([FeatureProjector(student.config.hidden_size, 64, r.losses.features.projector_hidden)])
    return DistillObjective(r, teacher, student, torch.Generator().manual_seed(0), build_train_data(r, teacher),
                            projector=projector)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_objective_gives_every_term_per_sample_and_its_weight(tiny_teachers, tmp_path, family):
    parts = [f"{PP}.{name}.enabled=true" for name in PERTURBATIONS]
    obj = build(tiny_teachers[family], tmp_path, "losses.perturb=0.5", *parts, f"{PP}.trajectory.enabled=true",
                f"{PP}.trajectory.num_steps=2", "losses.feature=0.5", "losses.features.student_blocks=[1]",
                "losses.features.teacher_modules=[mid_block]", "losses.features.projector_hidden=16",
                "losses.guided_teacher=true")
    batch = next(iter(obj.data.epoch_batches(0)))
    terms, weights, logs = obj(batch)
    perturb = {f"perturb/{name}" for name in PERTURBATIONS} | {"perturb/trajectory"}
    # a batch of 4 rows spreads over the 5 batch parts: at least 4 parts get a row
    assert {"eps", "teacher", "feature"} <= terms.keys() and len(terms.keys() & perturb) >= 5
    assert terms.keys() == weights.keys() and logs == {}
    assert all(v.ndim == 1 for v in terms.values())  # per sample; the trainer reduces
    assert sum(len(terms[k]) for k in terms.keys() & perturb - {"perturb/trajectory"}) == 4
    assert weights["perturb/trajectory"] == 0.5 and weights["feature"] == 0.5
    loss, _ = combine(terms, weights)
    loss.backward()
    assert all(p.grad is None for p in obj.teacher.unet.parameters())  # frozen means frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.student.parameters())


def test_the_objective_is_reproducible_from_its_generator(tiny_teachers, tmp_path):
    over = ("losses.perturb=1", f"{PP}.input_noise.enabled=true", f"{PP}.timestep_jitter.enabled=true",
            f"{PP}.caption_mix.enabled=true", "data.caption_dropout=0.5")
    a, b = build(tiny_teachers["sd15"], tmp_path / "a", *over), build(tiny_teachers["sd15"], tmp_path / "b", *over)
    batch = next(iter(a.data.epoch_batches(0)))
    ta, _, _ = a(batch)
    tb, _, _ = b(batch)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    tc, _, _ = a(batch)  # the generator moved on: other noise, other values
    assert not torch.equal(tc["eps"], ta["eps"])


def test_cfg_pairs_share_x_t_and_learn_the_guidance_direction(tiny_teachers, tmp_path):
    obj = build(tiny_teachers["sdxl"], tmp_path, "losses.guidance_pairs=2.0", "data.caption_dropout=0")
    seen = {}
    teacher_eps, student_eps = obj.teacher_eps, obj.student_eps

    def spy_teacher(x_t, t, cond, uncond, scale=None):
        seen.update(x_t=x_t, t=t, cond=cond, uncond=uncond)
        seen["teacher"] = out = teacher_eps(x_t, t, cond, uncond, scale)
        return out

    def spy_student(x_t, t, cond, blocks=None):
        seen["student"] = out = student_eps(x_t, t, cond, blocks)
        return out

    obj.teacher_eps, obj.student_eps = spy_teacher, spy_student
    batch = next(iter(obj.data.epoch_batches(0)))
    terms, weights, _ = obj(batch)
    x_t, t, cond, uncond = seen["x_t"], seen["t"], seen["cond"], seen["uncond"]
    assert x_t.shape[0] == 4 and weights["guidance"] == 2.0 and terms["guidance"].shape == (2,)
    assert torch.equal(x_t[2:], x_t[:2]) and torch.equal(t[2:], t[:2])  # a pair: one state, one timestep
    for key in cond:  # rows 0-1 their captions, rows 2-3 the pipeline's unconditional input
        assert torch.equal(cond[key][2:], uncond[key][:2])
        assert not torch.equal(cond[key][:2], uncond[key][:2]) or key == "time_ids"
    s, te = seen["student"], seen["teacher"]
    want = ((s[:2] - s[2:]) - (te[:2] - te[2:])).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["guidance"], want)
    plain = build(tiny_teachers["sdxl"], tmp_path / "plain", "data.caption_dropout=0")
    assert "guidance" not in plain(batch)[0]
