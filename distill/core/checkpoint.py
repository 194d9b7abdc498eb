"""Atomic training checkpoints with rotation and exact resume.

Layout of `run_dir/checkpoint-{step}/` (the diffusers/accelerate folder name):

    student/, ema/, ...   one folder per model, written by `save_pretrained` (config + safetensors),
                          so `from_pretrained` loads any of them on its own
    optimizer.pt          optimizer.state_dict()
    lr_scheduler.pt       lr_scheduler.state_dict()
    state/<name>.pt       state_dict() of every extra stateful object (sampler, grad scaler, ...)
    rng_state.pt          python `random`, numpy, torch CPU/CUDA and named torch.Generator states,
                          one entry per process rank
    train_state.json      step, epoch, data position, ... (whatever the trainer passes; JSON types)
    recipe.yaml           the fully resolved recipe of the run
    COMPLETE              written last: the marker `find_latest` looks for; a JSON manifest
                          holding the SHA-256 of every other file, verified on load

Atomicity: everything is written into `run_dir/.tmp-checkpoint-{step}-XXXX/` and the folder is
renamed to `checkpoint-{step}` only after the marker is in it. A rename within one file system is
atomic, so an exception or a kill during a save never leaves a `checkpoint-*` folder that looks
finished: `find_latest` still returns the previous checkpoint. Leftover temporary folders are
removed by the next save. (This guards against a killed process, not against power loss: files
are not fsync'ed.)

Damage after the fact (a truncated file, a corrupt JSON, a missing folder) is caught on load:
`load_checkpoint` verifies the manifest's checksums first and raises `CheckpointDamaged` naming
the file (an intact checkpoint that does not fit the run raises `CheckpointIncompatible`
instead, and is never moved). `move_aside` renames a damaged checkpoint to `damaged-checkpoint-{step}` (never deletes
it), so that `find_latest` falls back to the previous one. A full disk during a save raises
`CheckpointWriteError` saying so; the previous checkpoint stays the latest.

Every `.pt` file holds only tensors and plain Python values and is read back with
`torch.load(weights_only=True)`. Only the main process writes; the other processes pass
`is_main_process=False` (and their RNG states through `rng_states`, gathered by the trainer).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
TRASH_PREFIX = ".trash-" + CHECKPOINT_PREFIX
COMPLETE = "COMPLETE"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "lr_scheduler.pt"
RNG_FILE = "rng_state.pt"
TRAIN_STATE_FILE = "train_state.json"
RECIPE_FILE = "recipe.yaml"
EXTRA_DIR = "state"
FORMAT_VERSION = 2  # 2: COMPLETE holds the files' SHA-256 (format 1 checkpoints load unverified)
DAMAGED_PREFIX = "damaged-"
HASH_CHUNK = 1 << 22


class CheckpointDamaged(RuntimeError):
    """A checkpoint that cannot be loaded as saved (the message names the file and the reason)."""


class CheckpointIncompatible(RuntimeError):
    """An intact checkpoint (its checksums hold) that does not fit the objects it is loaded into."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, ...); the previous checkpoint is untouched."""


class UnsafeFileError(RuntimeError):
    """A pickle file holding more than tensors and plain values, refused by `load_weights_only`."""


def load_weights_only(path: str | os.PathLike, **kwargs):
    """`torch.load(path, weights_only=True)`, with a refusal that names the file and says why.

    A pickle that needs anything but tensors and plain Python values to load could run code, so it
    is never loaded; the error does not suggest turning the protection off."""
    import pickle

    try:
        return torch.load(str(path), map_location=kwargs.pop("map_location", "cpu"), weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        text = str(e)
        needs = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported class [\w.]+)", text)
        if needs is None:  # not a refusal of an object: the file is not a (complete) torch pickle
            raise UnsafeFileError(f"{path} is not a readable torch checkpoint (truncated, or not a checkpoint at "
                                  "all, e.g. an error page saved by a failed download)") from None
        raise UnsafeFileError(f"refused to load {path}: it is a pickle that needs {needs.group(1)} to load, and "
                              "such a pickle can run code. Only tensors and plain values are read from .pt/.ckpt "
                              "files; convert it to .safetensors where it came from, or use a source you trust "
                              "that ships safetensors") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE}


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The manifest of a complete checkpoint, after checking every file against its checksum.
    Raises CheckpointDamaged naming the first bad file."""
    path = Path(path)
    try:
        manifest = json.loads((path / COMPLETE).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(f"{path / COMPLETE} is unreadable ({e})") from None
    for rel, expected in (manifest.get("files") or {}).items():
        file = path / rel
        if not file.is_file():
            raise CheckpointDamaged(f"{file} is missing")
        if file_sha256(file) != expected:
            raise CheckpointDamaged(f"{file} does not match its checksum (truncated or changed after the save)")
    return manifest


def move_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged checkpoint to `damaged-checkpoint-{step}[-k]` beside it; returns the new path."""
    path = Path(path)
    target = path.with_name(DAMAGED_PREFIX + path.name)
    k = 1
    while target.exists():
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{k}")
        k += 1
    os.replace(path, target)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_full(error: BaseException) -> bool:
    """Whether a write error means the disk is full: ENOSPC, or the messages torch's and
    safetensors' writers give for it."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(s in text for s in ("No space left", "os error 28", "unexpected pos", "file write failed"))


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- RNG

def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """The calling process's random states, as tensors and plain values (weights_only-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"bit_generator": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def restore_rng_state(state: dict, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng_state`; every generator passed must have a saved state."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state((nps["bit_generator"], nps["keys"].numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint holds no state for generator {name!r}; it has {sorted(state['generators'])}")
        generator.set_state(state["generators"][name])


# --------------------------------------------------------------------------- finding checkpoints

def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-{step}` folder name, else None."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    path = Path(path)
    return checkpoint_step(path) is not None and (path / COMPLETE).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest step first (half-written or temporary ones ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(run_dir: str | os.PathLike, resume: str | os.PathLike | None) -> Path | None:
    """`resume`: None (fresh run), "latest" (newest complete checkpoint of `run_dir`, or None when
    there is none yet, as diffusers' scripts do) or the path of a checkpoint folder."""
    if resume is None:
        return None
    if str(resume) == "latest":
        return find_latest(run_dir)
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (a '{CHECKPOINT_PREFIX}N' folder with {COMPLETE})")
    return path


# --------------------------------------------------------------------------- saving

def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path, run_dir: Path) -> None:
    """Delete a checkpoint folder: renamed away first so a kill mid-delete leaves nothing that
    `find_latest` would pick."""
    trash = Path(tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{checkpoint_step(path)}-", dir=run_dir))
    os.replace(path, trash / path.name)
    _remove_tree(trash)


def _remove_leftovers(run_dir: Path) -> None:
    for p in run_dir.iterdir():
        if p.is_dir() and p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            _remove_tree(p)


def rotate_checkpoints(run_dir: str | os.PathLike, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep_last`; never `protect`. Returns the deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir)
    doomed = [p for p in found[: max(0, len(found) - keep_last)] if protect is None or p != Path(protect)]
    for path in doomed:
        _discard(path, run_dir)
    return doomed


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    models: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    train_state: Mapping[str, Any] | None = None,
    recipe_yaml: str | None = None,
    extra: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    rng_states: Sequence[dict] | None = None,
    keep_last: int | None = None,
    is_main_process: bool = True,
) -> Path | None:
    """Write `run_dir/checkpoint-{step}` atomically and rotate; returns its path (None off-main).

    models: name -> model with `save_pretrained` (student, EMA shadow `ema.model`, projector...),
        unwrapped from DDP/compile by the caller.
    extra: name -> object with `state_dict()`/`load_state_dict()` (sampler, grad scaler, ...).
    train_state: JSON-serialisable (epoch, data position, ...); `step` is stored with it.
    rng_states: one `capture_rng_state()` per process rank, when the trainer gathers them;
        default: this process's state (with `generators`).
    """
    if not is_main_process:
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(run_dir)  # temporary folders of a save that was killed
    final = run_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step}-", dir=run_dir))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a checkpoint folder is an ordinary folder
    previous = find_latest(run_dir)
    try:
        for name, model in models.items():
            model.save_pretrained(tmp / name)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if lr_scheduler is not None:
            torch.save(lr_scheduler.state_dict(), tmp / SCHEDULER_FILE)
        if extra:
            (tmp / EXTRA_DIR).mkdir()
            for name, obj in extra.items():
                torch.save(obj.state_dict(), tmp / EXTRA_DIR / f"{name}.pt")
        states = list(rng_states) if rng_states is not None else [capture_rng_state(generators)]
        torch.save({"ranks": states}, tmp / RNG_FILE)
        state = {**(train_state or {}), "step": step}
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        if recipe_yaml is not None:
            (tmp / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
        manifest = {"format": FORMAT_VERSION, "step": step, "models": sorted(models), "files": _checksums(tmp)}
        (tmp / COMPLETE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")  # last file written
        if final.exists():
            # Same step saved before (a run resumed from an older checkpoint): a directory rename
            # cannot replace a non-empty folder, so the old one is moved away first.
            _discard(final, run_dir)
        os.replace(tmp, final)
    except BaseException as e:
        written = _tree_bytes(tmp) if tmp.exists() else 0
        _remove_tree(tmp)
        if isinstance(e, Exception) and _disk_full(e):
            free = shutil.disk_usage(run_dir).free
            need = _tree_bytes(previous) if previous is not None else written
            kept = f"{previous.name} is still the latest" if previous is not None else "no checkpoint was written yet"
            raise CheckpointWriteError(
                errno.ENOSPC, f"no space left on {run_dir} while saving {CHECKPOINT_PREFIX}{step} (a checkpoint "
                f"takes about {need / 1e6:.0f} MB; {free / 1e6:.0f} MB free); {kept}") from None
        raise
    if keep_last is not None:
        rotate_checkpoints(run_dir, keep_last, protect=final)
    return final


# --------------------------------------------------------------------------- loading

def load_model_folder(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load a `save_pretrained` folder's safetensors weights into an existing model, in place and
    strictly (sharded folders included). In place keeps the objects the optimizer already holds."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"weights in {folder} do not match {type(model).__name__}: "
                           f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def _torch_load(path: Path):
    return load_weights_only(path)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    models: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    extra: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    rank: int = 0,
) -> dict:
    """Restore a checkpoint into existing objects (built as for a fresh run); returns train_state.

    Models are loaded in place from their folders; this `rank`'s RNG states are restored last, so
    nothing in loading consumes random numbers after them.
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint")
    manifest = verify_checkpoint(path)
    try:
        train_state = json.loads((path / TRAIN_STATE_FILE).read_text(encoding="utf-8"))
        for name, model in models.items():
            if not (path / name).is_dir():
                raise FileNotFoundError(f"checkpoint {path} has no model folder {name!r}")
            load_model_folder(model, path / name)
        for obj, file in ((optimizer, OPTIMIZER_FILE), (lr_scheduler, SCHEDULER_FILE)):
            if obj is not None:
                obj.load_state_dict(_torch_load(path / file))
        for name, obj in (extra or {}).items():
            obj.load_state_dict(_torch_load(path / EXTRA_DIR / f"{name}.pt"))
        ranks = _torch_load(path / RNG_FILE)["ranks"] if restore_rng else None
    except UnsafeFileError:
        raise
    except Exception as e:
        reason = f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if manifest.get("files"):  # the checksums held: the files are as saved, they do not fit
            raise CheckpointIncompatible(reason) from e
        raise CheckpointDamaged(reason) from e  # format 1: no checksums, a failing file is taken as damaged
    if restore_rng:
        if rank < len(ranks):
            restore_rng_state(ranks[rank], generators)
        else:
            # Giving this rank another rank's state would make both draw the same noise.
            warnings.warn(f"{path} holds RNG states for {len(ranks)} rank(s); rank {rank} keeps its own")
    return train_state


def read_recipe(path: str | os.PathLike) -> str:
    """The resolved recipe stored in a checkpoint, as YAML text."""
    return (Path(path) / RECIPE_FILE).read_text(encoding="utf-8")
