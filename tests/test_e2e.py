"""The end-to-end stage on tiny parts: the teacher stays bit-identical, the stop-gradient holds by
default, full and LoRA modes train and checkpoint, stage 2 starts from a stage-1 checkpoint."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sitdistill.core import checkpoint as ckpt
from sitdistill.train.e2e import LORA_WEIGHTS, load_student_side
from sitdistill.evaluation.metrics import reconstruction_psnr
from sitdistill.core.recipe import load_recipe
from sitdistill.train.trainer import Distiller
from test_trainer import tiny_recipe
from tiny_models import one_thread  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
E2E = ("training.train_vae=true", "training.train_text_encoder=true")
PROMPTS = ["a red circle at the top left", "a blue square"]


pytestmark = pytest.mark.usefixtures("private_cache")  # tiny_teachers: tests/conftest.py


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before: dict, module, only: str = "") -> bool:
    now = dict(module.named_parameters())
    return any(not torch.equal(v, now[k]) for k, v in before.items() if only in k)


@torch.no_grad()
def like_stage_one(student) -> None:
    """Stage 2 starts from a trained student. A fresh SiT's zero-initialised gates and text path
    would pass no gradient to the text encoders in the first steps, so give them small values."""
    g = torch.Generator().manual_seed(1)
    for p in student.parameters():
        if not p.any():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def teacher_outputs(teacher, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Encodings and predictions of the teacher for fixed inputs."""
    g = torch.Generator().manual_seed(0)
    cond = teacher.encode_prompt(PROMPTS)
    x0 = teacher.encode_images(pixels, sample=False)
    x_t = teacher.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), torch.tensor([100, 700]))
    eps = teacher.predict_eps(x_t, torch.tensor([100, 700]), cond)
    return [*cond.values(), x0, eps]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_teacher_stays_bit_identical_while_the_student_side_trains(tiny_teachers, tmp_path, family):
    # With perturbations: new captions and embedding noise reach the student through its own encoders.
    d = Distiller(tiny_recipe(tiny_teachers[family], tmp_path / "run", *E2E, "data.caption_dropout=0.5",
                              "optimizer.vae_lr=1e-3", "optimizer.text_encoder_lr=1e-3", "losses.perturb=0.5",
                              "losses.perturbations.caption_mix.enabled=true",
                              "losses.perturbations.embedding_noise.enabled=true"))
    like_stage_one(d.student)
    batch = next(iter(d.data.epoch_batches(0)))
    assert "pixel_values" in batch and "latent_mean" not in batch  # the latent cache is off for train_vae
    pixels = batch["pixel_values"][:2]
    reference = teacher_outputs(d.teacher, pixels)
    vae_before = params(d.e2e.vae)
    encoders_before = {n: params(m) for n, m in d.e2e.text_encoders.items()}
    assert [g["lr"] for g in d.optimizer.param_groups] == [3e-4, 1e-3, 1e-3]  # student, vae, encoders

    logs = [d.step(batch) for _ in range(2)]
    for name in ("loss/vae_recon", "loss/vae_kl", "loss/vae_align", "drift/text_encoder", "loss/eps",
                 "loss/perturb/caption_mix", "loss/perturb/embedding_noise"):
        assert name in logs[-1]
    assert logs[0]["loss/vae_align"] == 0.0 and logs[-1]["loss/vae_align"] > 0  # moved off the teacher's latents
    assert logs[-1]["drift/text_encoder"] > 0

    # The teacher: same encodings and predictions, bit for bit; no grad, no requires_grad.
    assert all(torch.equal(a, b) for a, b in zip(reference, teacher_outputs(d.teacher, pixels)))
    for module in d.teacher.modules().values():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    # The student side (full mode): every trainable part moved.
    assert changed(vae_before, d.e2e.vae)
    assert set(encoders_before) == ({"text_encoder"} if family == "sd15" else {"text_encoder", "text_encoder_2"})
    assert all(changed(before, d.e2e.text_encoders[n]) for n, before in encoders_before.items())


def test_diffusion_losses_do_not_reach_the_vae_by_default(tiny_teachers, tmp_path):
    def vae_grads_from_diffusion(*overrides: str) -> list:
        d = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "training.train_vae=true", *overrides))
        like_stage_one(d.student)
        batch = next(iter(d.data.epoch_batches(0)))
        x0, _, _ = d.e2e.latents(batch["pixel_values"], d.gen)
        noise = torch.randn(x0.shape, generator=d.gen)
        t = torch.full((x0.shape[0],), 500)
        cond = d.teacher.encode_prompt(list(batch["caption"]))
        # Only the diffusion terms: student eps vs noise and vs the teacher's eps.
        x_t = d.schedule.add_noise(x0, noise, t)
        s_eps = d.objective.student_eps(x_t, t, cond)
        ((s_eps - noise).square().mean() + (s_eps - d.teacher.predict_eps(x_t, t, cond)).square().mean()).backward()
        return [p.grad for p in d.e2e.vae.parameters()]

    assert all(g is None for g in vae_grads_from_diffusion())  # stop-gradient
    with pytest.warns(UserWarning, match="collapses the latent space"):
        grads = vae_grads_from_diffusion("e2e.diffusion_grad_to_vae=true")
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_lora_mode_trains_adapters_only_and_resumes(tiny_teachers, tmp_path):
    lora = (*E2E, "e2e.vae_mode=lora", "e2e.text_encoder_mode=lora", "e2e.lora_rank=2", "e2e.lora_alpha=2",
            "optimizer.vae_lr=1e-3", "optimizer.text_encoder_lr=1e-3", "training.checkpoint_every=1")
    d = Distiller(tiny_recipe(tiny_teachers["sdxl"], tmp_path / "run", *lora))
    like_stage_one(d.student)
    parts = d.e2e.modules()
    before = {n: params(m) for n, m in parts.items()}
    assert all("lora_" in n for m in parts.values() for n, p in m.named_parameters() if p.requires_grad)
    d.fit()
    for name, module in parts.items():
        assert changed(before[name], module, only="lora_B"), name  # B starts at 0: the adapter learnt
        assert not changed(before[name], module, only="base_layer"), name  # the copy's base is frozen

    latest = ckpt.find_latest(tmp_path / "run")
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert sorted(p.name for p in (latest / name).iterdir()) == ["adapter_config.json", LORA_WEIGHTS]
    # Resume within the stage restores the adapters (and the optimizer with its groups).
    again = Distiller(tiny_recipe(tiny_teachers["sdxl"], tmp_path / "run", *lora, "training.resume=latest"))
    assert again.maybe_resume() and again.state.step == 2
    for name, module in again.e2e.modules().items():
        assert not changed(params(parts[name]), module), name
    # Sampling/export side: the adapters merged into copies of the teacher's parts (plain modules,
    # the same function as base + adapter).
    side = load_student_side(latest, again.teacher)
    assert side.vae is not again.teacher.vae
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    tokenizer = again.teacher.front.tokenizer
    ids = tokenizer(["a red circle", "a blue square"], padding="max_length", return_tensors="pt",
                    max_length=tokenizer.model_max_length).input_ids
    with torch.no_grad():
        for name, module in parts.items():
            merged = getattr(side, name)
            assert not any("lora_" in n for n, _ in merged.named_parameters()), name
            if name == "vae":
                want, got = module.eval().encode(pixels).latent_dist.mean, merged.encode(pixels).latent_dist.mean
            else:
                want, got = module.eval()(ids.to(torch.long))[0], merged(ids.to(torch.long))[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert not torch.equal(got, getattr(again.teacher, name)(ids)[0] if name != "vae" else
                                   again.teacher.vae.encode(pixels).latent_dist.mean), name  # the adapter counts

    # Export writes the merged parts as plain components; from_pretrained gives the same VAE back.
    from sitdistill.apps.export import export_diffusers, resolve_checkpoint
    from sitdistill.students.pipeline import SiTPipeline

    out = export_diffusers(resolve_checkpoint(latest), tmp_path / "export")
    pipe = SiTPipeline.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(pipe.vae.encode(pixels).latent_dist.mean, side.vae.encode(pixels).latent_dist.mean)
        torch.testing.assert_close(pipe.text_encoder_2(ids)[0], side.text_encoder_2(ids)[0])


def test_stage_two_starts_from_a_stage_one_checkpoint(tiny_teachers, tmp_path):
    teacher = tiny_teachers["sd15"]
    Distiller(tiny_recipe(teacher, tmp_path / "stage1", "training.max_steps=1")).fit()
    stage1 = ckpt.find_latest(tmp_path / "stage1")
    r = load_recipe(ROOT / "recipes" / "toy_e2e.yaml", [
        f"teacher.source={teacher}", f"output.dir={tmp_path / 'stage2'}", f"training.init_from={tmp_path / 'stage1'}",
        "student.hidden_size=32", "student.depth=2", "student.num_heads=2", "data.toy.num_images=24",
        "losses.features.student_blocks=[1]", "training.batch_size=4", "training.max_steps=1",
        "optimizer.warmup_steps=0"])
    assert r.training.train_vae and r.training.train_text_encoder
    d = Distiller(r)
    assert not d.maybe_resume() and d.state.step == 0  # a new stage: fresh step and optimizer
    student = dict(d.student.named_parameters())
    saved = ckpt.load_file(next((stage1 / "student").glob("*.safetensors")))
    assert all(torch.equal(student[k], v) for k, v in saved.items())
    assert load_student_side(stage1, d.teacher) is None  # stage 1 holds no student-side parts

    d.fit()
    d.sample_grid(99, None)  # the student column samples with the student-side encoders and VAE
    assert (tmp_path / "stage2" / "samples" / "step-0000099.png").is_file()
    stage2 = ckpt.find_latest(tmp_path / "stage2")
    assert {"vae", "text_encoder", "student", "ema"} <= {p.name for p in stage2.iterdir()}
    side = load_student_side(stage2, d.teacher)
    assert not changed(params(d.e2e.vae), side.vae)
    pixels = next(iter(d.data.epoch_batches(0)))["pixel_values"]
    assert reconstruction_psnr(side, pixels) > 0

    # Sampling and export use the student-side VAE and text encoder of a stage-2 checkpoint.
    from sitdistill.apps.export import build_pipeline, resolve_checkpoint

    pipe = build_pipeline(resolve_checkpoint(tmp_path / "stage2"))
    assert not changed(params(d.e2e.vae), pipe.vae)
    assert changed(params(d.teacher.vae), pipe.vae)

    # ... and so does the evaluation report (the student column, its noise-prediction inputs).
    import json

    from sitdistill import cli

    report = tmp_path / "report"
    assert cli.main(["eval", str(tmp_path / "stage2"), "--out", str(report), "--num_prompts", "2",
                     "--num_inference_steps", "2", "--timestep_bins", "2"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert len(metrics["noise_mse"]["student"]) == 2 and (report / "report.md").is_file()
    # VAE reconstruction: the student's own VAE vs the teacher's, on the same drawn toy images.
    from sitdistill.data.toy import draw, spec_from_caption
    from sitdistill.evaluation.evaluate import toy_reconstruction_psnr

    recon = metrics["recon_psnr"]
    assert recon["student"] != recon["teacher"]
    images = torch.stack([torch.from_numpy(np.asarray(draw(spec_from_caption(p, 64, 64, seed=i)))).permute(2, 0, 1)
                          for i, p in enumerate(metrics["prompts"])]).float() / 127.5 - 1
    assert recon["student"] == pytest.approx(reconstruction_psnr(side, images), rel=1e-5)
    again = toy_reconstruction_psnr({"t": d.teacher}, metrics["prompts"], height=64, width=64, batch_size=1)
    assert again["t"] == pytest.approx(recon["teacher"], rel=1e-5)


@pytest.mark.parametrize("repa", [False, True])
def test_only_the_alignment_term_reaches_the_vae_on_the_repa_path(tiny_teachers, tmp_path, repa):
    """VAE losses at weight 0: by default no step term moves the VAE; with feature_grad_to_vae
    the feature-alignment term does (REPA-E's end-to-end path)."""
    d = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / "run", "training.train_vae=true",
                              "e2e.vae_recon=0", "e2e.vae_kl=0", "e2e.vae_align=0", "losses.feature=0.5",
                              "losses.features.student_blocks=[1]", "losses.features.teacher_modules=[mid_block]",
                              "losses.features.projector_hidden=16", f"e2e.feature_grad_to_vae={str(repa).lower()}"))
    like_stage_one(d.student)
    before = params(d.e2e.vae)
    d.step(next(iter(d.data.epoch_batches(0))))
    assert changed(before, d.e2e.vae) == repa


def test_the_repa_path_trains_beside_the_vae_losses(tiny_teachers, tmp_path):
    """feature_grad_to_vae with the VAE's own terms on: the REPA-E backward keeps the VAE encoder's
    graph, which the main backward (reconstruction, KL, alignment) needs too, and both reach the VAE."""
    common = ("training.train_vae=true", "losses.feature=0.5", "losses.features.student_blocks=[1]",
              "losses.features.teacher_modules=[mid_block]", "losses.features.projector_hidden=16")
    grads = {}
    for repa in (False, True):
        d = Distiller(tiny_recipe(tiny_teachers["sd15"], tmp_path / f"run{repa}", *common,
                                  f"e2e.feature_grad_to_vae={str(repa).lower()}"))
        like_stage_one(d.student)
        batch = next(iter(d.data.epoch_batches(0)))
        d.optimizer.step = lambda *a, **k: None  # keep the gradients to compare them
        d.optimizer.zero_grad = lambda *a, **k: None
        d.step(batch)
        grads[repa] = torch.cat([p.grad.flatten() for p in d.e2e.vae.parameters() if p.grad is not None])
    assert torch.isfinite(grads[True]).all()
    assert not torch.equal(grads[True], grads[False])  # the alignment term's gradient is added on top
