"""Aspect-ratio buckets (SDXL / kohya sd-scripts style) and a bucket batch sampler.

A bucket is a training size (width, height) in pixels. Every side is a multiple of `step`, and
`step` must be a multiple of (VAE downsampling factor x student patch size), so every latent of
every bucket splits into whole patches. An image goes to the bucket nearest to its aspect ratio,
is resized to cover it and cropped; the crop's top-left and the original size are returned for
SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2: `time_ids` = original size, crop
top-left, target size, all (h, w) / (top, left)).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Hashable, Iterator, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

Bucket = tuple[int, int]  # (width, height) in pixels

# Resampling for the cover resize. LANCZOS is what kohya and diffusers' scripts use for quality;
# `reducing_gap` first shrinks large images by an integer factor (box filter), which makes
# downscaling a 4000 px photo several times faster with no visible difference (Pillow docs).
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0

CROP_MODES = ("center", "random")

# What to do with a bucket's leftover items that do not fill a whole batch (a bucket smaller than
# a batch is the extreme case: all its items are leftovers). One policy, applied to every bucket.
SMALL_BUCKET_POLICIES = {
    "drop": "leftover items are not used this epoch (a bucket smaller than a batch never trains; "
            "with shuffling, different items are left over each epoch)",
    "repeat": "the last batch is filled up with other items of the same bucket (every batch is "
              "full and every item is seen at least once an epoch)",
    "partial": "the last batch of a bucket is smaller than batch_size (kohya's behaviour; "
               "batch shapes vary)",
}


def validate_step(step: int, vae_factor: int, patch_size: int, name: str = "bucket_step") -> None:
    """Raise ValueError unless `step` is a multiple of vae_factor * patch_size.

    Then every bucket side divided by the VAE factor is a whole number of student patches.
    Without bucketing, check the square side instead: validate_step(resolution, ..., "resolution").
    """
    unit = vae_factor * patch_size
    if step <= 0 or step % unit != 0:
        raise ValueError(
            f"{name} {step} must be a multiple of VAE factor x patch size = "
            f"{vae_factor} x {patch_size} = {unit}, so that every bucket's latent patchifies"
        )


def make_buckets(resolution: int, min_side: int, max_side: int, step: int,
                 max_aspect: float | None = None) -> list[Bucket]:
    """The bucket grid for a target area of resolution**2 pixels, sorted by width.

    kohya's `make_bucket_resolutions`: for every width w in [min_side, max_side] on the step grid,
    the tallest h on the grid with w*h <= area; both orientations.
    Guarantees (tested): every side is a multiple of `step` and in [min_side, max_side];
    area <= resolution**2; and 1 - area / resolution**2 < step / min(w, h), since h was rounded
    down by less than one step. `max_aspect` drops buckets longer than that ratio.
    """
    if step <= 0 or min_side % step or max_side % step:
        raise ValueError(f"bucket_min_side {min_side} and bucket_max_side {max_side} must be "
                         f"multiples of bucket_step {step}")
    if not 0 < min_side <= max_side:
        raise ValueError(f"need 0 < bucket_min_side <= bucket_max_side, got {min_side}, {max_side}")
    area = resolution * resolution
    found: set[Bucket] = set()
    # When resolution is on the grid, w = resolution gives the square bucket exactly.
    for w in range(min_side, max_side + 1, step):
        h = area // w // step * step
        if min_side <= h <= max_side:
            found.update({(w, h), (h, w)})
    if max_aspect is not None:
        found = {b for b in found if max(b) / min(b) <= max_aspect}
    if not found:
        raise ValueError(f"no bucket with sides in [{min_side}, {max_side}] (step {step}) "
                         f"has an area close to {resolution}^2")
    return sorted(found)


def _log_aspect(width: float, height: float) -> float:
    return math.log(width / height)


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket],
                  no_upscale: bool = False, step: int | None = None) -> Bucket:
    """The bucket for an image of `width` x `height` (after EXIF orientation).

    Nearest by |log aspect ratio| (symmetric for portrait and landscape); ties go to the first
    bucket in `buckets`. With `no_upscale` (kohya's `bucket_no_upscale`), an image that would have
    to be enlarged to cover its bucket gets its own bucket instead: the image shrunk (never
    enlarged) until it fits the grid's largest area and longest side, then its sides rounded down
    to `step` (never below one step), so it is only scaled down and cropped. Such buckets are not
    in the grid; the dataset adds them to its bucket list.
    """
    target = _log_aspect(width, height)
    best = min(buckets, key=lambda b: abs(_log_aspect(*b) - target))
    if no_upscale and max(best[0] / width, best[1] / height) > 1.0:
        if step is None:
            raise ValueError("assign_bucket(no_upscale=True) needs the bucket step")
        max_area = max(w * h for w, h in buckets)
        longest = max(max(b) for b in buckets)
        scale = min(1.0, math.sqrt(max_area / (width * height)), longest / max(width, height))
        return (max(step, int(width * scale) // step * step),
                max(step, int(height * scale) // step * step))
    return best


def resize_and_crop(img: Image.Image, bucket: Bucket, crop: str = "center",
                    rng: np.random.Generator | None = None
                    ) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize `img` to cover `bucket` (keeping its aspect), then crop to the bucket's size.

    Returns (image of exactly bucket size, original_size (h, w), crop_top_left (top, left)).
    The crop coordinates are in the resized image's pixels, as SDXL's training uses them.
    `crop="random"` draws the offset from `rng` (required); "center" needs none.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    bw, bh = bucket
    w, h = img.size
    scale = max(bw / w, bh / h)
    # Round, but never below the bucket: a side that rounds down would leave a gap.
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), RESAMPLE, reducing_gap=REDUCING_GAP)
    if crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng")
        top, left = int(rng.integers(0, rh - bh + 1)), int(rng.integers(0, rw - bw + 1))
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    if (rw, rh) != (bw, bh):
        img = img.crop((left, top, left + bw, top + bh))
    return img, (h, w), (top, left)


def bucket_histogram(bucket_of_item: Sequence[Bucket]) -> list[tuple[Bucket, int]]:
    """(bucket, number of items) for every bucket in use, sorted by bucket."""
    return sorted(Counter(bucket_of_item).items())


class BucketBatchSampler:
    """Batches of item indices, every batch from a single bucket; seeded, resumable, sharded.

    One epoch, computed identically on every rank from (seed, epoch):
      1. items are grouped by bucket and, with `shuffle`, shuffled within their bucket;
      2. each bucket is cut into batches of `batch_size`; its leftover items follow the
         `small_bucket` policy (see SMALL_BUCKET_POLICIES);
      3. the batches of all buckets are shuffled together, so consecutive steps see different
         aspect ratios;
      4. sharding: the global list is padded to a multiple of `world_size` by repeating its first
         batches (as torch's DistributedSampler pads, so no item is left out for the sake of an
         even split), and rank r takes batches r, r + world_size, ... Every rank thus yields
         `len(self)` batches and, except for the padding, distinct ones.

    Resume: `state_dict(consumed)` records the epoch and how many batches of it the trainer has
    taken; after `load_state_dict`, iteration continues with exactly the remaining batches.
    (A prefetching DataLoader pulls batches ahead of the training step, so the trainer should pass
    its own count; without it the sampler's count of batches handed out is used.)
    `set_epoch(e)` starts epoch e from its first batch, unless e is the epoch already in progress;
    iterating to the end of an epoch moves on to the next epoch by itself.

    `with_epoch=True` yields (index, epoch) pairs instead of indices: FolderDataset accepts them,
    which keeps per-epoch randomness right in persistent DataLoader workers (they hold a copy of
    the dataset made before later `set_epoch` calls).
    """

    def __init__(self, bucket_of_item: Sequence[Hashable], batch_size: int, *, seed: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 small_bucket: str = "repeat", with_epoch: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if small_bucket not in SMALL_BUCKET_POLICIES:
            raise ValueError(f"small_bucket must be one of {sorted(SMALL_BUCKET_POLICIES)}, "
                             f"got {small_bucket!r}")
        self.bucket_of_item = list(bucket_of_item)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.small_bucket = small_bucket
        self.with_epoch = with_epoch
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out on this rank

    def _global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches for all ranks together, before sharding."""
        rng = np.random.default_rng([self.seed, epoch])
        groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(self.bucket_of_item):
            groups.setdefault(bucket, []).append(index)
        batches: list[list[int]] = []
        for bucket in sorted(groups):
            items = groups[bucket]
            if self.shuffle:
                items = [items[i] for i in rng.permutation(len(items))]
            full = len(items) // self.batch_size * self.batch_size
            batches += [items[i:i + self.batch_size] for i in range(0, full, self.batch_size)]
            leftover = items[full:]
            if not leftover or self.small_bucket == "drop":
                continue
            if self.small_bucket == "repeat":
                # Fill with the bucket's other items in their (shuffled) order, cycling when the
                # bucket holds fewer items than a batch.
                need = self.batch_size - len(leftover)
                leftover = leftover + [items[i % len(items)] for i in range(need)]
            batches.append(leftover)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        batches = self._global_batches(epoch)
        if batches and len(batches) % self.world_size:
            pad = self.world_size - len(batches) % self.world_size
            batches = batches + [batches[i % len(batches)] for i in range(pad)]
        return batches[self.rank::self.world_size]

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        n = len(self._global_batches(self.epoch))
        return -(-n // self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield [(i, self.epoch) for i in batch] if self.with_epoch else batch
        # Finishing an epoch moves on to the next one, so a loop that never calls set_epoch still
        # gets fresh shuffles, and set_epoch(next epoch) afterwards changes nothing.
        self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self, consumed: int | None = None) -> dict:
        return {"epoch": self.epoch, "position": self.position if consumed is None else consumed,
                "seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "num_items": len(self.bucket_of_item)}

    def load_state_dict(self, state: dict) -> None:
        # The batch order is a function of these; resuming under other values would silently
        # repeat or skip data.
        for key in ("seed", "world_size", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key} {state[key]}, this run has "
                                 f"{getattr(self, key)}: the remaining batches cannot be recovered")
        if state.get("num_items", len(self.bucket_of_item)) != len(self.bucket_of_item):
            log.warning("the dataset had %d items when the sampler state was saved and has %d now; "
                        "the rest of this epoch follows the new order", state["num_items"],
                        len(self.bucket_of_item))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
