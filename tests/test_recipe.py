"""Recipes: schema errors name the key and the file, inheritance, overrides, shipped recipes."""

from pathlib import Path

import pytest
import yaml

from sitdistill.core.recipe import RecipeError, all_keys, load_recipe, save_recipe, to_yaml

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_typed():
    r = load_recipe()
    assert r.training.batch_size == 8 and isinstance(r.optimizer.lr, float)
    assert r.teacher.source == "toy:sd15"


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    f = write(tmp_path / "r.yaml", "training:\n  batchsize: 4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    msg = str(e.value)
    assert "training.batchsize" in msg and str(f) in msg and "training.batch_size" in msg
    assert "\n" not in msg


def test_misplaced_key_suggests_its_real_section(tmp_path):
    f = write(tmp_path / "r.yaml", "training:\n  lr: 0.1\n")
    with pytest.raises(RecipeError, match=r"did you mean optimizer\.lr"):
        load_recipe(f)


def test_unknown_section(tmp_path):
    f = write(tmp_path / "r.yaml", "teachr:\n  source: x\n")
    with pytest.raises(RecipeError, match=r"unknown key 'teachr'.*did you mean teacher"):
        load_recipe(f)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    f = write(tmp_path / "r.yaml", "training:\n  batch_size: lots\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert "training.batch_size" in str(e.value) and "int" in str(e.value) and str(f) in str(e.value)


def test_mapping_where_value_expected(tmp_path):
    f = write(tmp_path / "r.yaml", "optimizer:\n  lr:\n    a: 1\n")
    with pytest.raises(RecipeError, match=r"optimizer\.lr.*float"):
        load_recipe(f)


def test_choices_are_checked():
    with pytest.raises(RecipeError, match=r"training\.mixed_precision.*no\|fp16\|bf16"):
        load_recipe(None, ["training.mixed_precision=fp8"])


def test_bare_no_is_the_choice_no(tmp_path):
    # YAML 1.1 reads a bare `no` as false; accelerate's configs spell mixed precision that way.
    f = write(tmp_path / "r.yaml", "training:\n  mixed_precision: no\n")
    assert load_recipe(f).training.mixed_precision == "no"
    assert load_recipe(None, ["training.mixed_precision=no"]).training.mixed_precision == "no"
    assert load_recipe(None, ["training.mixed_precision=bf16"]).training.mixed_precision == "bf16"


def test_extends_chain_and_override_order(tmp_path):
    write(tmp_path / "base.yaml", "name: base\ntraining:\n  batch_size: 4\n  seed: 7\noptimizer:\n  lr: 1e-4\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.yaml", "extends: ../base.yaml\nname: mid\ntraining:\n  batch_size: 2\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml", "extends: mid.yaml\nsampling:\n  prompts: [a, b]\n")
    r = load_recipe(leaf, ["training.seed=9", "sampling.prompts=[c]"])
    assert r.name == "mid"  # inherited from the middle of the chain
    assert r.training.batch_size == 2  # the nearer file wins
    assert r.optimizer.lr == pytest.approx(1e-4)  # 1e-4 without a dot is still a float
    assert r.training.seed == 9  # the command line wins last
    assert list(r.sampling.prompts) == ["c"]  # lists are replaced, not concatenated


def test_extends_cycle_is_reported_with_the_chain(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match=r"cycle in 'extends'.*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_recipe(tmp_path / "a.yaml")


def test_extends_missing_file(tmp_path):
    f = write(tmp_path / "a.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(f)


def test_error_in_parent_names_the_parent(tmp_path):
    parent = write(tmp_path / "parent.yaml", "data:\n  rooot: x\n")
    child = write(tmp_path / "child.yaml", "extends: parent.yaml\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(child)
    assert str(parent) in str(e.value) and "data.root" in str(e.value)


def test_override_errors():
    with pytest.raises(RecipeError, match="not key=value"):
        load_recipe(None, ["training.seed"])
    with pytest.raises(RecipeError, match=r"unknown key 'student\.presett'.*student\.preset"):
        load_recipe(None, ["student.presett=B/2"])


def test_recipes_cannot_run_code(tmp_path):
    f = write(tmp_path / "evil.yaml", "name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(f)
    g = write(tmp_path / "env.yaml", "output:\n  dir: ${oc.env:HOME}\n")
    with pytest.raises(RecipeError, match="resolver"):
        load_recipe(g)


def test_interpolation_between_keys_resolves(tmp_path):
    f = write(tmp_path / "r.yaml", "training:\n  seed: 5\nsampling:\n  seed: ${training.seed}\n")
    assert load_recipe(f).sampling.seed == 5


def test_saved_recipe_reloads_identically(tmp_path):
    r = load_recipe(None, ["training.max_steps=3", "losses.perturbations.input_noise.enabled=true"])
    out = save_recipe(r, tmp_path / "run" / "recipe.yaml")
    assert load_recipe(out) == r
    assert "${" not in out.read_text()
    assert yaml.safe_load(out.read_text())["training"]["max_steps"] == 3


def test_recipe_is_read_only():
    r = load_recipe()
    with pytest.raises(Exception):
        r.training.batch_size = 3


def test_schema_keys_are_unique_and_dotted():
    keys = all_keys()
    assert len(keys) == len(set(keys))
    assert "losses.perturbations.trajectory.num_steps" in keys


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert r.name == path.stem
    assert to_yaml(r)
