"""Finding the images of a folder and reading their sizes: `scan_folder` (see `sitdistill.data.folder`).

Bad files never stop a scan: each is skipped and listed with a reason from SKIP_REASONS (dangling
links, link loops and unreadable files included; images above the pixel budget `max_pixels` are
skipped from their header, before anything is decoded). Image sizes come from headers and are
cached (keyed by path, mtime and byte size), so a rescan of a large folder opens no image at all.
With `verify_images` the scan also reads each image's data once, cheaply, to catch truncated
files (PNG: chunk CRCs without decompressing; JPEG: a 1/8-scale DCT decode; WebP: a full decode);
the outcome is cached as well."""
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

from PIL import Image

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

EXIF_ORIENTATION = 0x0112
ORIENTATIONS_SWAPPING_SIDES = (5, 6, 7, 8)  # transpose / rotate 90 / transverse / rotate 270
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
        from sitdistill.core.paths import cache_dir
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
