"""Latent and text-embedding caches: keys cover everything that made an entry, hits equal misses."""

import torch

from sitdistill.data.cache import LatentCache, TensorCache, TextCache, cache_policy, module_fingerprint, text_cache_policy
from sitdistill.core.recipe import load_recipe
from sitdistill.teachers import load_teacher
from tiny_models import make_tiny_sd15, make_tiny_sdxl
from PIL import Image


def test_latent_key_covers_content_bucket_and_crop(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16), "red").save(img)
    cache = LatentCache(tmp_path / "c", "fp1")
    k = cache.key(str(img), (16, 16))
    assert k == cache.key(str(img), (16, 16))
    assert k != cache.key(str(img), (16, 32))
    assert k != LatentCache(tmp_path / "c", "fp1", crop="random").key(str(img), (16, 16))
    Image.new("RGB", (16, 16), "blue").save(img)  # same name, new content
    assert cache.key(str(img), (16, 16)) != k
    # A different model lives in another folder: its entries are never read for this one.
    assert LatentCache(tmp_path / "c", "fp2").dir != cache.dir


def test_entries_round_trip_and_damaged_ones_are_rebuilt(tmp_path):
    cache = TensorCache(tmp_path, "latents", "fp")
    assert cache.get("ab" * 20) is None
    cache.put("ab" * 20, {"x": torch.arange(4.0)})
    assert torch.equal(cache.get("ab" * 20)["x"], torch.arange(4.0))
    cache._file("ab" * 20).write_bytes(b"garbage")
    # This process still holds the entry it wrote; a reader without it sees the damage.
    assert torch.equal(cache.get("ab" * 20)["x"], torch.arange(4.0))
    assert TensorCache(tmp_path, "latents", "fp").get("ab" * 20) is None
    assert not list(cache.dir.glob("*/.*tmp*"))


def test_entries_are_remembered_in_memory_within_a_byte_budget(tmp_path):
    cache = TensorCache(tmp_path, "latents", "fp", memory_bytes=3 * 16)  # three 4-float entries
    keys = [f"{i:02d}" * 20 for i in range(4)]
    for i, k in enumerate(keys):
        cache.put(k, {"x": torch.full((4,), float(i))})
    for f in cache.dir.glob("*/*.safetensors"):
        f.unlink()  # from now on only memory can answer
    assert cache.get(keys[0]) is None  # the oldest was dropped to stay within the budget
    assert [float(cache.get(k)["x"][0]) for k in keys[1:]] == [1.0, 2.0, 3.0]
    assert cache._held == 3 * 16
    cache.put(keys[0], {"x": torch.zeros(4)})  # evicts the least recently used: keys[1]
    assert cache.get(keys[1]) is None and cache.get(keys[2]) is not None
    batch = torch.zeros(16, 4)
    cache.put(keys[0], {"x": batch[3]})  # a row of a batch: held as its own 16 bytes, not the batch's 256
    assert cache.get(keys[0])["x"].untyped_storage().nbytes() == 16
    small = TensorCache(tmp_path, "latents", "fp", memory_bytes=8)
    small.put(keys[3], {"x": torch.ones(4)})  # 16 bytes: written, not held
    small._file(keys[3]).unlink()
    assert small.get(keys[3]) is None and small._held == 0


def test_fingerprint_follows_weights_and_dtype():
    a = torch.nn.Linear(3, 3)
    fp = module_fingerprint(a)
    assert module_fingerprint(a) == fp
    with torch.no_grad():
        a.weight[0, 0] += 1
    assert module_fingerprint(a) != fp
    assert module_fingerprint(a, {"dtype": "bf16"}) != module_fingerprint(a)


def test_options_that_invalidate_caching_turn_it_off_with_a_reason():
    on, reason = cache_policy(load_recipe(None, ["data.crop=random"]).data)
    assert not on and "random" in reason
    on, reason = text_cache_policy(load_recipe(None, ["data.shuffle_tags=true"]).data)
    assert not on and "shuffle_tags" in reason
    assert cache_policy(load_recipe().data)[0] and text_cache_policy(load_recipe().data)[0]


def test_text_cache_equals_the_teacher_encoding(tmp_path):
    prompts = ["a red circle", "a blue square", "a red circle"]
    for make, kw in ((make_tiny_sd15, {}), (make_tiny_sdxl, {"original_size": [(64, 48)] * 3,
                                                                 "crops_coords_top_left": [(0, 8)] * 3,
                                                                 "target_size": [(64, 48)] * 3})):
        teacher = load_teacher(make(tmp_path / make.__name__))
        cond, uncond = teacher.encode_prompt(prompts, do_cfg=True, **kw)
        cache = TextCache(teacher.front, tmp_path / "text")
        for _ in range(2):  # misses, then hits
            got, got_u = cache.encode(prompts, **kw)
            for k in cond:
                assert torch.equal(got[k], cond[k]), k
                assert torch.equal(got_u[k], uncond[k]), k
        assert len(cache.store) == 2  # one entry per distinct caption
