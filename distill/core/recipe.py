"""Recipes: typed YAML for one distillation run.

A recipe is data only. It is read with omegaconf into the dataclasses of `sitdistill.core.schema` (a *structured config*),
so every key has a type and a default, and nothing in a YAML file can import or run code: YAML is
parsed with a safe loader, and interpolations may only reference other keys (`${training.seed}`),
never call a resolver (`${oc.env:...}` and friends are rejected).

    recipe = load_recipe("recipes/toy.yaml", ["training.max_steps=200", "student.preset=B/2"])

Inheritance: a file may say `extends: other.yaml` (relative to the file itself); chains are
allowed and a cycle is reported with the whole chain. Later files win; lists are replaced, not
concatenated (omegaconf's merge rule). Command-line overrides are applied last.

Errors are `RecipeError`s whose message is one line naming the key and the file: an unknown key
comes with the closest valid keys, a wrong type with the expected type, a value outside its
choices with the choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sitdistill.core.schema import Recipe


SECTIONS = tuple(f.name for f in dataclasses.fields(Recipe))
EXTENDS_KEY = "extends"


class RecipeError(ValueError):
    """A recipe problem, with a one-line message naming the key and the file."""


# ---------------------------------------------------------------------------------------------
# Schema introspection
# ---------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if get_origin(inner) is list:
        (item,) = get_args(inner) or (Any,)
        name = f"list of {getattr(item, '__name__', str(item))}"
    elif dataclasses.is_dataclass(inner):
        name = "a section (mapping)"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def all_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        inner, _ = _unwrap_optional(_hints(cls)[f.name])
        if dataclasses.is_dataclass(inner):
            keys.extend(all_keys(inner, key + "."))
    return keys


def _field_at(key: str) -> tuple[dataclasses.Field, Any]:
    cls: Any = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        f = fields[part]
        tp = _hints(cls)[part]
        if i == len(parts) - 1:
            return f, tp
        cls, _ = _unwrap_optional(tp)
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------
# Validation of raw YAML mappings against the schema (before omegaconf sees them), so that the
# messages can name the file and suggest keys.
# ---------------------------------------------------------------------------------------------


def _suggest(key: str) -> str:
    """Closest valid keys by their last component: `training.lr` points at `optimizer.lr`,
    `training.batchsize` at `training.batch_size`. Keys of the same section come first."""
    by_leaf: dict[str, list[str]] = {}
    for k in all_keys():
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    leaf = key.rsplit(".", 1)[-1]
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    found = [k for m in difflib.get_close_matches(leaf, list(by_leaf), n=4, cutoff=0.6) for k in by_leaf[m]]
    found.sort(key=lambda k: not k.startswith(section))  # stable: keeps match order within groups
    return f"; did you mean {', '.join(found[:3])}?" if found else ""


def _check_mapping(raw: Any, cls: type, prefix: str, where: str) -> None:
    if not isinstance(raw, dict):
        name = f"'{prefix.rstrip('.')}'" if prefix else "the recipe"
        raise RecipeError(f"{name} must be a section (mapping), got {type(raw).__name__} in {where}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str) or key not in names:
            raise RecipeError(f"unknown key '{full}' in {where}{_suggest(str(full))}")
        inner, optional = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(inner):
            if value is None and not optional:
                raise RecipeError(f"'{full}' must be a section (mapping), got null in {where}")
            if value is not None:
                _check_mapping(value, inner, full + ".", where)
        elif isinstance(value, dict):
            raise RecipeError(f"'{full}' expects {_type_name(hints[key])}, got a mapping in {where}")


_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


def _check_no_resolvers(raw: Any, where: str, path: str = "") -> None:
    """Interpolations may reference keys; resolvers (`${name:args}`) could read the environment
    or build objects, so a recipe may not use them."""
    if isinstance(raw, dict):
        for k, v in raw.items():
            _check_no_resolvers(v, where, f"{path}{k}.")
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            _check_no_resolvers(v, where, f"{path}{i}.")
    elif isinstance(raw, str):
        for ref in _INTERPOLATION.findall(raw):
            if ":" in ref:
                raise RecipeError(
                    f"'{path.rstrip('.')}' uses the resolver '${{{ref}}}' in {where}: recipes hold values "
                    "only; interpolations may reference other keys, e.g. ${training.seed}"
                )


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from None
    try:
        # SafeLoader: tags like !!python/object are refused, so YAML cannot build objects.
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"invalid YAML in {path}{at}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping of sections, got {type(raw).__name__} in {path}")
    return raw


def _load_chain(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """[(file, raw mapping)] from the root of the `extends` chain to `path`."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise RecipeError(f"cycle in 'extends': {cycle}")
    raw = _read_yaml(path)
    parent = raw.pop(EXTENDS_KEY, None)
    _check_mapping(raw, Recipe, "", str(path))
    _check_no_resolvers(raw, str(path))
    if parent is None:
        return [(path, raw)]
    if not isinstance(parent, str):
        raise RecipeError(f"'extends' must be a file path (str) in {path}")
    return _load_chain(path.parent / parent, chain + (path,)) + [(path, raw)]


def _parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not key=value")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key:
            raise RecipeError(f"override '{item}' has no key")
        try:
            value = load_yaml(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text  # a bare string such as `a: b` stays a string
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override '{item}' sets inside '{part}', which is a value")
        node[parts[-1]] = value
    return tree


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _merge(base: DictConfig, raw: dict, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, OmegaConf.create(raw))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        try:
            f, tp = _field_at(re.sub(r"\[\d+\]", "", key))
            expected = _type_name(tp)
        except (KeyError, TypeError):
            expected = "the schema's type"
        value = getattr(e, "msg", str(e)).splitlines()[0]
        raise RecipeError(f"'{key}' expects {expected} in {where} ({value})") from None


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true/false. YAML 1.1 (PyYAML's default) also reads a bare yes/no/
    on/off as a boolean, which turns `mixed_precision: no` (accelerate's spelling) into false; the
    schema's bool fields still accept yes/no/on/off as strings (omegaconf converts them)."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def load_yaml(text: str) -> Any:
    """A recipe's YAML (a file, an override's value, a checkpoint's recipe.yaml) with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_RecipeLoader)


def _check_choices(cfg: DictConfig, cls: type = Recipe, prefix: str = "") -> None:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = cfg[f.name]
        inner, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            if value is not None:
                _check_choices(value, inner, key + ".")
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            shown = "|".join("null" if c is None else str(c) for c in choices)
            raise RecipeError(f"'{key}' must be one of {shown}, got {value!r}")


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Read a recipe (following `extends`), apply `key=value` overrides, validate, resolve.

    Returns a read-only structured DictConfig whose attribute access is typed
    (`recipe.training.batch_size` is an int). Raises RecipeError with a one-line message.
    """
    cfg = OmegaConf.structured(Recipe)
    if path is not None:
        for file, raw in _load_chain(Path(path)):
            cfg = _merge(cfg, raw, str(file))
    if overrides:
        tree = _parse_overrides(overrides)
        _check_mapping(tree, Recipe, "", "the command-line overrides")
        _check_no_resolvers(tree, "the command-line overrides")
        cfg = _merge(cfg, tree, "the command-line overrides")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise RecipeError(f"cannot resolve '{key}': {str(e).splitlines()[0]}") from None
    _check_choices(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(recipe: DictConfig) -> str:
    """The resolved recipe as YAML (what `show-recipe` prints and `recipe.yaml` holds)."""
    return OmegaConf.to_yaml(recipe, resolve=True)


def save_recipe(recipe: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved recipe atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(to_yaml(recipe), encoding="utf-8")
    os.replace(tmp, path)
    return path


def as_dict(recipe: DictConfig | ListConfig, key: str | None = None) -> Any:
    """A plain-Python copy of the recipe (or of one section) to pass as keyword arguments."""
    node = OmegaConf.select(recipe, key) if key else recipe
    return OmegaConf.to_container(node, resolve=True)


def default_pixel_size(recipe: DictConfig) -> tuple[int, int]:
    """The sampling size of a recipe: `sampling.height/width`, else the square data resolution."""
    s = recipe.sampling
    return int(s.height or recipe.data.resolution), int(s.width or recipe.data.resolution)
