"""The distillation trainer on tiny parts: smoke run, frozen teacher, exact resume, NaN guard."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sitdistill.core import checkpoint as ckpt
from sitdistill.core.recipe import load_recipe
from sitdistill.train.trainer import Distiller, TrainingStopped

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("private_cache")  # tiny_teachers: tests/conftest.py


# The loss set-up these tests were written for (data term, teacher term, no feature alignment),
# pinned so that they do not follow the shipped toy recipe's choices; `shipped=True` keeps those.
PINNED = ("losses.eps=1.0", "losses.teacher=1.0", "losses.feature=0", "optimizer.lr=3e-4", "optimizer.name=adamw",
          "evaluation.at_end=0")


def tiny_recipe(teacher: Path, out: Path, *overrides: str, shipped: bool = False):
    return load_recipe(ROOT / "recipes" / "toy.yaml", [
        f"teacher.source={teacher}", f"output.dir={out}",
        "student.hidden_size=32", "student.depth=2", "student.num_heads=2",
        "data.toy.num_images=24", "training.batch_size=4", "training.max_steps=2",
        "training.checkpoint_every=1000", "training.sample_every=0", "training.log_every=1",
        "optimizer.warmup_steps=0", *(() if shipped else PINNED), *overrides,
    ])


def weights(folder: Path) -> dict:
    return load_file(next(folder.glob("*.safetensors")))


def test_two_steps_train_save_and_leave_the_teacher_untouched(tiny_teachers, tmp_path):
    r = tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "losses.perturb=0.5",
                    "losses.perturbations.input_noise.enabled=true", "losses.perturbations.caption_mix.enabled=true",
                    "losses.perturbations.embedding_noise.enabled=true",
                    "losses.perturbations.timestep_jitter.enabled=true")
    d = Distiller(r)
    teacher_before = {k: v.clone() for k, v in d.teacher.unet.state_dict().items()}
    student_before = {k: v.clone() for k, v in d.student.state_dict().items()}
    logs = d.step(next(iter(d.data.epoch_batches(0))))
    for name in ("loss/eps", "loss/teacher", "loss/total", "grad_norm", "lr"):
        assert name in logs
    assert any(k.startswith("loss/perturb/") for k in logs)
    # Frozen means frozen: no teacher parameter has a gradient or changed.
    for module in d.teacher.modules().values():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert all(torch.equal(v, d.teacher.unet.state_dict()[k]) for k, v in teacher_before.items())
    assert any(not torch.equal(v, d.student.state_dict()[k]) for k, v in student_before.items())

    summary = d.fit()
    run = tmp_path / "run"
    latest = ckpt.find_latest(run)
    assert latest.name == "checkpoint-2" and summary["steps"] == 2
    assert (run / "recipe.yaml").is_file() and (latest / "recipe.yaml").is_file()
    assert (run / "summary.json").is_file() and list((run / "logs").iterdir())
    # The teacher is never saved with the student.
    assert sorted(p.name for p in latest.iterdir() if p.is_dir()) == ["ema", "student"]
    from sitdistill.students import SiT

    assert SiT.from_pretrained(latest / "student").config.text_dim == 32


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tiny_teachers, tmp_path, optimizer):
    """2N steps straight == N steps, resume, N steps (weights, EMA, optimizer)."""
    common = ("training.max_steps=4", "optimizer.lr_scheduler=cosine", "optimizer.warmup_steps=1",
              "data.caption_dropout=0.3", "training.checkpoint_every=2", f"optimizer.name={optimizer}")
    Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "straight", *common)).fit()
    # The same run killed after its first checkpoint: run to step 2 only, then resume.
    first = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "resumed", *common))
    first.total_steps = 2
    first.fit()
    Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "resumed", *common, "training.resume=latest")).fit()

    a, b = tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4"
    for part in ("student", "ema"):
        wa, wb = weights(a / part), weights(b / part)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part
    oa = torch.load(a / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(b / "optimizer.pt", weights_only=True)["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    kinds = {k for state in oa.values() for k in state}
    assert kinds == ({"step", "exp_avg", "exp_avg_sq", "momentum_buffer"} if optimizer == "muon"
                     else {"step", "exp_avg", "exp_avg_sq"})


def test_sdxl_teacher_swap_is_a_recipe_edit(tiny_teachers, tmp_path):
    d = Distiller(tiny_recipe(tiny_teachers["sdxl"], tmp_path / "run"))
    assert d.teacher.family == "sdxl"
    cfg = d.student.config
    assert (cfg.text_dim, cfg.pooled_dim, cfg.time_ids_dim) == (48, 24, 6)
    logs = d.step(next(iter(d.data.epoch_batches(0))))
    assert torch.isfinite(torch.tensor(logs["loss/total"]))


def test_non_finite_steps_are_skipped_then_stop(tiny_teachers, tmp_path):
    d = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "training.max_bad_steps=2"))
    batch = next(iter(d.data.epoch_batches(0)))
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    poisoned = dict(batch, latent_mean=torch.full_like(batch["latent_mean"], float("nan")))
    assert d.step(poisoned) == {"bad_step": 1.0}
    assert all(torch.equal(v, d.student.state_dict()[k]) for k, v in before.items())
    assert d.state.step == 0 and d.state.bad_steps == 1
    with pytest.raises(TrainingStopped, match="2 non-finite steps in a row"):
        d.step(poisoned)


def test_guided_teacher_and_feature_alignment_terms(tiny_teachers, tmp_path):
    d = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "losses.guided_teacher=true",
                              "losses.guidance_range=[1.0,3.0]", "losses.feature=0.5",
                              "losses.features.student_blocks=[1]", "losses.features.teacher_modules=[mid_block]",
                              "losses.features.projector_hidden=16"))
    logs = d.step(next(iter(d.data.epoch_batches(0))))
    assert logs["loss/feature"] > 0
    d.fit()
    assert (ckpt.find_latest(tmp_path / "run") / "projector_0").is_dir()


def test_data_free_run_learns_from_teacher_trajectories_only(tiny_teachers, tmp_path):
    d = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "losses.eps=0", "losses.teacher=0",
                              "losses.perturb=1", "losses.perturbations.trajectory.enabled=true",
                              "losses.perturbations.trajectory.num_steps=3",
                              "losses.perturbations.trajectory.guidance_scale=2.0", "training.max_steps=4"))
    assert not d.data.needs_images
    summary = d.fit()
    assert summary["steps"] == 4
    # One 3-step trajectory of 4 prompts serves 3 batches; the 4th step needed a second one.
    assert len(d.objective.trajectory.queue) == 2


def test_renoised_trajectory_states_are_the_teachers_samples_noised_like_data(tiny_teachers, tmp_path):
    pp = "losses.perturbations"
    d = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "losses.eps=0", "losses.teacher=0",
                              "losses.perturb=1", f"{pp}.trajectory.enabled=true", f"{pp}.trajectory.num_steps=3",
                              f"{pp}.trajectory.guidance_scale=2.0", f"{pp}.trajectory.states=renoised",
                              "training.max_steps=4"))
    pool, schedule = d.objective.trajectory, d.teacher.schedule
    # Each of the N samples is noised `copies` times, copy-major, at timesteps drawn as the data's.
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    pool.gen.manual_seed(5)
    x_t, t = pool.renoise(x0, 3)
    g = torch.Generator().manual_seed(5)
    t_again = schedule.sample_timesteps(12, generator=g, mode=d.recipe.losses.timestep_sampling)
    noise = torch.randn(12, 4, 8, 8, generator=g)
    assert torch.equal(t, t_again) and len(set(t.tolist())) > 3
    assert torch.allclose(x_t, schedule.add_noise(x0.repeat(3, 1, 1, 1), noise, t))
    # A data-free run on them: one sampling run of 3 steps still serves 3 batches.
    summary = d.fit()
    assert summary["steps"] == 4 and len(pool.queue) == 2
    _, t_served, _ = pool.next()
    pool.scheduler.set_timesteps(3)
    assert not set(t_served.tolist()) <= set(pool.scheduler.timesteps.tolist())  # fresh, not the sampler's grid


def test_swapped_prompts_give_trajectory_states_another_rows_prompt(tiny_teachers, tmp_path):
    pp = "losses.perturbations"
    d = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "losses.perturb=1", "data.caption_dropout=0",
                              f"{pp}.trajectory.enabled=true", f"{pp}.trajectory.num_steps=2",
                              f"{pp}.trajectory.prompts=toy", f"{pp}.trajectory.swap_prompts=1.0"))
    pool = d.objective.trajectory
    pool.refill()
    x_q, t_q, cond_q, _ = pool.queue[-1]
    x, t, cond = pool.next()
    assert torch.equal(x, x_q) and torch.equal(t, t_q)
    served, queued = cond["encoder_hidden_states"], cond_q["encoder_hidden_states"]
    # Every row now carries some row's prompt of the same batch, and not all its own.
    match = (served[:, None] == queued[None]).flatten(2).all(-1)  # (N, N): served row i is queued row j
    assert match.any(1).all() and not torch.equal(served, queued)


def test_data_free_run_aligns_features_on_the_teachers_states(tiny_teachers, tmp_path):
    from sitdistill.data.pipeline import needs_images
    from sitdistill.train.features import capture, tokens_from_map
    from sitdistill.train.losses import feature_loss

    pp = "losses.perturbations"
    common = ["losses.eps=0", "losses.teacher=0", "losses.perturb=1", f"{pp}.trajectory.enabled=true",
              f"{pp}.trajectory.num_steps=2", "losses.feature=0.5", "losses.features.student_blocks=[1]",
              "losses.features.teacher_modules=[mid_block]", "losses.features.projector_hidden=16"]
    # Without `align` the feature weight is the data's alignment term, so images are read.
    assert needs_images(tiny_recipe(tiny_teachers["sd15"], tmp_path / "data", *common))
    d = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", *common, f"{pp}.trajectory.align=true"))
    assert not d.data.needs_images
    # The term compares the student's block 1, projected, with the teacher's mid block on the same states.
    obj = d.objective
    xs, ts, cs = obj.trajectory.next()
    obj.trajectory.next = lambda: (xs, ts, cs)
    terms, weights, _ = obj(None)
    with torch.no_grad(), capture(d.teacher.unet, ["mid_block"]) as t_feats:
        d.teacher.predict_as(xs, ts, cs, obj.target_type)
        _, s_feats, grid = obj.student_eps(xs, ts, cs, [1])
        expected = feature_loss(d.projector(s_feats), [tokens_from_map(t_feats["mid_block"], grid)])
    assert torch.allclose(terms["feature/trajectory"].detach(), expected, atol=1e-6)
    assert weights["feature/trajectory"] == 0.5 and set(terms) == {"perturb/trajectory", "feature/trajectory"}
    projector = [p.detach().clone() for p in d.projector.parameters()]
    logs = d.step(None)
    assert logs["loss/total"] == pytest.approx(logs["loss/perturb/trajectory"]
                                               + 0.5 * logs["loss/feature/trajectory"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(projector, d.projector.parameters()))  # it learns
    # Beside the data terms, the data states are aligned too: two alignment terms.
    both = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "both", *common, "losses.eps=1",
                                 f"{pp}.trajectory.align=true"))
    assert both.data.needs_images
    logs = both.step(next(iter(both.data.epoch_batches(0))))
    assert {"loss/eps", "loss/feature", "loss/feature/trajectory", "loss/perturb/trajectory"} <= logs.keys()


def test_trajectory_part_beside_data_terms(tiny_teachers, tmp_path):
    d = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "losses.perturb=0.5",
                              "losses.perturbations.trajectory.enabled=true",
                              "losses.perturbations.trajectory.num_steps=2", "losses.perturbations.trajectory.prompts=toy"))
    logs = d.step(next(iter(d.data.epoch_batches(0))))
    assert {"loss/eps", "loss/teacher", "loss/perturb/trajectory"} <= logs.keys()
    x, t, cond = d.objective.trajectory.next()
    assert x.shape[0] == 4 and t.dtype == torch.long and cond["encoder_hidden_states"].shape[0] == 4


def test_trajectory_states_carry_caption_dropout_and_read_the_prompt_file(tiny_teachers, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# text only\na red circle at the top left\na blue square in the center\n")
    pp = "losses.perturbations"
    d = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "losses.eps=0", "losses.teacher=0",
                              "losses.perturb=1", f"{pp}.trajectory.enabled=true", f"{pp}.trajectory.num_steps=2",
                              f"{pp}.trajectory.prompts=prompt_file", f"{pp}.prompt_file.path={prompts}",
                              "data.caption_dropout=0.5"))
    assert not d.data.needs_images  # the prompt file feeds the trajectories; no batch part needs images
    assert d.objective.prompt_pool == ["a red circle at the top left", "a blue square in the center"]
    uncond = d.teacher.encode_prompt([""] * 4, height=64, width=64)["encoder_hidden_states"]
    dropped = kept = 0
    for _ in range(6):
        _, _, cond = d.objective.trajectory.next()
        is_uncond = [torch.equal(row, uncond[0]) for row in cond["encoder_hidden_states"]]
        dropped, kept = dropped + sum(is_uncond), kept + len(is_uncond) - sum(is_uncond)
    assert dropped > 0 and kept > 0  # both branches are served, so CFG's unconditional one is learnt


def test_fsdp_refuses_a_launch_it_cannot_use(tmp_path):
    """(What the recipe combines with FSDP, fp16 or the end-to-end stage, is refused by
    sitdistill.train.validate: tests/test_validate.py.)"""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from sitdistill.core.recipe import RecipeError
    from sitdistill.train.sharding import check_fsdp

    r = tiny_recipe(tmp_path / "teacher", tmp_path / "run", "training.fsdp=true")
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=1)
    with pytest.raises(RecipeError, match="launch with `accelerate launch --multi_gpu"):  # nothing to shard over
        check_fsdp(r, acc)
    # accelerate's own FSDP plugin would shard the student behind the EMA's and checkpoint's back
    plugin = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2)
    with pytest.raises(RecipeError, match="training.fsdp=true"):
        check_fsdp(tiny_recipe(tmp_path / "teacher", tmp_path / "run"), plugin)
    assert check_fsdp(tiny_recipe(tmp_path / "teacher", tmp_path / "run"), acc) is False
    ok = tiny_recipe(tmp_path / "teacher", tmp_path / "run", "training.fsdp=true", "training.mixed_precision=bf16")
    assert check_fsdp(ok, SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=8)) is True


@pytest.mark.parametrize("scale", [0.01, 10.0])  # under and over the limit
def test_clipping_matches_torch_and_folds_into_the_fused_step(scale):
    from accelerate import Accelerator

    from sitdistill.train.trainer import clip_gradients, foldable, step_optimizer

    acc = Accelerator(cpu=True)
    g = torch.Generator().manual_seed(0)
    shapes = ((7, 5), (300,), (2, 3, 4))
    grads = [torch.randn(s, generator=g) * scale for s in shapes]

    def params():
        ps = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        return ps

    ours, ref = params(), params()
    norm, divisor = clip_gradients(acc, ours, 1.0)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, 1.0))
    assert divisor is None  # applied here
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)

    # Folded: the gradients are left alone and the fused AdamW divides them in its kernel.
    folded, plain = params(), params()
    opt_f = torch.optim.AdamW(folded, lr=0.1, fused=True)
    opt_p = torch.optim.AdamW(plain, lr=0.1, fused=True)
    assert foldable(opt_f, acc) and not foldable(torch.optim.AdamW(params(), lr=0.1), acc)
    _, div = clip_gradients(acc, folded, 1.0, fold=True)
    assert torch.equal(folded[0].grad, grads[0]) and bool(div > 1) == (scale > 1)
    step_optimizer(opt_f, div)
    assert not hasattr(opt_f, "grad_scale")
    clip_gradients(acc, plain, 1.0)
    step_optimizer(opt_p, None)
    for a, b in zip(folded, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(folded[0], torch.ones(shapes[0]))


def test_run_ends_with_prompt_fidelity_of_teacher_and_student(tiny_teachers, tmp_path):
    """evaluation.at_end: the summary (and the console) give both grader rates and their ratio."""
    import json

    r = tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "evaluation.at_end=3",
                    "sampling.num_inference_steps=2", "losses.features.projector_hidden=16",
                    "losses.features.student_blocks=[1]", shipped=True)
    d = Distiller(r)
    assert r.losses.feature and not r.losses.eps  # the shipped toy recipe's losses
    summary = d.fit()
    assert d.projector is not None  # feature alignment ran
    fid = json.loads((tmp_path / "run" / "summary.json").read_text())["fidelity"]
    assert fid == json.loads(json.dumps(summary["fidelity"]))
    assert set(fid["student"]["agreement"]) == {"colour", "shape", "position", "all"}
    for who in ("teacher", "student"):
        assert fid[who]["n"] == 3 and set(fid[who]) >= {"colour", "shape", "position", "all"}
        assert all(0.0 <= fid[who][k] <= 1.0 for k in ("colour", "shape", "position", "all"))
    if fid["teacher"]["all"]:
        assert fid["ratio_all"] == pytest.approx(fid["student"]["all"] / fid["teacher"]["all"])
    else:
        assert fid["ratio_all"] is None
    assert fid["prompts"] == 3 and fid["sampler"].startswith("ddim, 2 steps")


def test_toy_fidelity_grades_every_model_on_the_same_prompts_seeds_and_sampler(tiny_teachers):
    """The same eps function under two names gets the same images, hence the same rates; another
    seed draws other images."""
    from sitdistill.evaluation.evaluate import toy_fidelity
    from sitdistill.teachers import load_teacher

    teacher = load_teacher(str(tiny_teachers["sd15"]))
    prompts = ["a red circle at the top left", "a large blue square in the center on a plain background",
               "a green triangle at the bottom right", "a yellow diamond at the top right"]
    kw = dict(scheduler="ddim", steps=2, guidance_scale=3.0)
    calls = []

    def counting(x, t, cond):
        calls.append(tuple(x.shape[-2:]))
        return teacher.predict_eps(x, t, cond)

    rates = toy_fidelity(teacher, {"teacher": teacher.predict_eps, "b": counting}, prompts, **kw)
    agreement = rates["b"].pop("agreement")
    assert rates["teacher"] == rates["b"] and rates["teacher"]["n"] == 4
    assert set(agreement) == {"colour", "shape", "position", "all"}
    # every toy aspect ratio is sampled (latent grids of 64x64, 64x48 and 48x64 images)
    assert {s for s in calls} == {(16, 16), (12, 16), (16, 12)}


def test_agreement_counts_matching_analyses_and_never_matches_nothing():
    from sitdistill.data.toy import match_rates

    nothing = {"colour": None, "shape": None, "position": None}
    seen = [{"colour": "red", "shape": "circle", "position": "center"}, nothing,
            {"colour": "blue", "shape": "square", "position": "top left"}]
    ref = [{"colour": "red", "shape": "square", "position": "center"}, nothing,
           {"colour": "blue", "shape": "square", "position": "top left"}]
    assert match_rates(seen, ref) == {"colour": 2 / 3, "shape": 1 / 3, "position": 2 / 3, "all": 1 / 3}


def test_a_zero_terminal_snr_v_teacher_trains_with_trajectories_and_stays_finite(tmp_path):
    from tiny_models import make_zsnr_v

    teacher = make_zsnr_v(tmp_path / "zsnr", vae_blocks=3)
    r = tiny_recipe(teacher, tmp_path / "run", "losses.perturb=1", "losses.perturbations.trajectory.enabled=true",
                    "losses.perturbations.trajectory.num_steps=4", "training.max_steps=3",
                    "training.max_bad_steps=1")
    d = Distiller(r)
    assert float(d.teacher.schedule.alphas_cumprod[-1]) == 0.0
    summary = d.fit()
    assert summary["steps"] == 3 and summary["bad_steps"] == 0
    x, t, _ = d.objective.trajectory.next()
    assert torch.isfinite(x).all() and int(t.max()) <= 999


def test_a_v_student_learns_from_a_zero_terminal_snr_v_teacher_in_v_and_samples_in_v(tmp_path):
    from sitdistill.apps.export import build_pipeline, resolve_checkpoint
    from sitdistill.core.schedule import NoiseSchedule
    from tiny_models import make_zsnr_v

    teacher_dir = make_zsnr_v(tmp_path / "zsnr", vae_blocks=3)
    r = tiny_recipe(teacher_dir, tmp_path / "run", "student.prediction_type=v_prediction", "losses.perturb=1",
                    "losses.perturbations.trajectory.enabled=true", "losses.perturbations.trajectory.num_steps=3",
                    "training.max_steps=2", "training.max_bad_steps=1")
    d = Distiller(r)
    assert d.objective.target_type == "v_prediction"
    te = d.teacher
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 400])
    cond = te.encode_prompt(["a red circle at the top left"] * 2)
    # One declared convention: the teacher's own v, untouched, also at SNR 0 (where eps = x_t says nothing).
    assert torch.equal(d.objective.teacher_target(x, t, cond), te.predict(x, t, cond))
    assert not torch.allclose(d.objective.teacher_target(x, t, cond)[0], x[0])
    # The data term's target is the velocity of the teacher's schedule.
    sched = NoiseSchedule.from_config(te.scheduler_config)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(sched.target(x0, noise, t, "v_prediction"), sched.velocity(x0, noise, t))
    summary = d.fit()
    assert summary["steps"] == 2 and summary["bad_steps"] == 0
    # Exported and sampled in v: the pipeline's scheduler steps v, and the samples are finite.
    pipe = build_pipeline(resolve_checkpoint(tmp_path / "run"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    latents = pipe("a red circle", height=16, width=16, num_inference_steps=3, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(latents).all()


def test_the_loss_weighting_is_defined_in_the_students_space():
    from sitdistill.core.schedule import NoiseSchedule

    sched = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                       "beta_start": 0.00085, "beta_end": 0.012})
    t = torch.tensor([10, 500, 990])
    snr = sched.snr(t)
    # v space: a v MSE already is the v weighting; min-SNR is min(SNR, gamma) / (SNR + 1).
    assert torch.equal(sched.loss_weight(t, "v", prediction_type="v_prediction"), torch.ones(3))
    torch.testing.assert_close(sched.loss_weight(t, "min_snr", 5.0, "v_prediction"), snr.clamp(max=5) / (snr + 1))
    # eps space (unchanged): v weighting is (SNR + 1) / SNR.
    torch.testing.assert_close(sched.loss_weight(t, "v"), (snr + 1) / snr)


def test_guided_teacher_distillation_feeds_w_to_the_student_and_samples_without_cfg(tiny_teachers, tmp_path, capsys):
    from sitdistill.infer.samples import sample_latents, student_fn

    r = tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "losses.guided_teacher=true",
                    "losses.guidance_range=[2.0,6.0]", "student.guidance_embed=true", "losses.eps=0")
    d = Distiller(r)
    seen = {}
    real_predict_as = d.teacher.predict_as

    def spy_teacher(x, t, cond, kind, uncond=None, scale=None):
        seen["teacher_scale"] = scale
        return real_predict_as(x, t, cond, kind, uncond, scale)

    d.teacher.predict_as = spy_teacher
    student = d.accelerator.unwrap_model(d.student)
    def spy_student(module, args, kwargs):
        seen.setdefault("student_w", kwargs.get("guidance"))

    hook = student.register_forward_pre_hook(spy_student, with_kwargs=True)
    d.step(next(iter(d.data.epoch_batches(0))))
    hook.remove()
    assert seen["teacher_scale"] is not None and torch.equal(seen["student_w"], seen["teacher_scale"])
    assert ((seen["teacher_scale"] >= 2.0) & (seen["teacher_scale"] <= 6.0)).all()
    # Sampling: guidance_scale becomes the student's w, and there is no unconditional pass.
    calls = []
    fn = student_fn(student)
    inner = fn.fn
    fn.fn = lambda x, t, c: calls.append((x.shape[0], c.get("guidance"))) or inner(x, t, c)
    sample_latents(fn, d.teacher, ["a red circle"], height=16, width=16, scheduler="ddim", steps=2,
                   guidance_scale=4.0, seed=0)
    assert [n for n, _ in calls] == [1, 1] and all(float(w) == 4.0 for _, w in calls)


def test_a_guided_target_without_a_guidance_input_warns_about_double_guidance(tiny_teachers, tmp_path, capsys):
    Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "losses.guided_teacher=true"))
    assert "guide twice" in capsys.readouterr().out


def test_eval_mode_puts_modules_in_eval_and_gives_each_its_own_mode_back_even_on_error():
    from sitdistill.core.modules import eval_mode
    a, b = torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)
    b.eval()  # a trains, b does not
    with eval_mode(a, b):
        assert not a.training and not b.training
    assert a.training and not b.training
    with pytest.raises(RuntimeError), eval_mode(a, b):
        raise RuntimeError("mid-evaluation")
    assert a.training and not b.training
