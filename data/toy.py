"""The toy world: captioned images drawn by code, and a grader that checks an image against its caption.

One coloured shape on a grey (plain or noisy) background; the caption says what is drawn:

    "a large red circle at the top left on a plain background"

Every factor is an explicit table below, a caption parses back to its spec, and drawing is a pure
function of the spec (which carries its own seed), so a data set is reproducible from ``(n, seed)``.
Because the world is known, any image (a teacher's or a student's sample) can be graded against
its prompt: the dominant saturated colour, the shape of that colour's region (template IoU) and
where its centroid lies. Grading is what gives the toy world its prompt-fidelity score.

Images are small on purpose (64 px class, see ``RESOLUTIONS``) so that a VAE, a UNet teacher and a
SiT student all train on a CPU. Every resolution is a multiple of 16 = VAE factor 4 x student
patch 2 x 2 (the toy UNet halves the latent twice), so the pixel, latent and token grids all divide.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

# --- The world's factors -------------------------------------------------------------------
# Colours sit ~60 degrees apart in hue and are strongly saturated; backgrounds are grey, so
# "saturated pixels" is the foreground and "nearest palette hue" is the colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (225, 205, 40),
    "green": (40, 175, 60),
    "cyan": (40, 190, 210),
    "blue": (50, 80, 225),
    "magenta": (200, 50, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Centre of the shape as (x, y) fractions of (width, height); the caption phrase goes with it.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "center": (0.50, 0.50),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
}
POSITION_PHRASES: dict[str, str] = {p: ("in the " if p == "center" else "at the ") + p for p in POSITIONS}
# Shape extent (bounding-box side) as a fraction of min(width, height).
SIZES: dict[str, float] = {"small": 0.30, "large": 0.46}
BACKGROUNDS: tuple[str, ...] = ("plain", "noisy")
# (width, height); every side a multiple of 16 (see the module docstring).
RESOLUTIONS: tuple[tuple[int, int], ...] = ((64, 64), (64, 48), (48, 64))

# Drawing noise: small random variation so that no two images of one caption are identical.
SIZE_JITTER = 0.10          # relative, uniform +-
POSITION_JITTER = 0.04      # fraction of min(width, height), uniform +-
COLOUR_JITTER = 12          # per channel, uniform +-
BACKGROUND_GREY = (60, 190)  # plain/noisy background base grey level range
# The "noisy" background is a smooth texture (noise on a coarse grid, upsampled) plus a little
# fine grain: a factor-4 VAE can reconstruct it, so its loss is not swamped by incompressible noise.
NOISE_STD = 24.0            # luminance texture amplitude
NOISE_CELL = 4              # texture grid cell, pixels
GRAIN_STD = 4.0             # fine per-pixel luminance grain
CHROMA_NOISE_STD = 3.0      # per-channel noise, keeps the noisy background near-grey
SUPERSAMPLE = 4             # anti-aliasing: coverage computed on a 4x4 sub-pixel grid

# Grading thresholds. Saturation = max(rgb) - min(rgb) in 0..255; the palette is >= 150, grey
# backgrounds are ~0 (noisy ones < ~30), so 60 separates them with room for blurry samples.
SATURATION_THRESHOLD = 60.0
HUE_TOLERANCE = 30.0        # degrees: half the spacing between palette hues
MIN_FOREGROUND_PIXELS = 4   # fewer matching pixels than this: "nothing drawn" -> all grades False

_CAPTION_RE = re.compile(
    r"^a (?:(?P<size>{sizes}) )?(?P<colour>{colours}) (?P<shape>{shapes}) (?:at|in) the (?P<position>{positions})"
    r"(?: on a (?P<background>{backgrounds}) background)?$".format(
        sizes="|".join(SIZES), colours="|".join(COLOURS), shapes="|".join(SHAPES),
        positions="|".join(sorted(POSITIONS, key=len, reverse=True)), backgrounds="|".join(BACKGROUNDS)))


@dataclass(frozen=True)
class ToySpec:
    """Everything that determines one toy image (drawing is a pure function of this)."""
    colour: str
    shape: str
    position: str
    size: str = "large"
    background: str = "plain"
    width: int = 64
    height: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for value, table, name in ((self.colour, COLOURS, "colour"), (self.shape, SHAPES, "shape"),
                                   (self.position, POSITIONS, "position"), (self.size, SIZES, "size"),
                                   (self.background, BACKGROUNDS, "background")):
            if value not in table:
                raise ValueError(f"unknown toy {name} {value!r}; choose from {list(table)}")

    @property
    def combo(self) -> tuple[str, str]:
        """The (colour, shape) pair: the unit a study holds out."""
        return (self.colour, self.shape)

    @property
    def caption(self) -> str:
        return (f"a {self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position]} "
                f"on a {self.background} background")

    def to_dict(self) -> dict:
        return {**asdict(self), "caption": self.caption}


def parse_caption(caption: str) -> dict:
    """Caption -> dict(colour, shape, position, size, background); size/background may be None.

    Accepts the full form written by ``ToySpec.caption`` and the short form without size and
    background ("a red circle at the top left"). Raises ValueError on anything else.
    """
    m = _CAPTION_RE.match(" ".join(caption.strip().lower().split()))
    if m is None:
        raise ValueError(f"not a toy-world caption: {caption!r}")
    return m.groupdict()


def spec_from_caption(caption: str, width: int = 64, height: int = 64, seed: int = 0) -> ToySpec:
    fields = {k: v for k, v in parse_caption(caption).items() if v is not None}
    return ToySpec(width=width, height=height, seed=seed, **fields)


def all_combos() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class ToyWorld:
    """A sampler over the world, optionally restricted to some (colour, shape) combinations.

    ``exclude_combos`` removes pairs entirely (held out for a generalisation study);
    ``only_combos`` keeps just those pairs. Position, size and background stay free.
    """
    resolutions: tuple[tuple[int, int], ...] = RESOLUTIONS
    exclude_combos: tuple[tuple[str, str], ...] = ()
    only_combos: tuple[tuple[str, str], ...] | None = None

    def combos(self) -> list[tuple[str, str]]:
        allowed = [tuple(c) for c in self.only_combos] if self.only_combos is not None else all_combos()
        excluded = {tuple(c) for c in self.exclude_combos}
        for c in list(allowed) + list(excluded):
            ToySpec(colour=c[0], shape=c[1], position="center")  # validates the names
        combos = [c for c in allowed if c not in excluded]
        if not combos:
            raise ValueError("the combination filter leaves no (colour, shape) pair")
        return combos

    def sample(self, n: int, seed: int) -> list[ToySpec]:
        """n specs, a pure function of (n, seed, world); factors drawn independently and uniformly."""
        rng = np.random.default_rng(seed)
        combos, positions, sizes = self.combos(), list(POSITIONS), list(SIZES)
        specs = []
        for _ in range(n):
            colour, shape = combos[rng.integers(len(combos))]
            width, height = self.resolutions[rng.integers(len(self.resolutions))]
            specs.append(ToySpec(colour=colour, shape=shape, position=positions[rng.integers(len(positions))],
                                 size=sizes[rng.integers(len(sizes))],
                                 background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
                                 width=int(width), height=int(height), seed=int(rng.integers(2**31 - 1))))
        return specs

    def prompts(self, n: int, seed: int) -> list[str]:
        """n captions for evaluation (use a seed the training data did not use)."""
        return [s.caption for s in self.sample(n, seed)]

    def write_folder(self, out_dir: str | Path, n: int, seed: int, metadata: bool = True) -> list[Path]:
        """Write n images as a tagutl folder: ``NNNNNN.png`` + ``NNNNNN.txt`` (+ ``NNNNNN.json``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, spec in enumerate(self.sample(n, seed)):
            stem = out / f"{i:06d}"
            draw(spec).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(spec.caption + "\n")
            if metadata:
                stem.with_suffix(".json").write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
            paths.append(stem.with_suffix(".png"))
        return paths


def write_folder(out_dir: str | Path, n: int, seed: int, sizes: Sequence[tuple[int, int]] = RESOLUTIONS,
                 exclude_combos: Iterable[tuple[str, str]] = (),
                 only_combos: Iterable[tuple[str, str]] | None = None, metadata: bool = True) -> list[Path]:
    """Convenience: ``ToyWorld(...).write_folder``; ``sizes`` are (width, height) pairs."""
    world = ToyWorld(resolutions=tuple(tuple(s) for s in sizes), exclude_combos=tuple(map(tuple, exclude_combos)),
                     only_combos=None if only_combos is None else tuple(map(tuple, only_combos)))
    return world.write_folder(out_dir, n, seed, metadata=metadata)


def prompts(n: int, seed: int, **world_kwargs) -> list[str]:
    return ToyWorld(**world_kwargs).prompts(n, seed)


# --- Drawing --------------------------------------------------------------------------------
def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside-test for a shape centred at 0 with bounding box [-r, r]^2 (dy grows downward)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(shape)


def _coverage(shape: str, width: int, height: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (H, W) in [0, 1], from sub-pixel samples."""
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)  # (H*S,)
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)   # (W*S,)
    inside = _shape_mask(shape, xs[None, :] - cx, ys[:, None] - cy, r)  # (H*S, W*S)
    return inside.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))


def draw(spec: ToySpec) -> Image.Image:
    """Render a spec as an RGB PIL image of size (spec.width, spec.height)."""
    rng = np.random.default_rng(spec.seed)
    w, h, short = spec.width, spec.height, min(spec.width, spec.height)
    grey = rng.uniform(*BACKGROUND_GREY)
    canvas = np.full((h, w, 3), grey, dtype=np.float64)
    if spec.background == "noisy":
        coarse = rng.normal(0.0, NOISE_STD, (-(-h // NOISE_CELL), -(-w // NOISE_CELL))).astype(np.float32)
        texture = np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.BILINEAR), dtype=np.float64)
        canvas += (texture + rng.normal(0.0, GRAIN_STD, (h, w)))[..., None]
        canvas += rng.normal(0.0, CHROMA_NOISE_STD, (h, w, 3))

    r = SIZES[spec.size] * short * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER) / 2
    fx, fy = POSITIONS[spec.position]
    cx = np.clip(fx * w + rng.uniform(-POSITION_JITTER, POSITION_JITTER) * short, r, w - r)
    cy = np.clip(fy * h + rng.uniform(-POSITION_JITTER, POSITION_JITTER) * short, r, h - r)
    colour = np.asarray(COLOURS[spec.colour], dtype=np.float64) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)

    alpha = _coverage(spec.shape, w, h, cx, cy, r)[..., None]  # (H, W, 1)
    canvas = canvas * (1 - alpha) + colour * alpha
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


# --- Grading --------------------------------------------------------------------------------
def to_uint8_hwc(image) -> np.ndarray:
    """PIL image, uint8 (H, W, 3) array, or float tensor/array (3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # torch tensor, without importing torch here
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    return np.clip(np.rint((arr + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _hue_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and saturation as max - min (0..255) of a float (..., 3) array."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (hue * 60.0) % 360.0, chroma


_PALETTE_HUES = {name: float(_hue_saturation(np.asarray(rgb, dtype=np.float64))[0]) for name, rgb in COLOURS.items()}


def _hue_distance(a: np.ndarray, b: float) -> np.ndarray:
    d = np.abs(a - b) % 360.0
    return np.minimum(d, 360.0 - d)


def _template_moments(shape: str) -> tuple[float, float, float]:
    """(mean_y, std_x, std_y) of a shape with bounding box [-1, 1]^2, measured on a fine grid."""
    g = (np.arange(256) + 0.5) / 128 - 1
    ys, xs = np.nonzero(_shape_mask(shape, g[None, :], g[:, None], 1.0))
    return g[ys].mean(), g[xs].std(), g[ys].std()


_TEMPLATE_MOMENTS = {shape: _template_moments(shape) for shape in SHAPES}


def _classify_shape(mask: np.ndarray) -> str:
    """The shape whose template overlaps the region best (IoU).

    Each template is placed by moment matching (same centroid and x/y spread as the region) rather
    than by bounding box: moments barely move under blur and stray pixels, which would otherwise cut
    a diamond's tips off its box and make it look like a circle.
    """
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    mx, my, sx, sy = xs.mean(), ys.mean(), max(xs.std(), 0.5), max(ys.std(), 0.5)
    gx, gy = np.arange(w) + 0.0, np.arange(h) + 0.0
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        t_my, t_sx, t_sy = _TEMPLATE_MOMENTS[shape]
        rx, ry = sx / t_sx, sy / t_sy  # template half-extents that reproduce the region's spread
        cx, cy = mx, my - t_my * ry
        t = _shape_mask(shape, ((gx - cx) / rx)[None, :], ((gy - cy) / ry)[:, None], 1.0)
        iou = (mask & t).sum() / max(1, (mask | t).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def analyse(image) -> dict:
    """What the grader sees: dict(colour, shape, position) (None where nothing saturated is drawn)."""
    rgb = to_uint8_hwc(image).astype(np.float64)
    h, w = rgb.shape[:2]
    hue, sat = _hue_saturation(rgb)
    saturated = sat > SATURATION_THRESHOLD
    # Dominant colour: the palette hue with the most saturation mass near it.
    scores = {name: float((sat * (saturated & (_hue_distance(hue, ph) < HUE_TOLERANCE))).sum())
              for name, ph in _PALETTE_HUES.items()}
    colour = max(scores, key=scores.get)
    mask = saturated & (_hue_distance(hue, _PALETTE_HUES[colour]) < HUE_TOLERANCE)
    if mask.sum() < MIN_FOREGROUND_PIXELS:
        return {"colour": None, "shape": None, "position": None}
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return {"colour": colour, "shape": _classify_shape(mask), "position": position}


def _target(caption_or_spec: str | ToySpec | dict) -> dict:
    if isinstance(caption_or_spec, ToySpec):
        return {"colour": caption_or_spec.colour, "shape": caption_or_spec.shape,
                "position": caption_or_spec.position}
    if isinstance(caption_or_spec, dict):
        return caption_or_spec
    return parse_caption(caption_or_spec)


def _matches(seen: dict, reference: dict) -> dict[str, bool]:
    """Per attribute: did the grader see the reference's value (nothing seen never matches)?"""
    return {k: seen[k] is not None and seen[k] == reference[k] for k in ("colour", "shape", "position")}


def grade(image, caption_or_spec: str | ToySpec | dict) -> dict[str, bool]:
    """Does the image show the caption's colour, shape and position? -> dict of three bools."""
    return _matches(analyse(image), _target(caption_or_spec))


def match_rates(seen: Sequence[dict], references: Sequence[dict]) -> dict[str, float]:
    """Rates at which analyses (``analyse`` outputs) match references: colour, shape, position and
    all three. References are targets (a caption's attributes) or other analyses (does one model
    draw what another drew)."""
    if len(seen) != len(references):
        raise ValueError(f"{len(seen)} analyses but {len(references)} references")
    hits = [_matches(s, r) for s, r in zip(seen, references)]
    n = max(1, len(hits))
    rates = {k: sum(h[k] for h in hits) / n for k in ("colour", "shape", "position")}
    rates["all"] = sum(all(h.values()) for h in hits) / n
    return rates


def fidelity(images: Sequence, targets: Sequence[str | ToySpec | dict]) -> dict[str, float]:
    """Rates over a batch: colour, shape, position, all three together, and n."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} captions/specs")
    return {**match_rates([analyse(im) for im in images], [_target(t) for t in targets]), "n": len(images)}


__all__ = ["COLOURS", "SHAPES", "POSITIONS", "SIZES", "BACKGROUNDS", "RESOLUTIONS", "ToySpec", "ToyWorld",
           "parse_caption", "spec_from_caption", "all_combos", "write_folder", "prompts", "draw", "grade",
           "analyse", "fidelity", "match_rates", "to_uint8_hwc"]
