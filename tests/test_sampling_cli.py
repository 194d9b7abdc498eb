"""Sampling teacher and student with every scheduler, and `cli.py sample` on a real checkpoint."""

import argparse

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sitdistill.core import checkpoint as ckpt
from sitdistill.apps.export import load_student, load_teacher_for, resolve_checkpoint
from sitdistill.apps.sample_cli import add_export_arguments, add_sample_arguments, export_command, sample_command
from sitdistill.infer.samples import sample_latents, student_fn
from sitdistill.infer.sampling import SCHEDULERS
from sitdistill.train.trainer import Distiller
from test_trainer import tiny_recipe
from tiny_models import make_tiny_sd15

# Every scheduler the issue names; dpm_sde needs torchsde, which is not a dependency.
SCHEDULER_NAMES = ["ddim", "ddpm", "euler", "euler_a", "dpm", "dpm_sde", "unipc", "heun", "lms", "pndm"]
SIZE = 16  # pixels: VAE factor 4 x patch 2 divides it


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 1-step toy run on a tiny SD1.5 teacher: run folder with checkpoint-1 (student + ema)."""
    import os

    base = tmp_path_factory.mktemp("sampling_cli")
    os.environ["SITDISTILL_CACHE"] = str(base / "cache")
    teacher = make_tiny_sd15(base / "teacher", vae_blocks=3)
    Distiller(tiny_recipe(teacher, base / "run", "data.toy.num_images=8", "training.max_steps=1")).fit()
    return base / "run"


@pytest.fixture(scope="module")
def models(run):
    source = resolve_checkpoint(run)
    teacher = load_teacher_for(source)
    return teacher, load_student(source, teacher=teacher)


def parse(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_samples_teacher_and_student(models, name):
    if name not in SCHEDULERS:
        pytest.skip(f"{name} is not in sitdistill.infer.sampling.SCHEDULERS (DPMSolverSDEScheduler needs torchsde)")
    teacher, student = models
    kw = dict(height=SIZE, width=SIZE, scheduler=name, steps=2, guidance_scale=3.0, negative_prompt="dark")
    prompts = ["a red circle at the top left", "a blue square in the center"]
    for fn in (teacher.predict_eps, student_fn(student)):
        a = sample_latents(fn, teacher, prompts, seed=5, **kw)
        assert a.shape == (2, 4, SIZE // 4, SIZE // 4) and torch.isfinite(a).all()
        # Image i is seeded with seed + i: the second prompt alone with seed 6 gives the same latent
        # (same noise, same model; only the batch differs).
        b = sample_latents(fn, teacher, prompts[::-1], seed=6, **kw)
        torch.testing.assert_close(b[0], a[1], rtol=0, atol=1e-5)
        # ... and another seed another one.
        assert not torch.allclose(b[1], a[0], atol=1e-3)


def test_sample_command_writes_pngs_with_their_settings(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# toy prompts\na red circle at the top left\n\na green square in the center\n")
    args = parse(add_sample_arguments, [
        "--checkpoint", str(run), "--prompt", "a blue diamond", "--prompts-file", str(prompts),
        "--negative_prompt", "blurry", "--height", "32", "--width", "16", "--num_inference_steps", "3",
        "--guidance_scale", "2.5", "--scheduler", "euler_a", "--seed", "7", "--output_dir", str(tmp_path / "out"),
        "--weights", "raw", "--batch_size", "2"])
    assert sample_command(args) == 0
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["0000-seed7.png", "0001-seed8.png", "0002-seed9.png"]
    img = Image.open(files[1])
    assert img.size == (16, 32)
    assert img.text["prompt"] == "a red circle at the top left"
    assert (img.text["seed"], img.text["sampler"], img.text["steps"], img.text["guidance_scale"]) == \
        ("8", "euler_a", "3", "2.5")
    assert img.text["negative_prompt"] == "blurry" and img.text["weights"] == "raw"
    assert img.text["checkpoint"].endswith("checkpoint-1")


def test_ema_and_raw_weights_are_the_checkpoints_folders(run):
    source = resolve_checkpoint(run)
    assert source.path.name == "checkpoint-1"  # a run folder resolves to its latest checkpoint
    for weights, folder in (("ema", "ema"), ("raw", "student")):
        state = load_file(next((source.path / folder).glob("*.safetensors")))
        model = load_student(source, weights=weights)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    ema, raw = load_student(source, weights="ema"), load_student(source, weights="raw")
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters()))


def test_seed_format_file_samples_like_the_checkpoint(run, tmp_path):
    assert export_command(parse(add_export_arguments, [str(run), "--out", str(tmp_path / "seed"),
                                                      "--format", "seed"])) == 0
    assert {p.name for p in (tmp_path / "seed").iterdir()} == {"sit_model.pt", "ema_model.pt", "config.json",
                                                              "recipe.yaml"}
    # The seed files hold the checkpoint's weights, and `sample` runs from one with no other flag.
    for name, folder in (("ema_model.pt", "ema"), ("sit_model.pt", "student")):
        saved = load_file(next((ckpt.find_latest(run) / folder).glob("*.safetensors")))
        state = torch.load(tmp_path / "seed" / name, weights_only=True)
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert sample_command(parse(add_sample_arguments, [
        "--checkpoint", str(tmp_path / "seed" / "ema_model.pt"), "--output_dir", str(tmp_path / "a"),
        "--prompt", "a red circle at the top left", "--height", "16", "--width", "16",
        "--num_inference_steps", "2", "--seed", "3"])) == 0
    assert Image.open(tmp_path / "a" / "0000-seed3.png").text["checkpoint"].endswith("ema_model.pt")
    # Without config.json, the architecture comes from the recipe (+ --model_size) and the teacher.
    (tmp_path / "seed" / "config.json").unlink()
    source = resolve_checkpoint(tmp_path / "seed" / "sit_model.pt")
    student = load_student(source, teacher=load_teacher_for(source))
    assert student.config.hidden_size == 32
    with pytest.raises(RuntimeError, match="does not fit"):
        load_student(source, teacher=load_teacher_for(source), model_size="S/2")


def test_parser_choices_match_the_library():
    import sitdistill.apps.export
    import sitdistill.apps.sample_cli

    assert sitdistill.apps.sample_cli.WEIGHTS == sitdistill.apps.export.WEIGHTS


def test_bad_checkpoint_is_a_usage_error(tmp_path):
    args = parse(add_sample_arguments, ["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"])
    assert sample_command(args) == 2
    args = parse(add_sample_arguments, ["--checkpoint", str(tmp_path), "--scheduler", "nope"])
    assert sample_command(args) == 2


def test_explicit_empty_negative_is_encoded_and_none_is_the_pipeline_default(tmp_path):
    """diffusers' SDXL rule: negative_prompt None -> zeros (force_zeros_for_empty_prompt); "" -> encoded."""
    from sitdistill.infer.sampling import make_scheduler, sample
    from sitdistill.teachers import load_teacher
    from tiny_models import make_tiny_sdxl

    teacher = load_teacher(make_tiny_sdxl(tmp_path / "sdxl"))
    fn = teacher.predict_eps
    kw = dict(height=16, width=16, scheduler="ddim", steps=2, guidance_scale=4.0, seed=3)
    none, empty = (sample_latents(fn, teacher, ["a red circle"], negative_prompt=n, **kw) for n in (None, ""))
    assert not torch.allclose(none, empty)
    cond, uncond = teacher.encode_prompt(["a red circle"], [""])
    assert uncond["encoder_hidden_states"].abs().sum() > 0  # "" is encoded, not zeroed
    ref = sample(fn, make_scheduler("ddim", teacher.scheduler_config), cond=cond, uncond=uncond, shape=(1, 4, 8, 8),
                 guidance_scale=4.0, num_inference_steps=2, generator=[torch.Generator().manual_seed(3)])
    torch.testing.assert_close(empty, ref)


def test_a_pipeline_call_without_a_generator_uses_the_global_random_state(run, tmp_path):
    from sitdistill.apps.export import build_pipeline

    pipe = build_pipeline(resolve_checkpoint(run))
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="latent")
    torch.manual_seed(1)
    a = pipe("a red circle", **kw).images
    b = pipe("a red circle", **kw).images
    torch.manual_seed(1)
    c = pipe("a red circle", **kw).images
    assert not torch.allclose(a, b) and torch.equal(a, c)


def test_handoff_runs_each_model_on_its_side_of_the_timestep(models):
    from sitdistill.apps.handoff import handoff
    from sitdistill.infer.sampling import Denoiser, teacher_denoiser

    teacher, student = models
    t_fn, s_fn = teacher_denoiser(teacher), student_fn(student)
    kw = dict(height=SIZE, width=SIZE, scheduler="ddim", steps=4, guidance_scale=3.0, seed=3)
    prompts = ["a red circle at the top left"]
    alone = {name: sample_latents(fn, teacher, prompts, **kw) for name, fn in (("teacher", t_fn), ("student", s_fn))}
    # Above every timestep: the teacher throughout; at 0: the student throughout; between: neither.
    torch.testing.assert_close(sample_latents(handoff(s_fn, t_fn, 1000), teacher, prompts, **kw), alone["teacher"],
                               rtol=0, atol=0)
    torch.testing.assert_close(sample_latents(handoff(s_fn, t_fn, 0), teacher, prompts, **kw), alone["student"],
                               rtol=0, atol=0)
    mixed = sample_latents(handoff(s_fn, t_fn, 500), teacher, prompts, **kw)
    assert not torch.equal(mixed, alone["teacher"]) and not torch.equal(mixed, alone["student"])
    with pytest.raises(ValueError, match="handoff between"):
        handoff(s_fn, Denoiser(s_fn.fn, "v_prediction"), 500)


def test_handoff_command_writes_its_table(run, tmp_path):
    import json

    from sitdistill import cli

    out = tmp_path / "handoff"
    assert cli.main(["handoff", str(run), "--at", "1000", "0", "--num_prompts", "2", "--output_dir", str(out)]) == 0
    rates = json.loads((out / "handoff.json").read_text())["rates"]
    assert list(rates) == ["the teacher throughout", "the student throughout",
                           "the student for t >= 1000, the teacher below", "the student for t >= 0, the teacher below",
                           "the teacher for t >= 1000, the student below", "the teacher for t >= 0, the student below"]
    assert rates["the student for t >= 1000, the teacher below"] == rates["the teacher throughout"]
    assert rates["the teacher for t >= 0, the student below"] == rates["the teacher throughout"]
    assert rates["the student for t >= 0, the teacher below"] == rates["the student throughout"]
    assert "| who denoises |" in (out / "handoff.md").read_text()
    assert cli.main(["handoff", str(tmp_path / "missing")]) == 2
