"""Bucket grid math, assignment, resize/crop coordinates, and the batch sampler."""
import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sitdistill.data.buckets import (SMALL_BUCKET_POLICIES, BucketBatchSampler, assign_bucket,
                          bucket_histogram, make_buckets, resize_and_crop, validate_step)

GRIDS = [(512, 256, 1024, 64), (1024, 512, 2048, 64), (256, 128, 512, 32), (64, 32, 128, 16),
         (500, 256, 1024, 64)]


@pytest.mark.parametrize("resolution,min_side,max_side,step", GRIDS)
def test_grid_sides_area_and_orientations(resolution, min_side, max_side, step):
    buckets = make_buckets(resolution, min_side, max_side, step)
    area = resolution ** 2
    assert buckets == sorted(set(buckets))
    assert ((resolution, resolution) in buckets) == (resolution % step == 0)
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert min_side <= w <= max_side and min_side <= h <= max_side
        assert w * h <= area
        # Rounded down by less than one step on the shorter side.
        assert 1 - w * h / area < step / min(w, h)
        assert (h, w) in buckets


# Landscape half of the SDXL training resolutions (Podell et al. 2023, appendix I).
SDXL_LANDSCAPE = {(1024, 1024), (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832),
                  (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
                  (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512),
                  (1920, 512), (1984, 512), (2048, 512)}


def test_sdxl_grid_golden():
    # kohya's rule keeps one height per width; every bucket it makes is one SDXL trained at, and
    # it spans the same aspect range (SDXL's list adds a second height at four widths).
    landscape = {b for b in make_buckets(1024, 512, 2048, 64) if b[0] >= b[1]}
    assert landscape < SDXL_LANDSCAPE
    assert SDXL_LANDSCAPE - landscape == {(1024, 960), (1088, 896), (1152, 832), (1344, 704)}


@pytest.mark.parametrize("grid,max_error", [((512, 256, 1024, 64), 1.17), ((1024, 512, 2048, 64), 1.08)])
def test_aspect_error_bounded(grid, max_error):
    buckets = make_buckets(*grid)
    aspects = [w / h for w, h in buckets]
    for ar in np.exp(np.linspace(math.log(min(aspects)), math.log(max(aspects)), 301)):
        w, h = 1000 * ar, 1000
        bw, bh = assign_bucket(w, h, buckets)
        assert math.exp(abs(math.log(ar / (bw / bh)))) <= max_error


def test_max_aspect_and_bad_grids():
    assert all(max(b) / min(b) <= 2 for b in make_buckets(512, 256, 1024, 64, max_aspect=2))
    with pytest.raises(ValueError, match="multiples of bucket_step"):
        make_buckets(512, 250, 1024, 64)
    with pytest.raises(ValueError):
        make_buckets(512, 1024, 256, 64)


def test_validate_step():
    validate_step(64, 8, 2)
    validate_step(32, 8, 4)
    with pytest.raises(ValueError, match=r"48 .*8 x 4 = 32"):
        validate_step(48, 8, 4)


def test_assign_bucket_orientation_and_no_upscale():
    buckets = make_buckets(512, 256, 1024, 64)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    assert assign_bucket(1600, 900, buckets) == (640, 384)
    assert assign_bucket(900, 1600, buckets) == (384, 640)
    # Large image: no_upscale changes nothing.
    assert assign_bucket(1600, 900, buckets, no_upscale=True, step=64) == (640, 384)
    # Small image: its own bucket, on the step grid, inside the image.
    assert assign_bucket(300, 200, buckets, no_upscale=True, step=64) == (256, 192)
    assert assign_bucket(300, 200, buckets) == (640, 384)
    # Large area but too thin for its grid bucket: shrunk to fit the grid's limits, never enlarged.
    bw, bh = assign_bucket(3000, 250, buckets, no_upscale=True, step=64)
    assert (bw, bh) == (1024, 64) and bw * bh <= 512 ** 2


def _gradient(w, h):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                                           np.full((h, w, 1), 128, np.float32)], 2).astype(np.uint8))


@pytest.mark.parametrize("crop", ["center", "random"])
def test_resize_and_crop_coordinates(crop):
    img = _gradient(300, 200)
    out, original, (top, left) = resize_and_crop(img, (128, 128), crop, np.random.default_rng(0))
    assert out.size == (128, 128) and original == (200, 300)
    # Cover: scale 128/200 -> 192x128, so only the width is cropped.
    assert top == 0 and 0 <= left <= 192 - 128
    if crop == "center":
        assert left == 32
    resized = img.resize((192, 128), Image.Resampling.LANCZOS, reducing_gap=3.0)
    expect = np.asarray(resized)[top:top + 128, left:left + 128]
    assert np.array_equal(np.asarray(out), expect)


def test_random_crop_reproducible():
    img = _gradient(400, 100)
    lefts = {resize_and_crop(img, (64, 64), "random", np.random.default_rng(s))[2][1] for s in range(8)}
    assert len(lefts) > 1
    a = resize_and_crop(img, (64, 64), "random", np.random.default_rng(3))
    b = resize_and_crop(img, (64, 64), "random", np.random.default_rng(3))
    assert a[2] == b[2] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    with pytest.raises(ValueError):
        resize_and_crop(img, (64, 64), "random")


# Buckets of sizes 7, 5, 2 and 1 items: with batch 3, two buckets are smaller than a batch.
BUCKETS_OF_ITEMS = [0] * 7 + [1] * 5 + [2] * 2 + [3]


def _epoch(sampler):
    return [list(b) for b in sampler]


def test_sampler_policies():
    counts = Counter(BUCKETS_OF_ITEMS)
    for policy in SMALL_BUCKET_POLICIES:
        sampler = BucketBatchSampler(BUCKETS_OF_ITEMS, 3, seed=0, small_bucket=policy)
        batches = _epoch(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            assert len({BUCKETS_OF_ITEMS[i] for i in batch}) == 1
        seen = Counter(i for b in batches for i in b)
        if policy == "drop":
            assert all(len(b) == 3 for b in batches)
            assert len(batches) == sum(n // 3 for n in counts.values()) == 3
            assert not any(BUCKETS_OF_ITEMS[i] in (2, 3) for i in seen)
        elif policy == "repeat":
            assert all(len(b) == 3 for b in batches)
            assert set(seen) == set(range(len(BUCKETS_OF_ITEMS)))
            assert len(batches) == sum(-(-n // 3) for n in counts.values()) == 7
        else:
            assert seen == Counter(range(len(BUCKETS_OF_ITEMS)))
            assert sorted(len(b) for b in batches) == [1, 1, 2, 2, 3, 3, 3]


def test_sampler_deterministic_and_epochs_differ():
    make = lambda seed: BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=seed)
    a, b = make(0), make(0)
    assert _epoch(a) == _epoch(b)
    # Iterating to the end moves on to epoch 1 by itself; set_epoch(1) then changes nothing.
    assert a.epoch == 1
    a.set_epoch(1)
    second = _epoch(a)
    b.set_epoch(1)
    assert second == _epoch(b)
    first = _epoch(make(0))
    assert second != first
    assert _epoch(make(1)) != first
    tagged = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=0, with_epoch=True)
    tagged.set_epoch(1)
    assert _epoch(tagged) == [[(i, 1) for i in batch] for batch in second]
    unshuffled = BucketBatchSampler(BUCKETS_OF_ITEMS, 3, seed=0, shuffle=False, small_bucket="partial")
    assert _epoch(unshuffled)[:2] == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sampler_sharding(world_size):
    full = _epoch(BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=5))  # 4 + 3 + 1 + 1 = 9 batches
    ranks = [_epoch(BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=5, rank=r, world_size=world_size))
             for r in range(world_size)]
    per_rank = -(-len(full) // world_size)
    assert [len(r) for r in ranks] == [per_rank] * world_size
    assert len(BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=5, rank=1, world_size=world_size)) == per_rank
    # Interleaved: step k of rank r is global batch k * world_size + r; the padding repeats the
    # first batches, so every global batch is used and only the padding is seen twice.
    padded = full + full[: per_rank * world_size - len(full)]
    for r, batches in enumerate(ranks):
        assert batches == padded[r::world_size]
    used = Counter(tuple(b) for rank in ranks for b in rank)
    assert set(used) == {tuple(b) for b in full}
    assert sum(used.values()) - len(full) == per_rank * world_size - len(full)


def test_sampler_resume_mid_epoch():
    sampler = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=7, rank=1, world_size=2)
    sampler.set_epoch(3)
    reference = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=7, rank=1, world_size=2)
    reference.set_epoch(3)
    expected = _epoch(reference)
    it = iter(sampler)
    taken = [next(it), next(it)]
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["position"] == 2
    resumed = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # a trainer re-announcing the epoch must not restart it
    assert taken + _epoch(resumed) == expected
    # The trainer's own count wins over the sampler's (a prefetching loader runs ahead).
    assert sampler.state_dict(consumed=1)["position"] == 1
    with pytest.raises(ValueError, match="world_size"):
        BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=7, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(BUCKETS_OF_ITEMS, 3, seed=7, rank=1, world_size=2).load_state_dict(state)


def test_bucket_histogram():
    assert bucket_histogram([(512, 512), (640, 384), (512, 512)]) == [((512, 512), 2), ((640, 384), 1)]
