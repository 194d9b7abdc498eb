"""Export: a diffusers folder that SiTPipeline loads and that samples exactly like `cli.py sample`."""

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sitdistill.core import checkpoint as ckpt
from sitdistill.train.build import build_student_from_recipe, load_teacher_from_recipe
from sitdistill.core.recipe import to_yaml
from sitdistill.apps.sample_cli import add_export_arguments, add_sample_arguments, export_command, sample_command
from sitdistill.infer.samples import generators
from sitdistill.students.pipeline import SiTPipeline
from test_trainer import tiny_recipe
from tiny_models import make_tiny_sd15, make_tiny_sdxl

# Zero-initialised output layers make a fresh student predict 0; a little noise on every weight
# gives it a non-trivial output, like a (badly) trained one.
WEIGHT_NOISE = 0.05


def write_checkpoint(teacher_dir, run_dir, step: int = 2, seed: int = 0, *overrides: str):
    """A checkpoint in the trainer's layout (student/, ema/, recipe.yaml, COMPLETE) via the
    trainer's own builders and `save_checkpoint`, without spending time on training."""
    recipe = tiny_recipe(teacher_dir, run_dir, *overrides)
    teacher = load_teacher_from_recipe(recipe.teacher)
    torch.manual_seed(seed)
    student = build_student_from_recipe(recipe.student, teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(WEIGHT_NOISE * torch.randn(p.shape, generator=g))
    ema = copy.deepcopy(student)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.9)
    return ckpt.save_checkpoint(run_dir, step, models={"student": student, "ema": ema}, recipe_yaml=to_yaml(recipe))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    return {"sd15": write_checkpoint(make_tiny_sd15(base / "sd15", vae_blocks=3), base / "run_sd15"),
            "sdxl": write_checkpoint(make_tiny_sdxl(base / "sdxl", vae_blocks=3), base / "run_sdxl")}


def parse(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


PROMPTS = ["a red circle at the top left", "a blue square in the center"]
SETTINGS = dict(height=16, width=32, num_inference_steps=3, guidance_scale=3.0)


@pytest.mark.parametrize("family,scheduler", [("sd15", "euler_a"), ("sdxl", "dpm")])
def test_export_round_trip_gives_the_cli_images(checkpoints, tmp_path, family, scheduler):
    out = tmp_path / "pipeline"
    assert export_command(parse(add_export_arguments, [str(checkpoints[family]), "--out", str(out),
                                                      "--scheduler", scheduler])) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "SiTPipeline" and index["transformer"] == ["sitdistill.students.sit", "SiT"]
    assert (index["text_encoder_2"][0] is not None) == (family == "sdxl")
    assert (out / "recipe.yaml").is_file() and list((out / "transformer").glob("*.safetensors"))

    pipe = SiTPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    images = pipe(PROMPTS, negative_prompt="dark", generator=generators(4, 2), **SETTINGS).images

    argv = ["--checkpoint", str(checkpoints[family]), "--scheduler", scheduler, "--seed", "4",
            "--negative_prompt", "dark", "--output_dir", str(tmp_path / "cli")]
    for p in PROMPTS:
        argv += ["--prompt", p]
    for k, v in SETTINGS.items():
        argv += [f"--{k}", str(v)]
    assert sample_command(parse(add_sample_arguments, argv)) == 0
    for i, image in enumerate(images):
        cli = np.asarray(Image.open(tmp_path / "cli" / f"{i:04d}-seed{4 + i}.png"))
        assert image.size == (32, 16)
        np.testing.assert_array_equal(np.asarray(image), cli)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_exported_student_is_the_ema_or_raw_checkpoint_weights(checkpoints, tmp_path):
    from sitdistill.students import SiT

    source = checkpoints["sd15"]
    for weights, folder in (("ema", "ema"), ("raw", "student")):
        out = tmp_path / weights
        assert export_command(parse(add_export_arguments, [str(source), "--out", str(out), "--weights", weights])) == 0
        exported, saved = SiT.from_pretrained(out / "transformer"), SiT.from_pretrained(source / folder)
        assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), saved.state_dict().values()))
    # The recipe's sampler is the default; latents come out too.
    pipe = SiTPipeline.from_pretrained(tmp_path / "ema")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    latents = pipe("a red circle", output_type="latent", num_inference_steps=2, height=16, width=16).images
    assert latents.shape == (1, 4, 4, 4)


def test_export_refuses_a_folder_with_files(checkpoints, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    assert export_command(parse(add_export_arguments, [str(checkpoints["sd15"]), "--out", str(tmp_path)])) == 2
