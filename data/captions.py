"""Caption processing at load time: caption dropout, tag shuffling with kept leading tags, prefix.

The names mirror kohya sd-scripts (`shuffle_caption`, `keep_tokens`, `caption_dropout_rate`,
`caption_prefix`) so users of that tool recognise them; the recipe's `data` section uses the same
field names as the constructor below.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Union

import numpy as np

Rng = Union[random.Random, np.random.Generator]


def _uniform(rng: Rng) -> float:
    """A float in [0, 1) from either kind of generator (both spell it `random()`)."""
    return float(rng.random())


def _shuffled(items: list[str], rng: Rng) -> list[str]:
    if isinstance(rng, np.random.Generator):
        return [items[i] for i in rng.permutation(len(items))]
    items = list(items)
    rng.shuffle(items)
    return items


@dataclass(frozen=True)
class CaptionProcessor:
    """Turns a stored caption into the caption one training step sees.

    Order of operations (kohya's order):
      1. caption dropout: with probability `caption_dropout` the caption is the empty string —
         prefix included — so the model also learns the unconditional prediction that
         classifier-free guidance needs (Ho & Salimans 2022 train with p_uncond = 0.1-0.2);
      2. tag shuffling: the caption is split on `tag_separator`, empty tags are dropped, the first
         `keep_tokens` tags stay in place (e.g. a character name or a trigger word) and the rest
         are shuffled; tags are re-joined with `tag_separator + " "`;
      3. prefix: `caption_prefix` is put in front as one more leading tag
         ("<prefix>, <caption>"), never shuffled and never counted in `keep_tokens`.

    Without shuffling the caption text is kept as written (free-text captions are not split).
    The result depends only on the caption and the generator passed in, so a generator seeded
    from (seed, epoch, index) makes every step reproducible across resume and workers.
    """

    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_separator: str = ","
    caption_dropout: float = 0.0
    caption_prefix: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        if not self.tag_separator:
            raise ValueError("tag_separator must not be empty")

    def __call__(self, caption: str, rng: Rng) -> str:
        """Return the processed caption; `rng` is a `random.Random` or `np.random.Generator`."""
        # Always draw the dropout number, so the generator's stream does not depend on the rate.
        if _uniform(rng) < self.caption_dropout:
            return ""
        joiner = self.tag_separator + " "
        if self.shuffle_tags:
            tags = [t.strip() for t in caption.split(self.tag_separator)]
            tags = [t for t in tags if t]
            kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens:]
            caption = joiner.join(kept + _shuffled(rest, rng))
        # "sks," and "sks" give the same result: the separator is added here, once.
        prefix = self.caption_prefix.strip().removesuffix(self.tag_separator).strip()
        if prefix:
            caption = joiner.join(p for p in (prefix, caption) if p)
        return caption
