"""The layers of the code, bottom to top, and the rule that nothing imports from a layer above its own.

    core        distill/core: the recipe schema and its reading, the noise schedule, paths, exit
                codes, the CFG combination, the checkpoint format
    models      students/ (the SiT and its blocks), teachers/ (UNet, front end, toy teachers),
                data/ (folders, buckets, caches, the toy world)
    inference   distill/infer: samplers and sample grids; students/pipeline.py (the student's
                diffusers pipeline)
    evaluation  distill/evaluation: metrics, toy-world grading, the eval report
    training    distill/train: models built from a recipe, recipe validation, losses, the
                objective, the trainer, run I/O and the end-of-run report
    apps        distill/apps: what the CLI's commands run (export, sample/eval, study, curve,
                handoff, bench, data report)
    cli         cli.py

Every import is checked, those inside functions included (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("core", "models", "inference", "evaluation", "training", "apps", "cli")
PACKAGES = ("distill", "students", "teachers", "data")


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name of this project (None for a third-party module)."""
    parts = module.split(".")
    if parts[0] == "cli":
        return "cli"
    if parts[0] in ("students", "teachers", "data"):
        return "inference" if module == "students.pipeline" else "models"
    if parts[0] != "distill":
        return None
    if len(parts) == 1:
        return "core"  # the package itself (an empty __init__)
    return {"core": "core", "infer": "inference", "evaluation": "evaluation", "train": "training",
            "apps": "apps"}[parts[1]]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the file, resolved to module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from distill import x` names a module of distill; any other `from` names its module
            for alias in node.names:
                out.append((node.lineno, f"distill.{alias.name}" if node.module == "distill" else node.module))
    return out


def project_files() -> list[Path]:
    files = [ROOT / "cli.py"]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def test_every_distill_module_sits_in_a_layer():
    loose = [p.name for p in (ROOT / "distill").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules directly under distill/ belong in a layer folder: {loose}"


def test_nothing_imports_from_a_layer_above_its_own():
    wrong = []
    for path in project_files():
        own = layer_of(module_name(path))
        assert own is not None, path
        for line, target in imports_of(path):
            theirs = layer_of(target)
            if theirs is not None and ORDER.index(theirs) > ORDER.index(own):
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {target} ({theirs})")
    assert wrong == [], "imports from a higher layer:\n" + "\n".join(wrong)


@pytest.mark.parametrize("source, expected", [
    ("from distill.apps.study import run_study\n", "apps"),
    ("def f():\n    from distill.train.trainer import train\n", "training"),
    ("from distill.infer import sampling\n", "inference"),
])
def test_the_check_sees_top_level_and_lazy_imports(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    (line, target), = imports_of(path)
    assert layer_of(target) == expected
