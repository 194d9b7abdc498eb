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
    if config is not None:
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


class LatentCache:
    """`get`/`put` posterior entries by key under `root/<model fingerprint>/`."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, crop: str = "center"):
        self.dir = Path(root) / f"latents-v{CACHE_FORMAT}-{fingerprint}"
        self.dir.mkdir(parents=True, exist_ok=True)
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

    def _file(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        f = self._file(key)
        if not f.is_file():
            return None
        try:
            return load_file(f)
        except Exception:  # a damaged entry is rebuilt, never trusted
            return None

    def put(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        f = self._file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
        save_file({k: v.detach().cpu().contiguous() for k, v in entry.items()}, str(tmp))
        os.replace(tmp, f)

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.safetensors"))
