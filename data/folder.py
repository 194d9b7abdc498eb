"""The image + caption folder dataset (the tagutl format).

    dataset/
      image1.png   image1.txt   image1.json (optional)
      sub/image2.JPG   sub/image2.txt

Images: `.png .jpg .jpeg .webp` in any letter case, found recursively. Captions: the same stem with
`caption_extension`. Metadata: the same stem with `.json` (an object), kept in `ImageRecord.meta`.

Bad files never stop a run. `scan_folder` skips them and lists each with a reason from
SKIP_REASONS (dangling links, link loops and unreadable files included; images above the pixel
budget `max_pixels` are skipped from their header, before anything is decoded). An image that only
fails when it is decoded for training is replaced by another item of the same bucket and reported
in the sample's `load_errors`; when no image of a bucket loads, the item comes back as a marker
(`UNLOADABLE`) and the batch is refilled from another bucket (`data.pipeline.TrainData`).

Image sizes come from headers and are cached (keyed by path, mtime and byte size), so a rescan of
a large folder opens no image at all. With `verify_images` the scan also reads each image's data
once, cheaply, to catch truncated files (PNG: chunk CRCs without decompressing; JPEG: a 1/8-scale
DCT decode; WebP: a full decode); the outcome is cached as well.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from data.buckets import (SMALL_BUCKET_POLICIES, Bucket, assign_bucket, bucket_histogram,
                          make_buckets, resize_and_crop)
from data.captions import CaptionProcessor

log = logging.getLogger(__name__)
# The scan enforces its own pixel budget (data.max_pixels) from the header, before any decoding;
# Pillow's warning for the same case would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MISSING_CAPTION_POLICIES = ("skip", "empty")

# Why a file was left out: the fixed set of names used in reports and tests.
SKIP_REASONS = {
    "empty": "zero-byte file",
    "unreadable": "not an image Pillow can open",
    "truncated": "image data truncated or corrupt",
    "too_small": "shorter side below min_size",
    "no_caption": "caption file missing (missing_caption: skip)",
    "bad_caption": "caption file is not UTF-8 text",
    "bad_metadata": ".json metadata unreadable or not an object",
    "broken_link": "symbolic link to nothing (dangling) or a link loop",
    "no_access": "permission denied or another file-system error",
    "too_large": "more pixels than data.max_pixels (skipped before decoding)",
    "float_pixels": "floating-point pixels (e.g. a float TIFF): no 0..255 range to train on",
}
DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: far above any training resolution, far below a decompression bomb
FLOAT_MODES = ("F",)  # Pillow's 32-bit float mode (float TIFFs); it converts to RGB as black
UNLOADABLE = "unloadable_bucket"  # the key of the marker item a dataset returns for a dead bucket

EXIF_ORIENTATION = 0x0112
ORIENTATIONS_SWAPPING_SIDES = (5, 6, 7, 8)  # transpose / rotate 90 / transverse / rotate 270
SIXTEEN_TO_EIGHT_BIT = 257.0  # 65535 / 255
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
CACHE_VERSION = 2  # 2: float-pixel images are skipped (entries of 1 predate that)
DEFAULT_SCAN_WORKERS = min(8, os.cpu_count() or 1)


@dataclass
class ImageRecord:
    """One usable image. width/height are after EXIF orientation (a rotated photo swaps them)."""
    path: str
    caption_path: str | None
    caption: str
    meta: dict
    width: int
    height: int


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str  # a key of SKIP_REASONS
    detail: str = ""


@dataclass
class ScanResult:
    records: list[ImageRecord]
    skipped: list[Skipped] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        counts = {r: 0 for r in SKIP_REASONS}
        for s in self.skipped:
            counts[s.reason] += 1
        return {r: n for r, n in counts.items() if n}

    def summary(self) -> str:
        """E.g. 'used 120 / skipped 3: 2 unreadable, 1 no caption'."""
        line = f"used {len(self.records)} / skipped {len(self.skipped)}"
        parts = [f"{n} {r.replace('_', ' ')}" for r, n in self.skipped_by_reason().items()]
        return line + (": " + ", ".join(parts) if parts else "")


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _header_orientation(im: Image.Image) -> int:
    # PngImageFile.getexif() decodes the whole image when the eXIf chunk was not in the header;
    # such files are rare, and loading applies their orientation anyway (the cover-resize then
    # works from the real size).
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)


def _check_data(im: Image.Image) -> None:
    """Read the image data once, as cheaply as the format allows; raises on truncation."""
    if im.format == "PNG":
        im.verify()  # walks every chunk and checks its CRC, without inflating
    elif im.format == "JPEG":
        im.draft(im.mode, (1, 1))  # decode at 1/8 scale: every byte is still read
        im.load()
    else:
        im.load()


def read_image_size(path: str | os.PathLike, verify: bool = False,
                    max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header; with `verify`, also check the
    image data (see _check_data), unless the image has more than `max_pixels` (it will be skipped
    for its size; nothing of it is decoded). Raises _Skip("unreadable" | "truncated" | ...)."""
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:  # Pillow's own limit (about 179 MP), checked at open
        raise _Skip("too_large", f"Pillow refuses to open it as a possible decompression bomb ({e})") from None
    except Exception as e:  # UnidentifiedImageError, DecompressionBombError, OSError, ...
        raise _Skip("unreadable", f"{type(e).__name__}: {e}") from None
    with im:
        try:
            w, h = im.size
            if _header_orientation(im) in ORIENTATIONS_SWAPPING_SIDES:
                w, h = h, w
        except Exception as e:  # a corrupt EXIF block
            raise _Skip("unreadable", f"{type(e).__name__}: {e}") from None
        if im.mode in FLOAT_MODES:
            raise _Skip("float_pixels", f"{im.format} mode {im.mode}")
        if verify and (max_pixels is None or w * h <= max_pixels):
            try:
                _check_data(im)
            except Exception as e:
                raise _Skip("truncated", f"{type(e).__name__}: {e}") from None
    return w, h


def _read_entry(path: Path, verify: bool, max_pixels: int | None) -> list:
    """[width, height, verified, reason, detail] for the header cache."""
    try:
        w, h = read_image_size(path, verify, max_pixels)
        return [w, h, verify and (max_pixels is None or w * h <= max_pixels), None, None]
    except _Skip as e:
        return [0, 0, verify, e.reason, e.detail]


def _default_cache_file(root: Path) -> Path:
    try:
        from distill.paths import cache_dir
        base = Path(cache_dir())
    except ImportError:
        base = Path(os.environ.get("SITDISTILL_CACHE", os.path.expanduser("~/.cache/sitdistill")))
    key = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return base / "image_headers" / f"{key}.json"


class _HeaderCache:
    """{relative path: [mtime_ns, bytes, width, height, verified, reason, detail]} in one JSON file."""

    def __init__(self, file: Path | None) -> None:
        self.file, self.old, self.new = file, {}, {}
        if file is not None and file.is_file():
            try:
                data = json.loads(file.read_text())
                if data.get("version") == CACHE_VERSION:
                    self.old = data["entries"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                log.warning("ignoring unreadable image header cache %s", file)

    def lookup(self, rel: str, st: os.stat_result, verify: bool) -> list | None:
        entry = self.old.get(rel)
        if entry and entry[0] == st.st_mtime_ns and entry[1] == st.st_size and (entry[4] or not verify):
            self.new[rel] = entry
            return entry
        return None

    def store(self, rel: str, st: os.stat_result, entry: list) -> list:
        self.new[rel] = [st.st_mtime_ns, st.st_size] + entry
        return self.new[rel]

    def save(self) -> None:
        if self.file is None or self.new == self.old:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": self.new}))
        os.replace(tmp, self.file)  # atomic: a reader never sees half a file


def _walk(root: Path, recursive: bool, problems: list | None = None):
    """(directory, sorted file names); hidden entries skipped, symlink loops visited once.
    Folders that cannot be listed or stat'ed are appended to `problems` as (path, error)."""
    seen = set()

    def failed(error: OSError) -> None:
        if problems is not None:
            problems.append((error.filename or "?", f"{type(error).__name__}: {error.strerror or error}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=failed):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            failed(e)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        yield Path(dirpath), sorted(f for f in filenames if not f.startswith("."))


class _Siblings:
    """The file names of one directory, for finding `stem + extension` (exact, else any case)."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.lower = set(names), {n.lower(): n for n in names}

    def find(self, stem: str, extension: str) -> str | None:
        exact = stem + extension
        return exact if exact in self.names else self.lower.get(exact.lower())


@dataclass
class _Found:
    path: Path
    rel: str
    stat: os.stat_result
    caption: str
    caption_path: str | None
    meta: dict
    entry: list | None  # header cache entry, None until read


def _stat_file(path: Path) -> os.stat_result:
    """`stat` of an image path (links followed); raises _Skip for dangling links, loops, no access."""
    try:
        st = path.stat()
    except FileNotFoundError:  # listed by the walk, so a link whose target is gone
        raise _Skip("broken_link", f"{path} -> {os.readlink(path) if path.is_symlink() else '?'}") from None
    except OSError as e:  # ELOOP (a link loop), EACCES, ...
        reason = "broken_link" if e.errno == errno.ELOOP else "no_access"
        raise _Skip(reason, f"{type(e).__name__}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Skip("unreadable", "not a regular file")
    return st


def _read_caption(path: Path) -> str:
    text = path.read_bytes().decode("utf-8-sig")  # strict: invalid bytes raise
    if "\x00" in text:  # valid UTF-8, but no text file holds NUL bytes
        raise ValueError("contains NUL bytes (a binary file)")
    return text.strip()


def _read_side_files(directory: Path, stem: str, siblings: _Siblings, caption_extension: str,
                     missing_caption: str) -> tuple[str, str | None, dict]:
    """(caption, caption path or None, metadata) of one image; raises _Skip."""
    caption, caption_path = "", None
    caption_name = siblings.find(stem, caption_extension)
    if caption_name is None and missing_caption == "skip":
        raise _Skip("no_caption", f"expected {stem}{caption_extension}")
    if caption_name is not None:
        caption_path = str(directory / caption_name)
        try:
            caption = _read_caption(directory / caption_name)
        except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
            raise _Skip("bad_caption", f"{caption_name}: {e}") from None
    meta_name = siblings.find(stem, ".json")
    if meta_name is None:
        return caption, caption_path, {}
    try:
        meta = json.loads((directory / meta_name).read_bytes().decode("utf-8-sig"))
    except (ValueError, OSError) as e:
        raise _Skip("bad_metadata", f"{meta_name}: {e}") from None
    if not isinstance(meta, dict):
        raise _Skip("bad_metadata", f"{meta_name}: a JSON {type(meta).__name__}, not an object")
    return caption, caption_path, meta


def scan_folder(root: str | os.PathLike, *, recursive: bool = True,
                caption_extension: str = ".txt", missing_caption: str = "skip",
                min_size: int = 64, size_cache: bool | str | os.PathLike = True,
                verify_images: bool = True, workers: int = DEFAULT_SCAN_WORKERS,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ScanResult:
    """Find the usable images under `root`; list the others with their reason.

    `missing_caption`: "skip" leaves out an image without a caption file; "empty" keeps it with
    the empty caption. `min_size`: shorter side (px) below which an image is "too_small".
    `size_cache`: True for the project cache dir, a file path, or False for none.
    `verify_images`: also read each image's data once to catch truncated files (cached).
    `workers`: threads for the header reads that are not cached.
    `max_pixels`: images with more pixels than this are skipped ("too_large") from their header,
    before any decoding (None: no limit). Dangling links, link loops and files or folders that
    cannot be read are skipped with their reason; nothing in the folder stops the scan.
    """
    if missing_caption not in MISSING_CAPTION_POLICIES:
        raise ValueError(f"missing_caption must be one of {MISSING_CAPTION_POLICIES}, "
                         f"got {missing_caption!r}")
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} is not a directory")
    cache_file = (_default_cache_file(root) if size_cache is True
                  else Path(size_cache) if size_cache else None)
    cache = _HeaderCache(cache_file)
    result = ScanResult(records=[])
    found: list[_Found] = []  # images whose side files are fine, in walk order
    problems: list[tuple[str, str]] = []
    for directory, names in _walk(root, recursive, problems):
        siblings = _Siblings(names)
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = directory / name
            try:
                st = _stat_file(path)
                if st.st_size == 0:
                    raise _Skip("empty", "")
                caption, caption_path, meta = _read_side_files(
                    directory, stem, siblings, caption_extension, missing_caption)
            except _Skip as e:
                result.skipped.append(Skipped(str(path), e.reason, e.detail))
                continue
            rel = path.relative_to(root).as_posix()
            found.append(_Found(path, rel, st, caption, caption_path, meta,
                                cache.lookup(rel, st, verify_images)))

    # Header reads (and data checks) missing from the cache run on threads: Pillow releases the
    # GIL while it decodes, and a first scan of a large folder is dominated by the data check.
    todo = [f for f in found if f.entry is None]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for f, entry in zip(todo, pool.map(lambda f: _read_entry(f.path, verify_images, max_pixels), todo)):
            f.entry = cache.store(f.rel, f.stat, entry)
    cache.save()

    result.skipped.extend(Skipped(path, "no_access", detail) for path, detail in problems)
    for f in found:
        _, _, w, h, _, reason, detail = f.entry
        if reason is not None:
            result.skipped.append(Skipped(str(f.path), reason, detail))
        elif max_pixels is not None and w * h > max_pixels:
            result.skipped.append(Skipped(str(f.path), "too_large", f"{w}x{h} = {w * h / 1e6:.0f} MP > "
                                          f"data.max_pixels {max_pixels / 1e6:g} MP"))
        elif min(w, h) < min_size:
            result.skipped.append(Skipped(str(f.path), "too_small", f"{w}x{h} < min_size {min_size}"))
        else:
            result.records.append(ImageRecord(str(f.path), f.caption_path, f.caption, f.meta, w, h))
    return result


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
