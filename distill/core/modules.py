"""Small helpers on torch modules shared by the training, sampling and toy-teacher code."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """The modules in eval mode inside the block; each one's own train/eval mode restored after it,
    also when the block raises."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
