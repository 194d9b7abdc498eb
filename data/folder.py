"""The image + caption folder dataset (the tagutl format).

    dataset/
      image1.png   image1.txt   image1.json (optional)
      sub/image2.JPG   sub/image2.txt

Images: `.png .jpg .jpeg .webp` in any letter case, found recursively. Captions: the same stem with
`caption_extension`. Metadata: the same stem with `.json` (an object), kept in `ImageRecord.meta`.

Bad files never stop a run. `scan_folder` (`sitdistill.data.scan`) skips them and lists each with a reason from
SKIP_REASONS (dangling links, link loops and unreadable files included; images above the pixel
budget `max_pixels` are skipped from their header, before anything is decoded). An image that only
fails when it is decoded for training is replaced by another item of the same bucket and reported
in the sample's `load_errors`; when no image of a bucket loads, the item comes back as a marker
(`UNLOADABLE`) and the batch is refilled from another bucket (`sitdistill.data.pipeline.TrainData`).

Image sizes come from headers and are cached (keyed by path, mtime and byte size), so a rescan of
a large folder opens no image at all. With `verify_images` the scan also reads each image's data
once, cheaply, to catch truncated files (PNG: chunk CRCs without decompressing; JPEG: a 1/8-scale
DCT decode; WebP: a full decode); the outcome is cached as well.
"""
from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from sitdistill.data.buckets import (SMALL_BUCKET_POLICIES, Bucket, assign_bucket, bucket_histogram,
                          make_buckets, resize_and_crop)
from sitdistill.data.captions import CaptionProcessor

log = logging.getLogger(__name__)
# The scan enforces its own pixel budget (data.max_pixels) from the header, before any decoding;
# Pillow's warning for the same case would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

from sitdistill.data.scan import (DEFAULT_MAX_PIXELS, DEFAULT_SCAN_WORKERS, ORIENTATIONS_SWAPPING_SIDES, SKIP_REASONS,
                       ImageRecord, ScanResult, Skipped, _header_orientation, scan_folder)

UNLOADABLE = "unloadable_bucket"  # the key of the marker item a dataset returns for a dead bucket
SIXTEEN_TO_EIGHT_BIT = 257.0  # 65535 / 255
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: alpha composited on white; palette, grey, CMYK, 16-bit converted."""
    if img.mode.startswith("I"):
        # I;16* and I (Pillow's modes for 16-bit grey PNG): Pillow's own convert("L") clips at 255,
        # which would turn nearly every 16-bit pixel white; scale the range instead.
        arr = np.asarray(img).astype(np.float32) / SIXTEEN_TO_EIGHT_BIT
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        # Transparent pixels carry arbitrary colour (often black); white is what viewers show and
        # what kohya / diffusers' scripts composite on.
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _open_rgb(path: str | os.PathLike, cover: Bucket | None = None
              ) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, original (h, w)). With `cover`, a JPEG is DCT-decoded at the smallest scale that
    still covers that bucket, which makes decoding large photos several times faster."""
    with Image.open(path) as im:
        if cover is not None and im.format == "JPEG":
            # A JPEG's EXIF comes before its image data, so the header orientation is the one
            # exif_transpose will apply; draft sizes are in stored (unrotated) pixels.
            swap = _header_orientation(im) in ORIENTATIONS_SWAPPING_SIDES
            w, h = im.size[::-1] if swap else im.size  # as displayed
            scale = max(cover[0] / w, cover[1] / h)
            need = (int(np.ceil(w * scale)), int(np.ceil(h * scale)))
            if im.draft(im.mode, need[::-1] if swap else need) is not None:
                img = ImageOps.exif_transpose(im)
                return to_rgb(img), (h, w)  # the file's size, not the reduced decode's
        img = ImageOps.exif_transpose(im)
    return to_rgb(img), (img.height, img.width)


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image as 8-bit RGB, EXIF orientation applied, alpha composited on white."""
    return _open_rgb(path)[0]


class FolderDataset(torch.utils.data.Dataset):
    """Scanned records -> training samples in their aspect-ratio bucket.

    `buckets`: the bucket grid (None: one square bucket resolution x resolution). Each item's
    bucket is `self.buckets[self.bucket_of_item[i]]`. An item is indexed by `i` (using the epoch
    set by `set_epoch`) or by `(i, epoch)`, which keeps per-item randomness right in persistent
    DataLoader workers that never see `set_epoch`. All randomness (caption dropout and shuffle,
    random crop, substitutes for broken files) comes from a generator seeded with
    (seed, epoch, i), so a sample is the same across resume, worker count and rank.
    """

    def __init__(self, records: Sequence[ImageRecord], *, buckets: Sequence[Bucket] | None = None,
                 resolution: int = 512, no_upscale: bool = False, bucket_step: int | None = None,
                 caption_processor: CaptionProcessor | None = None, crop: str = "center",
                 seed: int = 0) -> None:
        self.records = list(records)
        grid = list(buckets) if buckets is not None else [(resolution, resolution)]
        assigned = [assign_bucket(r.width, r.height, grid, no_upscale, bucket_step)
                     for r in self.records]
        self.buckets: list[Bucket] = sorted(set(assigned))
        number = {b: i for i, b in enumerate(self.buckets)}
        self.bucket_of_item = [number[b] for b in assigned]
        self.items_of_bucket: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_of_item):
            self.items_of_bucket.setdefault(b, []).append(i)
        self.caption_processor = caption_processor or CaptionProcessor()
        self.crop = crop
        self.seed = seed
        self.epoch = 0
        self.failed: set[int] = set()  # items that failed to decode (this process)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def histogram(self) -> list[tuple[Bucket, int]]:
        return bucket_histogram([self.buckets[b] for b in self.bucket_of_item])

    def _substitute(self, index: int, rng: np.random.Generator) -> int | None:
        """Another item of `index`'s bucket that has not failed, or None when none is left."""
        pool = [j for j in self.items_of_bucket[self.bucket_of_item[index]] if j not in self.failed]
        return pool[int(rng.integers(len(pool)))] if pool else None

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """The sample of item `index`; a file that fails to decode is replaced by another image of
        its bucket. When no image of the bucket loads, a marker ``{UNLOADABLE: bucket, ...}`` comes
        back instead of raising (the batch is refilled from another bucket by the data pipeline)."""
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        rng = np.random.default_rng([self.seed, epoch, index])
        bucket = self.buckets[self.bucket_of_item[index]]
        errors: list[tuple[str, str]] = []
        item: int | None = index
        while True:  # each failure removes one candidate, so this ends
            if item in self.failed:
                item = self._substitute(index, rng)
                if item is None:
                    return {UNLOADABLE: bucket, "index": index, "load_errors": errors}
            record = self.records[item]
            try:
                img, original = _open_rgb(record.path, cover=bucket)
                break
            except Exception as e:  # a broken file must never stop training
                errors.append((record.path, f"{type(e).__name__}: {e}"))
                log.warning("could not load %s (%s); using another image of the same bucket",
                            record.path, errors[-1][1])
                self.failed.add(item)
        img, _, crop_top_left = resize_and_crop(img, bucket, self.crop, rng)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
        pixels = pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]
        return {
            "pixel_values": pixels,
            "caption": self.caption_processor(record.caption, rng),
            "original_size": original,
            "crop_top_left": crop_top_left,
            "target_size": (bucket[1], bucket[0]),
            "meta": record.meta,
            "path": record.path,
            "index": index,
            "load_errors": errors,
        }


SIZE_KEYS = ("original_size", "crop_top_left", "target_size")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixels to (N, 3, H, W) and the SDXL size triples to long tensors (N, 2); lists else."""
    batch: dict[str, Any] = {"pixel_values": torch.stack([s["pixel_values"] for s in samples])}
    for key in SIZE_KEYS:
        batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.long)
    for key in samples[0]:
        if key not in batch:
            batch[key] = [s[key] for s in samples]
    batch["load_errors"] = [e for errors in batch["load_errors"] for e in errors]
    return batch


def build_folder_dataset(root: str | os.PathLike, *, recursive: bool = True,
                         caption_extension: str = ".txt", missing_caption: str = "skip",
                         caption_prefix: str = "", shuffle_tags: bool = False, keep_tokens: int = 0,
                         tag_separator: str = ",", caption_dropout: float = 0.0, min_size: int = 64,
                         resolution: int = 512, bucket: bool = True, bucket_min_side: int = 256,
                         bucket_max_side: int = 1024, bucket_step: int = 64,
                         bucket_no_upscale: bool = False, crop: str = "center",
                         small_bucket: str = "repeat", seed: int = 0,
                         size_cache: bool | str | os.PathLike = True,
                         verify_images: bool = True,
                         max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[FolderDataset, ScanResult]:
    """Scan `root` and build the dataset; the keywords are the recipe's `data` fields.

    `small_bucket` is the batch sampler's policy (BucketBatchSampler); it is checked here and
    otherwise unused, so the whole `data` section can be passed through. With `bucket=False` every
    image is resized and cropped to resolution x resolution (and `bucket_no_upscale` is unused).
    """
    if small_bucket not in SMALL_BUCKET_POLICIES:
        raise ValueError(f"small_bucket must be one of {sorted(SMALL_BUCKET_POLICIES)}, "
                         f"got {small_bucket!r}")
    scan = scan_folder(root, recursive=recursive, caption_extension=caption_extension,
                       missing_caption=missing_caption, min_size=min_size,
                       size_cache=size_cache, verify_images=verify_images, max_pixels=max_pixels)
    grid = (make_buckets(resolution, bucket_min_side, bucket_max_side, bucket_step)
            if bucket else [(resolution, resolution)])
    captions = CaptionProcessor(shuffle_tags=shuffle_tags, keep_tokens=keep_tokens,
                                tag_separator=tag_separator, caption_dropout=caption_dropout,
                                caption_prefix=caption_prefix)
    dataset = FolderDataset(scan.records, buckets=grid, no_upscale=bucket and bucket_no_upscale,
                            bucket_step=bucket_step, caption_processor=captions, crop=crop,
                            seed=seed)
    return dataset, scan


BAR_WIDTH = 40
FLAG_THUMBNAIL = 64  # side of the reduced decode that `flag_images` looks at


def flag_images(records: Sequence[ImageRecord], workers: int = DEFAULT_SCAN_WORKERS) -> list[Skipped]:
    """Usable images that are probably not what their owner meant to train on: ones that decode
    to a single colour (e.g. a float or HDR file whose range 8-bit conversion flattens). Each is
    decoded once, reduced; the reason of a returned entry is "constant". Kept in the data set."""
    def check(record: ImageRecord) -> Skipped | None:
        try:
            with Image.open(record.path) as im:
                im.draft("RGB", (FLAG_THUMBNAIL, FLAG_THUMBNAIL))
                img = to_rgb(im)
                img.thumbnail((FLAG_THUMBNAIL, FLAG_THUMBNAIL))
                lo, hi = np.asarray(img).reshape(-1, 3).min(0), np.asarray(img).reshape(-1, 3).max(0)
        except Exception as e:  # reported by training as a load failure; not a flag
            return Skipped(record.path, "undecodable", f"{type(e).__name__}: {e}")
        if (hi - lo).max() <= 1:
            return Skipped(record.path, "constant", f"every pixel is RGB {tuple(int(v) for v in lo)}")
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [f for f in pool.map(check, records) if f is not None]


def format_data_report(scan: ScanResult, histogram: Sequence[tuple[Bucket, int]], *,
                       batch_size: int | None = None, small_bucket: str | None = None,
                       root: str | None = None, flagged: Sequence[Skipped] = ()) -> str:
    """The text `cli.py data-report` prints: summary, bucket histogram, skipped files.

    With `batch_size`, buckets smaller than a batch are marked, and under small_bucket="drop"
    the number of images left out of each epoch is given."""
    lines = [f"data: {root}"] if root else []
    lines.append(scan.summary())
    most = max((n for _, n in histogram), default=0)
    lines.append(f"buckets ({len(histogram)} in use; width x height, aspect, images):")
    for (w, h), n in histogram:
        bar = "#" * max(1, round(BAR_WIDTH * n / most))
        small = "  < batch" if batch_size and n < batch_size else ""
        lines.append(f"  {w:>5}x{h:<5} {w / h:5.2f} {n:>7}  {bar}{small}")
    if batch_size:
        few = sum(1 for _, n in histogram if n < batch_size)
        lines.append(f"  {few} bucket(s) hold fewer images than one batch of {batch_size}")
        if small_bucket == "drop":
            idle = sum(n % batch_size for _, n in histogram)
            lines.append(f"  small_bucket=drop: {idle} image(s) (each bucket's leftovers) sit out "
                         f"every epoch")
    if scan.skipped:
        lines.append("skipped files:")
        order = list(SKIP_REASONS)
        for s in sorted(scan.skipped, key=lambda s: (order.index(s.reason), s.path)):
            lines.append(f"  {s.reason:<12} {s.path}" + (f"  ({s.detail})" if s.detail else ""))
    if flagged:
        lines.append("flagged files (used for training, but check them):")
        for s in sorted(flagged, key=lambda s: (s.reason, s.path)):
            lines.append(f"  {s.reason:<12} {s.path}  ({s.detail})")
    return "\n".join(lines)


def data_report(root: str | os.PathLike, *, batch_size: int | None = None, **data_fields: Any) -> str:
    """Scan and bucket `root` with the recipe's `data` fields; return the report text. Every usable
    image is also decoded once, reduced, to flag the ones that are a single colour."""
    dataset, scan = build_folder_dataset(root, **data_fields)
    return format_data_report(scan, dataset.histogram(), batch_size=batch_size,
                              small_bucket=data_fields.get("small_bucket"), root=str(root),
                              flagged=flag_images(scan.records))
