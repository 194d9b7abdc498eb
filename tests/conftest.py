"""Shared test setup: nothing in the suite may reach a hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

# The suite runs tiny models: one intra-op thread avoids OpenMP synchronisation that costs more
# than the work itself, and keeps timings steady when the two cores are shared.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """Tiny SD1.5- and SDXL-like pipeline folders, built once for the suite (read-only for tests).
    Three VAE blocks: factor 4, so the toy world's 16-px bucket step is VAE x student patch 2 x 2."""
    from tiny_models import make_tiny_sd15, make_tiny_sdxl

    base = tmp_path_factory.mktemp("teachers")
    return {"sd15": make_tiny_sd15(base / "sd15", vae_blocks=3), "sdxl": make_tiny_sdxl(base / "sdxl", vae_blocks=3)}


@pytest.fixture
def private_cache(tmp_path_factory, monkeypatch):
    """Toy data and latent/text caches under the test's temporary root, never the user's cache."""
    monkeypatch.setenv("SITDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
