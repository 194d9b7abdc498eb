"""On-disk cache of VAE latents while the VAE is frozen.

What is cached is the VAE posterior of an image in its bucket, `(mean, std)` of
`vae.encode(x).latent_dist` already multiplied by the latent scaling, so the trainer draws a fresh
posterior sample every time (as uncached SD training does) instead of reusing one frozen sample.
The original size and crop offset of the image travel with it (SDXL micro-conditioning), so a
cache hit needs no image decode at all.

An entry's key covers everything that produced it: the image file's content (SHA-256), the bucket,
the crop policy, and the VAE's identity (its config, a digest of its weights, the dtype it ran in,
the scaling factor). Change any of them and the key changes, so a stale entry is never read; it is
simply rebuilt under its new key. Entries are safetensors files written atomically (temp file +
rename), so two processes filling the same entry at once, or a kill mid-write, leave either no
file or a whole one.

Random crops make a cached latent wrong for every epoch but one, so `cache_policy` turns caching
off for them with a message instead of caching silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CACHE_FORMAT = 1
_DIGEST_CHUNK = 1 << 20


def cache_policy(data_cfg: Any) -> tuple[bool, str]:
    """(enabled, reason) for latent caching under the recipe's `data` settings."""
    if not data_cfg.cache_latents:
        return False, "latent caching is off (data.cache_latents=false)"
    if data_cfg.crop == "random":
        return False, "latent caching turned off: data.crop=random gives a different crop every epoch"
    return True, "latents cached (VAE frozen, centre crops)"


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_DIGEST_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module, extra: dict | None = None) -> str:
    """A digest of a network's config and weights (and anything else that shapes its output)."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:  # diffusers FrozenDict or transformers PretrainedConfig
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _nbytes(entry: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in entry.values())


class TensorCache:
    """`get`/`put` safetensors entries by key under `root/<kind>-v<format>-<fingerprint>/`.

    Entries read or written are also kept in memory, most recently used first, up to
    `memory_bytes` (a small data set then costs no file read after its first epoch). A key names
    its content and everything that produced it, so a remembered entry never goes stale. Callers
    must not modify the tensors they get (the trainer stacks them into a new batch)."""

    def __init__(self, root: str | os.PathLike, kind: str, fingerprint: str, memory_bytes: int = 512 * 2**20):
        self.dir = Path(root) / f"{kind}-v{CACHE_FORMAT}-{fingerprint}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._held = 0

    def _file(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def _remember(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        size = _nbytes(entry)
        if size > self.memory_bytes:
            return
        old = self._memory.pop(key, None)
        self._held += size - (_nbytes(old) if old is not None else 0)
        self._memory[key] = entry
        while self._held > self.memory_bytes:
            self._held -= _nbytes(self._memory.popitem(last=False)[1])

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
            return entry
        f = self._file(key)
        if not f.is_file():
            return None
        try:
            entry = load_file(f)
        except Exception:  # a damaged entry is rebuilt, never trusted
            return None
        self._remember(key, entry)
        return entry

    def put(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        f = self._file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
        # Own copies: a row of a batch would keep the whole batch's storage alive in memory.
        entry = {k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for k, v in entry.items()}
        save_file(entry, str(tmp))
        os.replace(tmp, f)
        self._remember(key, entry)

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.safetensors"))


class LatentCache(TensorCache):
    """VAE posteriors keyed by image content + bucket + crop policy (the VAE is in the folder name)."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, crop: str = "center"):
        super().__init__(root, "latents", fingerprint)
        self.crop = crop
        self._digests: dict[tuple[str, float, int], str] = {}

    def digest(self, path: str) -> str:
        """Content digest of an image file, memoised by (path, mtime, size) for this process."""
        st = os.stat(path)
        key = (path, st.st_mtime, st.st_size)
        if key not in self._digests:
            self._digests[key] = file_digest(path)
        return self._digests[key]

    def key(self, path: str, bucket: tuple[int, int]) -> str:
        text = f"{self.digest(path)}|{bucket[0]}x{bucket[1]}|{self.crop}"
        return hashlib.sha256(text.encode()).hexdigest()[:40]


# Conditioning keys that depend on the caption alone (SDXL's time_ids depend on sizes: computed).
TEXT_KEYS = ("encoder_hidden_states", "text_embeds")


def text_cache_policy(data_cfg: Any) -> tuple[bool, str]:
    if not data_cfg.cache_latents:
        return False, "text-embedding caching is off (data.cache_latents=false)"
    if data_cfg.shuffle_tags:
        return False, "text-embedding caching turned off: data.shuffle_tags makes a new caption every epoch"
    return True, "text embeddings cached (text encoders frozen)"


class TextCache:
    """The teacher's prompt encodings per caption, on disk, so frozen encoders run once per caption.

    `encode(captions, **sizes)` returns `(cond, uncond)` exactly as `teacher.encode_prompt(...,
    do_cfg=True)` would: cached rows for the caption-only keys, SDXL `time_ids` computed from the
    sizes, and the unconditional input (an empty negative prompt) encoded once.
    """

    def __init__(self, front, root: str | os.PathLike):
        """`front`: the teacher's front end (`teacher.front`, frozen)."""
        self.front = front
        encoders = [m for name, m in front.modules().items() if name.startswith("text_encoder")]
        tokenizers = [getattr(front, n).name_or_path for n in front.TOKENIZERS]
        fp = hashlib.sha256("".join(module_fingerprint(e) for e in encoders).encode()
                            + json.dumps([front.family, str(front.dtype), tokenizers]
                                         + ([front.clip_skip] if front.clip_skip else [])
                                         ).encode()).hexdigest()[:32]
        self.store = TensorCache(root, "text", fp)
        self._uncond: dict[str, torch.Tensor] | None = None

    def _rows(self, captions: list[str]) -> dict[str, torch.Tensor]:
        keys = [hashlib.sha256(c.encode()).hexdigest()[:40] for c in captions]
        entries = {k: self.store.get(k) for k in set(keys)}
        misses = [c for c, k in zip(captions, keys) if entries[k] is None]
        if misses:
            unique = list(dict.fromkeys(misses))
            cond = self.front.encode_prompt(unique)
            for i, c in enumerate(unique):
                entry = {k: cond[k][i] for k in TEXT_KEYS if k in cond}
                key = hashlib.sha256(c.encode()).hexdigest()[:40]
                self.store.put(key, entry)
                entries[key] = entry
        device = self.front.device
        return {name: torch.stack([entries[k][name] for k in keys]).to(device)
                for name in entries[keys[0]]}

    def encode(self, captions: list[str], **sizes: Any) -> tuple[dict, dict]:
        te = self.front
        n = len(captions)
        cond = self._rows(list(captions))
        if self._uncond is None:
            _, uncond = te.encode_prompt([""], do_cfg=True)
            self._uncond = {k: v for k, v in uncond.items() if k in TEXT_KEYS}
        uncond = {k: v.expand(n, *v.shape[1:]) for k, v in self._uncond.items()}
        if te.family == "sdxl":
            time_ids = te.time_ids(n, **sizes)
            cond["time_ids"], uncond["time_ids"] = time_ids, time_ids.clone()
        return cond, uncond
