"""Every cross-key conflict is caught by `cli.py run --dry_run`, before any model is loaded.

The conflicts below used to surface only after the teacher and the data were loaded (the
end-to-end stage's, FSDP's) or at the first sample grid, hours in (the sampler against a
zero-terminal-SNR teacher, a sampling size off the VAE x patch grid). Loading a teacher fails
these tests; each must be exit 2 with one line naming the key.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sitdistill import cli
from sitdistill.core.recipe import RecipeError, load_recipe
from sitdistill.train.validate import check_loaded, validate_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "toy.yaml")
DATA_FREE = ("losses.eps=0", "losses.teacher=0", "losses.feature=0", "losses.perturb=1",
             "losses.perturbations.trajectory.enabled=true")

CONFLICTS = [
    ("fsdp in fp16", ["training.fsdp=true", "training.mixed_precision=fp16"], "training.fsdp"),
    ("fsdp with the end-to-end stage", ["training.fsdp=true", "training.train_vae=true"], "training.fsdp"),
    ("fsdp with Muon", ["training.fsdp=true", "optimizer.name=muon"], "optimizer.name"),
    ("a fused kernel for Muon", ["optimizer.name=muon", "optimizer.fused=true"], "optimizer.fused"),
    ("a student VAE with no images", ["training.train_vae=true", *DATA_FREE], "training.train_vae"),
    ("REPA-E gradient without a student VAE", ["e2e.feature_grad_to_vae=true"], "e2e.feature_grad_to_vae"),
    ("REPA-E gradient without feature alignment", ["e2e.feature_grad_to_vae=true", "training.train_vae=true",
                                                   "losses.feature=0"], "e2e.feature_grad_to_vae"),
    ("REPA-E gradient in fp16", ["e2e.feature_grad_to_vae=true", "training.train_vae=true",
                                 "training.mixed_precision=fp16"], "e2e.feature_grad_to_vae"),
    ("trajectories with student text encoders", ["training.train_text_encoder=true", "losses.perturb=1",
                                                 "losses.perturbations.trajectory.enabled=true"],
     "losses.perturbations.trajectory"),
    ("sampling height off the grid", ["sampling.height=60"], "sampling.height"),
    ("sampling width off the grid", ["sampling.width=36"], "sampling.width"),
    ("a sampler that cannot follow zero terminal SNR", ["teacher.zero_terminal_snr=true", "sampling.scheduler=heun"],
     "sampling.scheduler"),
    ("trajectory prompts from no file", ["losses.perturb=1", "losses.perturbations.trajectory.enabled=true",
                                         "losses.perturbations.trajectory.prompts=prompt_file"],
     "losses.perturbations.prompt_file.path"),
    ("alignment on trajectory states with no feature weight", ["losses.feature=0", "losses.perturb=1",
                                                               "losses.perturbations.trajectory.enabled=true",
                                                               "losses.perturbations.trajectory.align=true"],
     "losses.perturbations.trajectory.align"),
    ("alignment on trajectory states with the trajectory part off", ["losses.perturbations.trajectory.align=true"],
     "losses.perturbations.trajectory.align"),
    ("CFG pairs in a data-free run", ["losses.eps=0", "losses.teacher=0", "losses.perturb=1",
                                      "losses.perturbations.trajectory.enabled=true",
                                      "losses.perturbations.trajectory.align=true", "losses.guidance_pairs=1"],
     "losses.guidance_pairs"),
    ("CFG pairs with a guided target", ["losses.guidance_pairs=1", "losses.guided_teacher=true"],
     "losses.guidance_pairs"),
    ("CFG pairs in a batch of one", ["losses.guidance_pairs=1", "training.batch_size=1"], "losses.guidance_pairs"),
    ("CFG pairs with student text encoders", ["losses.guidance_pairs=1", "training.train_text_encoder=true"],
     "losses.guidance_pairs"),
]


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    import sitdistill.train.build
    import sitdistill.teachers
    import sitdistill.teachers.sd

    monkeypatch.setattr(sitdistill.train.build, "load_teacher_from_recipe", refuse)
    monkeypatch.setattr(sitdistill.teachers.sd, "load_teacher", refuse)
    monkeypatch.setattr(sitdistill.teachers, "load_teacher", refuse)


@pytest.mark.parametrize("name, overrides, key", CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_dry_run_catches_the_conflict_without_loading_a_model(name, overrides, key, tmp_path, capsys,
                                                               no_model_loads):
    out = tmp_path / "run"
    code = cli.main(["run", RECIPE, f"output.dir={out}", *overrides, "--dry_run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and key in err[0], err
    assert not out.exists()


def test_the_shipped_recipes_pass_the_dry_run(tmp_path, capsys, no_model_loads):
    for recipe, extra in (("toy.yaml", []), ("toy_sd15.yaml", []), ("toy_e2e.yaml", ["training.init_from=null"])):
        argv = ["run", str(ROOT / "recipes" / recipe), f"output.dir={tmp_path / recipe}", *extra, "--dry_run"]
        assert cli.main(argv) == 0
    capsys.readouterr()


def test_a_zero_terminal_snr_folder_is_read_from_its_scheduler_config(tmp_path):
    folder = tmp_path / "teacher"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"rescale_betas_zero_snr": True}))
    r = load_recipe(RECIPE, [f"teacher.source={folder}", f"output.dir={tmp_path / 'run'}", "sampling.scheduler=lms"])
    with pytest.raises(RecipeError, match="'sampling.scheduler' is 'lms'"):
        validate_recipe(r)
    validate_recipe(load_recipe(RECIPE, [f"teacher.source={folder}", f"output.dir={tmp_path / 'run'}",
                                         "sampling.scheduler=ddim"]))


def test_a_teacher_module_missing_from_the_loaded_unet_names_the_key(tmp_path):
    """The one check that needs the teacher: feature-alignment module paths in its UNet."""
    from types import SimpleNamespace

    from torch import nn

    unet = nn.Module()
    unet.mid_block = nn.Identity()
    teacher = SimpleNamespace(unet=unet)
    student = SimpleNamespace(config=SimpleNamespace(guidance_embed=False))
    r = load_recipe(RECIPE, ["losses.features.teacher_modules=[middle_block]"])
    with pytest.raises(RecipeError, match="'losses.features.teacher_modules' names 'middle_block'"):
        check_loaded(r, teacher, student)
    notes = []
    check_loaded(load_recipe(RECIPE, ["losses.guided_teacher=true"]), teacher, student, notes.append)
    assert len(notes) == 1 and "guidance_embed" in notes[0]
