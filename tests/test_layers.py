"""The layers of the code, bottom to top, and the rule that nothing imports from a layer above its own.

The installed package is `sitdistill` (pyproject's package-dir): distill/ is the package itself,
students/, teachers/ and data/ are sitdistill.students, .teachers and .data.

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
    cli         distill/cli.py (sitdistill.cli), and cli.py, the launcher at the repository root

Every import is checked, those inside functions included (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("core", "models", "inference", "evaluation", "training", "apps", "cli")
# folder -> installed package name (pyproject's [tool.setuptools.package-dir])
FOLDERS = {"distill": "sitdistill", "students": "sitdistill.students", "teachers": "sitdistill.teachers",
           "data": "sitdistill.data"}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name of this project (None for a third-party module)."""
    parts = module.split(".")
    if module in ("cli", "sitdistill.cli"):
        return "cli"
    if parts[0] != "sitdistill":
        return None
    if len(parts) == 1:
        return "core"  # the package itself (an empty __init__)
    if parts[1] in ("students", "teachers", "data"):
        return "inference" if module == "sitdistill.students.pipeline" else "models"
    return {"core": "core", "infer": "inference", "evaluation": "evaluation", "train": "training",
            "apps": "apps"}[parts[1]]


def module_name(path: Path) -> str:
    """The installed dotted name of a file of the repository."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    if parts[0] not in FOLDERS:
        return ".".join(parts)  # cli.py at the root
    return ".".join((FOLDERS[parts[0]], *parts[1:]))


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the file, resolved to module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from sitdistill import x` names a module of the package; any other `from` names its module
            for alias in node.names:
                out.append((node.lineno, f"sitdistill.{alias.name}" if node.module == "sitdistill" else node.module))
    return out


def project_files() -> list[Path]:
    files = [ROOT / "cli.py"]
    for package in FOLDERS:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def test_every_distill_module_sits_in_a_layer():
    loose = [p.name for p in (ROOT / "distill").glob("*.py") if p.name not in ("__init__.py", "cli.py")]
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
    ("from sitdistill.apps.study import run_study\n", "apps"),
    ("def f():\n    from sitdistill.train.trainer import train\n", "training"),
    ("from sitdistill.infer import sampling\n", "inference"),
])
def test_the_check_sees_top_level_and_lazy_imports(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    (line, target), = imports_of(path)
    assert layer_of(target) == expected


def test_the_package_dir_maps_every_folder_and_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert config["package-dir"] == {name: folder for folder, name in FOLDERS.items()}
    packages = sorted(module_name(p.parent) for folder in FOLDERS for p in (ROOT / folder).rglob("__init__.py"))
    assert sorted(config["packages"]) == packages
    assert "py-modules" not in config  # no top-level module either (cli.py is a launcher, not installed)


def test_every_import_of_the_project_goes_through_the_one_namespace():
    """An import by a folder's name (`import data`, `from students import ...`) would work from the
    repository root only, and load a second copy of the module beside the sitdistill one."""
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {target}"
             for path in project_files() + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
             for line, target in imports_of(path) if target.split(".")[0] in FOLDERS]
    assert wrong == [], "\n".join(wrong)


def test_the_install_puts_one_package_at_the_top_level(tmp_path):
    """Outside the repository, `sitdistill` and its subpackages import, and the folders' generic
    names (`data`, `distill`, `students`, `teachers`) do not: they cannot shadow a user's modules."""
    code = ("import importlib.util as u, sitdistill.cli, sitdistill.students.sit, sitdistill.teachers.single_file as s;"
            "print([n for n in ('distill', 'students', 'teachers', 'data', 'cli') if u.find_spec(n)]);"
            "print(s.CONFIGS.is_dir())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["[]", "True"]
