"""The training data of a run: folder (or toy world) -> buckets -> batches, with latent caching.

`build_train_data(recipe, teacher, rank, world_size)` returns a `TrainData` whose
`epoch_batches(epoch, start)` yields collated batches of one bucket each, continuing from batch
`start` of `epoch` (resume). With caching on, every batch it yields holds `latent_mean` /
`latent_std` instead of pixels: entries missing from the cache are encoded here, by this process,
with the teacher's frozen VAE and written back, so no process waits for another to fill a cache
(nothing to time out in a multi-process run).

Caption dropout is left to the trainer (it replaces a dropped caption by the teacher's
unconditional input, which for SDXL is not the encoding of "" but zeros), so the dataset's
caption processor runs with dropout 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from sitdistill.data.buckets import BucketBatchSampler, validate_step
from sitdistill.data.cache import LatentCache, TextCache, cache_policy, module_fingerprint, text_cache_policy
from sitdistill.data.folder import UNLOADABLE, build_folder_dataset, collate
from sitdistill.core.paths import cache_dir
from sitdistill.core.schema import BATCH_PARTS
from sitdistill.core.recipe import RecipeError, as_dict

log = logging.getLogger(__name__)

# Recipe `data` keys that are not keywords of `build_folder_dataset`.
_NOT_FOLDER_KEYS = ("root", "toy", "num_workers", "cache_latents", "cache_dir")


def toy_data_folder(data_cfg: DictConfig) -> Path:
    """The toy world as a tagutl folder, drawn once per (n, seed, held-out combos) and cached."""
    from sitdistill.data.toy import ToyWorld

    toy = data_cfg.toy
    excluded = tuple(tuple(c.split()) for c in toy.exclude_combos)
    for combo in excluded:
        if len(combo) != 2:
            raise ValueError(f"data.toy.exclude_combos: {' '.join(combo)!r} is not '<colour> <shape>'")
    key = hashlib.sha256(json.dumps([toy.num_images, toy.seed, sorted(excluded)]).encode()).hexdigest()[:16]
    out = cache_dir("toy-data", f"toy-{key}")
    if (out / "COMPLETE").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        ToyWorld(exclude_combos=excluded).write_folder(tmp, toy.num_images, toy.seed)
        (tmp / "COMPLETE").write_text("")
        # Several processes (ranks, study workers) may draw the same folder at once. A finished
        # folder is never replaced: another process may be reading it (the drawing is a pure
        # function of the key, so either copy is the same).
        if not (out / "COMPLETE").is_file():
            if out.exists():  # a half folder from a killed build
                shutil.rmtree(out)
            try:
                os.replace(tmp, out)
            except OSError:  # another process renamed its finished copy into place first
                if not (out / "COMPLETE").is_file():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; else a spare copy
    return out


def data_root(data_cfg: DictConfig) -> Path:
    return Path(data_cfg.root) if data_cfg.root is not None else toy_data_folder(data_cfg)


def needs_images(recipe: DictConfig) -> bool:
    """False only in data-free mode: every active term comes from teacher trajectories (feature
    alignment included, when it is on for the trajectory states: `trajectory.align`)."""
    lo = recipe.losses
    batch_parts = any(lo.perturbations[p].enabled for p in BATCH_PARTS)
    traj = lo.perturbations.trajectory
    aligned_off_data = bool(lo.perturb and traj.enabled and traj.align)
    return bool(lo.eps or lo.teacher or (lo.feature and not aligned_off_data) or (lo.perturb and batch_parts))


class DataExhausted(RuntimeError):
    """Every image of the data set failed to load during training."""


@dataclass
class TrainData:
    dataset: Any
    sampler: BucketBatchSampler | None
    batch_size: int
    needs_images: bool
    example_pixel_hw: tuple[int, int]  # (height, width) of the most common bucket
    vae_factor: int
    teacher: Any = None
    cache: LatentCache | None = None
    text_cache: TextCache | None = None  # the teacher's prompt encodings per caption
    num_workers: int = 0
    seed: int = 0
    captions: list[str] = field(default_factory=list)  # every caption of the data set (trajectory prompts)
    notes: list[str] = field(default_factory=list)
    # Files that failed to load during training (path -> error), and buckets none of whose images
    # loads: each counted once, reported at the end of the run.
    load_failures: dict[str, str] = field(default_factory=dict)
    dead_buckets: set = field(default_factory=set)

    @property
    def example_latent_hw(self) -> tuple[int, int]:
        h, w = self.example_pixel_hw
        return h // self.vae_factor, w // self.vae_factor

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler) if self.sampler is not None else 1

    def sampler_state(self, epoch: int, position: int) -> dict | None:
        if self.sampler is None:
            return None
        return {**self.sampler.state_dict(position), "epoch": epoch}

    def load_sampler_state(self, state: dict | None) -> None:
        if self.sampler is not None and state is not None:
            self.sampler.load_state_dict(state)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Batches of `epoch` from batch `start` on; data-free runs get an endless empty stream."""
        if not self.needs_images:
            while True:
                yield {}
        self.sampler.load_state_dict({**self.sampler.state_dict(start), "epoch": epoch})
        self.dataset.set_epoch(epoch)
        # Each item is fetched as (index, epoch) so its randomness is right in any worker.
        batches = ([(i, epoch) for i in b] for b in self.sampler)
        if self.num_workers > 0:
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=list(batches), collate_fn=list,
                                                 num_workers=self.num_workers)
            groups = iter(loader)
        else:
            groups = ([self.dataset[key] for key in b] for b in batches)
        for position, items in enumerate(groups, start):
            if any(UNLOADABLE in it for it in items):
                items = self._refill(items, epoch, position)
            for path, error in (e for it in items for e in it.get("load_errors", [])):
                self.load_failures.setdefault(path, error)
            yield self._with_latents(items, epoch) if self.cache is not None else collate(items)

    def _refill(self, items: list[dict], epoch: int, position: int) -> list[dict]:
        """A batch whose bucket has no loadable image: the same number of items from another
        bucket, chosen and drawn from (seed, epoch, position) alone, so every rank takes the same
        steps and a resumed run draws the same batch. Raises DataExhausted when no bucket loads."""
        folder = getattr(self.dataset, "dataset", self.dataset)  # under CachedItems
        errors = [e for it in items for e in it.get("load_errors", [])]
        for it in items:
            if UNLOADABLE in it and tuple(it[UNLOADABLE]) not in self.dead_buckets:
                bucket = tuple(it[UNLOADABLE])
                self.dead_buckets.add(bucket)
                log.warning("bucket %dx%d: none of its images loads; its batches are filled from other "
                            "buckets", *bucket)
        # One order of all buckets from (seed, epoch, position), walked past the dead ones: the
        # choice does not depend on which buckets this process happened to find dead before.
        rng = np.random.default_rng([self.seed, epoch, position, 1])
        for b in rng.permutation(len(folder.buckets)):
            if tuple(folder.buckets[b]) in self.dead_buckets:
                continue
            members = folder.items_of_bucket[int(b)]
            pick = np.random.default_rng([self.seed, epoch, position, 2, int(b)])
            picks = [members[int(j)] for j in pick.integers(len(members), size=len(items))]
            new = [self.dataset[(i, epoch)] for i in picks]
            errors += [e for it in new for e in it.get("load_errors", [])]
            if not any(UNLOADABLE in it for it in new):
                new[0] = {**new[0], "load_errors": errors + list(new[0].get("load_errors", []))}
                return new
            self.dead_buckets.add(tuple(folder.buckets[b]))
        shown = "; ".join(f"{p} ({e})" for p, e in errors[:3])
        raise DataExhausted(f"no image of the data set loads any more ({len(errors)} failed here, e.g. {shown})")

    # ------------------------------------------------------------------ caching
    def _with_latents(self, items: list[dict], epoch: int) -> dict:
        """Collate items whose pixels were replaced by cached posteriors (encoding the misses)."""
        missing = [it for it in items if "latent_mean" not in it]
        if missing:
            pixels = torch.stack([it["pixel_values"] for it in missing])
            mean, std = (v.cpu() for v in self.teacher.latent_posterior(pixels))
            for it, m, s in zip(missing, mean, std):
                entry = {"latent_mean": m, "latent_std": s,
                         "original_size": torch.tensor(it["original_size"]),
                         "crop_top_left": torch.tensor(it["crop_top_left"])}
                self.cache.put(it["cache_key"], entry)
                it.update(latent_mean=m, latent_std=s)
        batch = {"latent_mean": torch.stack([it["latent_mean"] for it in items]),
                 "latent_std": torch.stack([it["latent_std"] for it in items])}
        for key in ("original_size", "crop_top_left", "target_size"):
            batch[key] = torch.tensor([tuple(int(v) for v in it[key]) for it in items], dtype=torch.long)
        for key in ("caption", "path", "index", "meta"):
            batch[key] = [it.get(key) for it in items]
        batch["load_errors"] = [e for it in items for e in it.get("load_errors", [])]
        return batch


class CachedItems(torch.utils.data.Dataset):
    """A FolderDataset whose items come from the latent cache when present (no image decode)."""

    def __init__(self, dataset, cache: LatentCache):
        self.dataset, self.cache = dataset, cache
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def _caption(self, index: int, epoch: int) -> str:
        # Its own stream, so a hit and a miss give the same caption (resume stays exact).
        rng = np.random.default_rng([self.dataset.seed, epoch, index, 1])
        return self.dataset.caption_processor(self.dataset.records[index].caption, rng)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        record = self.dataset.records[index]
        bucket = self.dataset.buckets[self.dataset.bucket_of_item[index]]
        cache_key = self.cache.key(record.path, bucket)
        entry = self.cache.get(cache_key)
        if entry is None:
            item = self.dataset[(index, epoch)]
            if UNLOADABLE in item:  # no image of this bucket loads: the pipeline refills the batch
                return item
            if item["path"] != record.path:  # a broken file was replaced by another image
                cache_key = self.cache.key(item["path"], bucket)
            item.update(cache_key=cache_key, caption=self._caption(index, epoch))
            return item
        return {"latent_mean": entry["latent_mean"], "latent_std": entry["latent_std"],
                "original_size": tuple(entry["original_size"].tolist()),
                "crop_top_left": tuple(entry["crop_top_left"].tolist()),
                "target_size": (bucket[1], bucket[0]), "caption": self._caption(index, epoch),
                "path": record.path, "index": index, "meta": record.meta, "load_errors": []}


def build_train_data(recipe: DictConfig, teacher, *, rank: int = 0, world_size: int = 1) -> TrainData:
    d, t = recipe.data, recipe.training
    vae_factor = teacher.vae_scale_factor
    patch = _student_patch(recipe)
    if d.bucket:
        validate_step(d.bucket_step, vae_factor, patch)
    elif d.resolution % (vae_factor * patch):
        raise ValueError(f"data.resolution {d.resolution} must be a multiple of VAE factor {vae_factor} "
                         f"x patch {patch} = {vae_factor * patch}")
    fields = {k: v for k, v in as_dict(recipe, "data").items() if k not in _NOT_FOLDER_KEYS}
    fields["caption_dropout"] = 0.0  # applied by the trainer, see the module docstring
    fields["seed"] = t.seed
    root = data_root(d)
    dataset, scan = build_folder_dataset(root, **fields)
    notes = [scan.summary()]
    if len(dataset) == 0:
        raise RecipeError(f"'data.root': no usable images in {root}: {scan.summary()} "
                          "(`cli.py data-report` lists why)")
    captions = [rec.caption for rec in dataset.records]
    text_on, reason = text_cache_policy(d)
    if text_on and t.train_text_encoder:
        reason += "; they serve the teacher only: the student's trainable encoders run every step"
    notes.append(reason)
    text_cache = TextCache(teacher.front, Path(d.cache_dir) if d.cache_dir else cache_dir("text")) if text_on else None
    if not needs_images(recipe):  # data-free: the captions are used as text only
        side = d.resolution
        return TrainData(None, None, t.batch_size, False, (side, side), vae_factor, teacher=teacher, seed=t.seed,
                         captions=captions, text_cache=text_cache, notes=notes + ["data-free: no image is loaded"])
    sampler = BucketBatchSampler(dataset.bucket_of_item, t.batch_size, seed=t.seed, rank=rank,
                                 world_size=world_size, small_bucket=d.small_bucket)
    if len(sampler) == 0:
        raise RecipeError(f"'training.batch_size': no full batch of {t.batch_size} in any bucket of {root} "
                          f"(data.small_bucket={d.small_bucket}); lower training.batch_size")
    (w, h), _ = max(dataset.histogram(), key=lambda bn: bn[1])
    cache = None
    enabled, reason = cache_policy(d)
    if enabled and t.train_vae:
        # The student VAE changes every step, so batches must carry pixels; the teacher's alignment
        # latents are then encoded per step too (one frozen encoder pass beside the student's).
        enabled, reason = False, "latent caching turned off: training.train_vae trains the student-side VAE on pixels"
    notes.append(reason)
    if enabled:
        root_dir = Path(d.cache_dir) if d.cache_dir else cache_dir("latents")
        fp = module_fingerprint(teacher.vae, {"dtype": str(teacher.vae.dtype), "format": "posterior"})
        cache = LatentCache(root_dir, fp, crop=d.crop)
        dataset = CachedItems(dataset, cache)
    return TrainData(dataset, sampler, t.batch_size, True, (h, w), vae_factor, teacher=teacher, cache=cache,
                     num_workers=d.num_workers, seed=t.seed, captions=captions, text_cache=text_cache, notes=notes)


def _student_patch(recipe: DictConfig) -> int:
    from sitdistill.students import PRESETS

    preset = recipe.student.preset
    if preset not in PRESETS:
        raise ValueError(f"student.preset {preset!r} is not a preset; choose one of {list(PRESETS)}")
    return int(PRESETS[preset]["patch_size"])

