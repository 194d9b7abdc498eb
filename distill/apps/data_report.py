"""`cli.py data-report DIR [RECIPE]`: what a folder gives a run, before the run."""

from __future__ import annotations

from sitdistill.data.folder import data_report as folder_report
from sitdistill.data.pipeline import _NOT_FOLDER_KEYS
from sitdistill.core.recipe import as_dict, load_recipe


def data_report(root: str, recipe: str | None = None, overrides: list[str] | None = None) -> str:
    """Scan `root` with the data settings of `recipe` (or the defaults) and describe it."""
    overrides = list(overrides or [])
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        overrides.insert(0, recipe)  # `data-report DIR key=value`: no recipe, just overrides
        recipe = None
    r = load_recipe(recipe, overrides)
    fields = {k: v for k, v in as_dict(r, "data").items() if k not in _NOT_FOLDER_KEYS}
    return folder_report(root, batch_size=r.training.batch_size, **fields)
