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
