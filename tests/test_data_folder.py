"""The folder dataset: scanning (every bad-file kind, made here), the header cache, image modes,
captions, samples, and the data report."""
import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sitdistill.data.buckets import BucketBatchSampler, make_buckets
from sitdistill.data.captions import CaptionProcessor
from sitdistill.data.folder import (SKIP_REASONS, FolderDataset, build_folder_dataset, collate, data_report,
                         load_image, scan_folder)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
MIN_SIZE = 48  # test images are tiny; the "too small" one is below this


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write(path, img=None, caption=None, meta=None, data=None, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        path.write_bytes(data)
    else:
        img.save(path, **save)
    stem = path.with_suffix("")
    if caption is not None:
        stem.with_suffix(".txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    if meta is not None:
        stem.with_suffix(".json").write_text(meta if isinstance(meta, str) else json.dumps(meta))


def _truncated(img, fmt, keep=0.5):
    import io
    buf = io.BytesIO()
    img.save(buf, fmt)
    data = buf.getvalue()
    return data[: int(len(data) * keep)]


# name -> reason for every bad kind the issue lists (and bad metadata).
EXPECTED_SKIPS = {
    "zero.png": "empty",
    "not_image.png": "unreadable",
    "trunc.jpg": "truncated",
    "trunc.png": "truncated",
    "tiny.png": "too_small",
    "nocap.png": "no_caption",
    "badcap.png": "bad_caption",
    "binary_cap.png": "bad_caption",
    "badmeta.png": "bad_metadata",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    _write(root / "a.png", _noise(96, 64), "tag one, tag two", {"score": 7, "source": "x"})
    _write(root / "sub" / "deeper" / "b.JpG", _noise(64, 96), "\ufeffa photo\n")  # BOM, newline
    _write(root / "sub" / "C.PNG", _noise(80, 80), "c")
    _write(root / "d.jpeg", _noise(100, 60), "d")
    _write(root / "e.webp", _noise(70, 70), "e")
    # Bad files.
    _write(root / "zero.png", data=b"", caption="z")
    _write(root / "not_image.png", data=b"this is text, not a PNG\n" * 10, caption="t")
    _write(root / "trunc.jpg", data=_truncated(_noise(96, 96), "JPEG"), caption="t")
    _write(root / "sub" / "trunc.png", data=_truncated(_noise(96, 96), "PNG"), caption="t")
    _write(root / "tiny.png", _noise(40, 90), "t")
    _write(root / "nocap.png", _noise(64, 64))
    _write(root / "badcap.png", _noise(64, 64), b"\xff\xfe\xfa tag")
    _write(root / "binary_cap.png", _noise(64, 64), b"tag\x00\x01\x02")
    _write(root / "badmeta.png", _noise(64, 64), "m", "{not json")
    # Ignored: other extensions, hidden folders, orphan captions.
    (root / "notes.md").write_text("# notes")
    _write(root / ".hidden" / "h.png", _noise(64, 64), "h")
    (root / "orphan.txt").write_text("no image")
    return root


def _names(paths):
    return sorted(str(p).rsplit("/", 1)[-1] for p in paths)


def test_scan_uses_good_images_and_lists_every_bad_kind(folder, tmp_path):
    scan = scan_folder(folder, min_size=MIN_SIZE, size_cache=tmp_path / "c.json")
    assert _names(r.path for r in scan.records) == ["C.PNG", "a.png", "b.JpG", "d.jpeg", "e.webp"]
    got = {s.path.rsplit("/", 1)[-1]: s.reason for s in scan.skipped}
    assert got == EXPECTED_SKIPS
    assert set(got.values()) <= set(SKIP_REASONS)
    assert scan.summary() == ("used 5 / skipped 9: 1 empty, 1 unreadable, 2 truncated, 1 too small, "
                              "1 no caption, 2 bad caption, 1 bad metadata")
    by_name = {r.path.rsplit("/", 1)[-1]: r for r in scan.records}
    assert by_name["a.png"].meta == {"score": 7, "source": "x"}
    assert by_name["a.png"].caption == "tag one, tag two"
    assert by_name["b.JpG"].caption == "a photo"
    assert (by_name["b.JpG"].width, by_name["b.JpG"].height) == (64, 96)
    assert by_name["C.PNG"].meta == {}


def test_missing_caption_policy_and_recursion(folder, tmp_path):
    scan = scan_folder(folder, min_size=MIN_SIZE, missing_caption="empty", recursive=False,
                       size_cache=False)
    names = _names(r.path for r in scan.records)
    assert "nocap.png" in names and "b.JpG" not in names and "C.PNG" not in names
    nocap = next(r for r in scan.records if r.path.endswith("nocap.png"))
    assert nocap.caption == "" and nocap.caption_path is None
    with pytest.raises(ValueError, match="missing_caption"):
        scan_folder(folder, missing_caption="ignore", size_cache=False)


def test_rescan_with_cache_opens_no_image(folder, tmp_path, monkeypatch):
    folder = shutil.copytree(folder, tmp_path / "copy")  # this test changes a file
    cache = tmp_path / "headers.json"
    first = scan_folder(folder, min_size=MIN_SIZE, size_cache=cache)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    second = scan_folder(folder, min_size=MIN_SIZE, size_cache=cache)
    assert opened == []
    assert second.records == first.records and second.skipped == first.skipped
    # A changed file is read again, and only that one.
    _noise(64, 80, seed=3).save(folder / "d.jpeg")
    third = scan_folder(folder, min_size=MIN_SIZE, size_cache=cache)
    assert _names(opened) == ["d.jpeg"]
    assert next(r for r in third.records if r.path.endswith("d.jpeg")).width == 64


def _color(img, xy):
    return np.asarray(img)[xy[1], xy[0]].astype(int)


def test_load_image_modes(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 32, 64))
    la = Image.new("LA", (64, 64), (0, 0))
    la.paste((50, 255), (0, 0, 32, 64))
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette(list(RED) + list(BLUE) + [0] * 762)
    pal.paste(1, (32, 0, 64, 64))
    gray16 = Image.fromarray(np.array([[0, 128 * 257, 65535, 65535]] * 4, dtype=np.uint16))
    cases = {
        "rgba.png": (rgba, {}, [((5, 5), RED), ((50, 5), WHITE)]),
        "la.png": (la, {}, [((5, 5), (50, 50, 50)), ((50, 5), WHITE)]),
        "pal_alpha.png": (pal, {"transparency": 1}, [((5, 5), RED), ((50, 5), WHITE)]),
        "pal.png": (pal, {}, [((5, 5), RED), ((50, 5), BLUE)]),
        "gray.png": (Image.new("L", (8, 8), 77), {}, [((1, 1), (77, 77, 77))]),
        "gray16.png": (gray16, {}, [((0, 0), (0, 0, 0)), ((1, 0), (128, 128, 128)), ((2, 0), WHITE)]),
        "cmyk.jpg": (Image.new("CMYK", (16, 16), (0, 255, 255, 0)), {"quality": 95}, [((8, 8), RED)]),
    }
    for name, (img, save, checks) in cases.items():
        img.save(tmp_path / name, **save)
        out = load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == img.size, name
        for xy, want in checks:
            assert np.abs(_color(out, xy) - np.array(want)).max() <= 3, (name, xy, _color(out, xy))
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")


def test_exif_rotation_swaps_sides(tmp_path):
    stored = Image.new("RGB", (96, 64), RED)
    stored.paste(BLUE, (48, 0, 96, 64))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    _write(tmp_path / "d" / "rot.jpg", stored, "r", exif=exif.tobytes(), quality=95)
    record = scan_folder(tmp_path / "d", min_size=MIN_SIZE, size_cache=False).records[0]
    assert (record.width, record.height) == (64, 96)
    out = load_image(record.path)
    assert out.size == (64, 96)
    assert np.abs(_color(out, (32, 10)) - RED).max() <= 8  # the left side is now on top
    assert np.abs(_color(out, (32, 85)) - BLUE).max() <= 8
    # The dataset's JPEG draft decoding reports the file's full original size, rotated.
    sample = FolderDataset([record], buckets=[(32, 48)], seed=0)[0]
    assert sample["original_size"] == (96, 64) and sample["target_size"] == (48, 32)
    assert sample["pixel_values"][0, 4, 16] > 0.9 and sample["pixel_values"][2, 44, 16] > 0.9


def test_caption_processor():
    tags = "char, artist, a, b, c, d, e"
    shuffle = CaptionProcessor(shuffle_tags=True, keep_tokens=2)
    outs = {shuffle(tags, random.Random(s)) for s in range(20)}
    assert len(outs) > 5
    for out in outs:
        parts = out.split(", ")
        assert parts[:2] == ["char", "artist"] and sorted(parts[2:]) == ["a", "b", "c", "d", "e"]
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    assert [shuffle(tags, rng_a) for _ in range(5)] == [shuffle(tags, rng_b) for _ in range(5)]
    drop = CaptionProcessor(caption_dropout=0.3, caption_prefix="sks,")
    rng = random.Random(0)
    results = [drop("a cat", rng) for _ in range(2000)]
    assert set(results) == {"", "sks, a cat"}
    assert 0.25 < results.count("") / 2000 < 0.35
    assert CaptionProcessor()("  free text, kept as written ", random.Random(0)) == "  free text, kept as written "
    with pytest.raises(ValueError):
        CaptionProcessor(caption_dropout=1.5)


def test_dataset_samples_and_loader(folder, tmp_path):
    dataset, scan = build_folder_dataset(
        folder, min_size=MIN_SIZE, resolution=64, bucket_min_side=32, bucket_max_side=128,
        bucket_step=16, crop="random", shuffle_tags=True, seed=3, size_cache=tmp_path / "c.json")
    assert len(dataset) == len(scan.records) == 5
    grid = make_buckets(64, 32, 128, 16)
    for i in range(len(dataset)):
        sample = dataset[i]
        bw, bh = dataset.buckets[dataset.bucket_of_item[i]]
        assert (bw, bh) in grid
        assert sample["pixel_values"].shape == (3, bh, bw)
        assert -1.0 <= sample["pixel_values"].min() and sample["pixel_values"].max() <= 1.0
        assert sample["target_size"] == (bh, bw)
        record = scan.records[i]
        assert sample["original_size"] == (record.height, record.width)
        top, left = sample["crop_top_left"]
        assert top >= 0 and left >= 0 and sample["load_errors"] == []
    # Same (seed, epoch, index) -> same sample; another epoch -> another random crop somewhere.
    assert torch.equal(dataset[0]["pixel_values"], dataset[(0, 0)]["pixel_values"])
    crops = {dataset[(i, e)]["crop_top_left"] for e in range(6) for i in range(len(dataset))}
    assert len(crops) > len(dataset)
    sampler = BucketBatchSampler(dataset.bucket_of_item, 2, seed=3, small_bucket="repeat")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == len(sampler)
    for batch in batches:
        n = batch["pixel_values"].shape[0]
        assert n == 2 and batch["original_size"].shape == (n, 2) and len(batch["caption"]) == n
        assert batch["target_size"].dtype == torch.long
        assert tuple(batch["target_size"][0].tolist()) == batch["pixel_values"].shape[2:]


def test_decode_failure_at_load_is_replaced_not_raised(folder, tmp_path):
    # Without the data check at scan, the truncated JPEG passes and only fails when decoded.
    scan = scan_folder(folder, min_size=MIN_SIZE, verify_images=False, size_cache=False)
    trunc = [i for i, r in enumerate(scan.records) if r.path.endswith("trunc.jpg")]
    assert len(trunc) == 1
    dataset = FolderDataset(scan.records, buckets=[(48, 48)], seed=0)
    sample = dataset[trunc[0]]
    # Both truncated files passed this scan, so the substitute may itself fail once.
    failed = [p.rsplit("/", 1)[-1] for p, _ in sample["load_errors"]]
    assert failed[0] == "trunc.jpg" and set(failed) <= {"trunc.jpg", "trunc.png"}
    assert "trunc." not in sample["path"] and sample["pixel_values"].shape == (3, 48, 48)
    again = dataset[trunc[0]]  # known-bad items are replaced without another decode attempt
    assert again["load_errors"] == [] and "trunc." not in again["path"]
    assert collate([sample, again])["load_errors"] == sample["load_errors"]


def test_data_report(folder, tmp_path):
    text = data_report(root=folder, min_size=MIN_SIZE, resolution=64, bucket_min_side=32,
                       bucket_max_side=128, bucket_step=16, batch_size=2, small_bucket="drop",
                       size_cache=tmp_path / "c.json")
    assert "used 5 / skipped 9" in text
    assert "1 bucket(s) hold fewer images than one batch of 2" in text  # 48x80 holds 1 image
    assert "small_bucket=drop: 1 image(s)" in text
    assert " 64x64 " in text  # the square bucket of the 70x70 and 80x80 images
    for name, reason in EXPECTED_SKIPS.items():
        assert any(name in line and line.strip().startswith(reason) for line in text.splitlines())
    no_bucket = data_report(root=folder, min_size=MIN_SIZE, resolution=64, bucket=False,
                            size_cache=tmp_path / "c.json")
    assert "buckets (1 in use" in no_bucket and " 64x64 " in no_bucket


def test_default_header_cache_lives_in_project_cache(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SITDISTILL_CACHE", str(tmp_path / "cache"))
    scan_folder(folder, min_size=MIN_SIZE)
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 1 and str(folder.resolve()) not in files[0].name
    assert len(json.loads(files[0].read_text())["entries"]) == 5 + 4  # images with good side files


def test_a_finished_toy_folder_is_never_replaced_by_a_later_writer(tmp_path, monkeypatch):
    """Two processes drawing the same toy folder: the one that finishes second keeps the first's
    finished copy (a rank may be reading it) and leaves no temporary folder behind."""
    from omegaconf import OmegaConf

    from sitdistill.data import pipeline
    from sitdistill.data.toy import ToyWorld

    monkeypatch.setenv("SITDISTILL_CACHE", str(tmp_path / "cache"))
    cfg = OmegaConf.create({"toy": {"num_images": 6, "seed": 0, "exclude_combos": []}})
    real_write = ToyWorld.write_folder
    other = {}

    def other_process_finishes_meanwhile(self, out_dir, n, seed, metadata=True):
        monkeypatch.setattr(ToyWorld, "write_folder", real_write)
        other["folder"] = pipeline.toy_data_folder(cfg)  # the other process: draws, renames, reads
        (other["folder"] / "read-by-the-other-process").write_text("")
        return real_write(self, out_dir, n, seed, metadata)  # this process goes on with its own copy

    monkeypatch.setattr(ToyWorld, "write_folder", other_process_finishes_meanwhile)
    mine = pipeline.toy_data_folder(cfg)
    assert mine == other["folder"] and (mine / "read-by-the-other-process").is_file()  # kept, not swapped
    assert (mine / "COMPLETE").is_file() and len(list(mine.glob("*.png"))) == 6
    assert not [p for p in mine.parent.iterdir() if p.name.startswith(".tmp-")]
