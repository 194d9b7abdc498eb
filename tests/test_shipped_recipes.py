"""Every shipped recipe builds: toy recipes with tiny stand-in teachers, real-size ones on `meta`
(no memory, no download), so a typo or a shape mismatch in any of them cannot hide."""

from pathlib import Path

import pytest
import torch

from sitdistill.data.buckets import validate_step
from sitdistill.train.validate import check_names
from sitdistill.train.plan import FAMILY_COND_DIMS
from sitdistill.core.recipe import RecipeError, load_recipe
from sitdistill.students import PRESETS, build_student

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
REAL_VAE_FACTOR = 8  # SD1.5 and SDXL VAEs


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_builds(path, tiny_teachers, tmp_path, monkeypatch):
    recipe = load_recipe(path)
    check_names(recipe)
    if recipe.teacher.source.startswith("toy:"):
        from sitdistill.train.trainer import Distiller

        monkeypatch.setenv("SITDISTILL_CACHE", str(tmp_path / "cache"))
        family = recipe.teacher.source.split(":", 1)[1]
        d = Distiller(load_recipe(path, [f"teacher.source={tiny_teachers[family]}", f"output.dir={tmp_path / 'run'}",
                                         "data.toy.num_images=8", "training.batch_size=2",
                                         "training.init_from=null"]))  # (stage-2 recipes name stage 1's run)
        assert d.teacher.family == family
        out = d.student(torch.zeros(1, 4, 8, 8), torch.tensor([10]),
                        **d.teacher.encode_prompt(["a red circle in the center"]))
        assert out.shape == (1, 4, 8, 8)
        return
    family = recipe.teacher.family
    assert family in FAMILY_COND_DIMS, f"{path.name}: a real-size recipe names its teacher family"
    validate_step(recipe.data.bucket_step, REAL_VAE_FACTOR, PRESETS[recipe.student.preset]["patch_size"])
    with torch.device("meta"):
        student = build_student(recipe.student.preset, cond_dims=FAMILY_COND_DIMS[family],
                                qk_norm=recipe.student.qk_norm, prediction_type=recipe.student.prediction_type)
    n = sum(p.numel() for p in student.parameters())
    assert n > 100e6
    side = recipe.data.resolution // REAL_VAE_FACTOR
    assert side % student.config.patch_size == 0


def test_names_are_checked_against_their_dicts():
    with pytest.raises(RecipeError, match=r"student\.preset.*XL/2"):
        check_names(load_recipe(None, ["student.preset=XXL/2"]))
    with pytest.raises(RecipeError, match=r"sampling\.scheduler.*euler_a"):
        check_names(load_recipe(None, ["sampling.scheduler=eulera"]))
