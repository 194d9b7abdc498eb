"""Single-file teachers without the network: what a model is, from its keys; its configs, from here.

A community fine-tune is usually one original-layout (ldm / sgm) file. diffusers' ``from_single_file``
needs the diffusers configs of the model type beside it, and by default downloads them. This module
finds them locally instead:

1. **The model type from the keys** (``detect``): SDXL has a second text encoder
   (``conditioner.embedders.1.``); otherwise the UNet's cross-attention width says SD1.x (768),
   SD2.x (1024) or an SDXL UNet alone (2048). A ``v_pred`` / ``ztsnr`` marker key (what ComfyUI and
   kohya's scripts write into v-prediction / zero-terminal-SNR checkpoints) sets the prediction type
   and the schedule; ``teacher.prediction_type`` / ``teacher.zero_terminal_snr`` decide where the keys
   cannot tell (an SD2 768-v file looks like an SD2 base file).
2. **The component configs** ship with the package (``teachers/configs/{sd1,sd2,sdxl}``: JSON
   values only: UNet, VAE, text encoders, scheduler, tokenizer settings).
3. **The tokenizer vocabulary** (CLIP's BPE ``vocab.json`` + ``merges.txt``, or ``tokenizer.json``; the three CLIP text
   encoders of SD1, SD2 and SDXL share it) is looked up in this order: ``teacher.config`` (a diffusers
   folder), the assembled folder (``<cache>/single-file/<type>/tokenizer*/``, where a user may place
   the two files), then the local hugging-face cache (``CLIP_TOKENIZER_SOURCES``). Nothing is
   downloaded; when none is found, the error names the two files and the folder to put them in.

``config_folder(kind, ...)`` assembles a diffusers folder (one per scheduler setting) from these parts, which ``load_teacher``
hands to ``from_single_file(config=..., local_files_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent / "configs"
KINDS = {"sd1": "sd15", "sd2": "sd15", "sdxl": "sdxl"}  # model type -> teacher family
# CLIP's BPE: vocab.json + merges.txt, or the same in one tokenizer.json (what transformers 5 writes).
TOKENIZER_FILESETS = (("vocab.json", "merges.txt"), ("tokenizer.json",))
# (repo id, subfolder) of local hugging-face cache entries that hold the CLIP BPE files.
CLIP_TOKENIZER_SOURCES = (
    ("openai/clip-vit-large-patch14", ""),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
    ("stabilityai/stable-diffusion-2-1", "tokenizer"),
    ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""),
    ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ""),
)
CROSS_ATTENTION_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
SDXL_CROSS_ATTENTION_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"
CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"


class SingleFileError(ValueError):
    """A single file that cannot be used as a teacher, or configs that cannot be found offline."""


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a single-file checkpoint, reading headers only where the format allows
    (safetensors); pickles only with ``weights_only`` (memory-mapped)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    from sitdistill.core.checkpoint import UnsafeFileError, load_weights_only

    try:
        state = load_weights_only(path, mmap=True)
    except UnsafeFileError:
        raise
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        state = load_weights_only(path)
    state = state.get("state_dict", state)
    return {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}


def markers(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """What the marker keys say (prediction type, zero terminal SNR), whatever the model type."""
    return {"prediction_type": "v_prediction" if V_PRED_KEY in shapes else None,
            "zero_terminal_snr": True if ZTSNR_KEY in shapes else None}


def detect(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``{"kind": sd1|sd2|sdxl, "family": sd15|sdxl, "unet_only": bool, "prediction_type": str|None,
    "zero_terminal_snr": bool|None}`` from tensor names and shapes; SingleFileError when it is not
    a text-to-image SD UNet checkpoint."""
    keys = set(shapes)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        kind = "sdxl"
    else:
        key = CROSS_ATTENTION_KEY if CROSS_ATTENTION_KEY in keys else SDXL_CROSS_ATTENTION_KEY
        if key not in keys:
            raise SingleFileError("no Stable Diffusion UNet in this file (no 'model.diffusion_model.' "
                                  "cross-attention weights): not an SD1.x, SD2.x or SDXL checkpoint")
        width = shapes[key][-1]
        if width not in CONTEXT_WIDTHS:
            raise SingleFileError(f"a UNet with cross-attention width {width}: not SD1.x (768), SD2.x (1024) or SDXL "
                                  "(2048); give its configs with teacher.config (a diffusers folder)")
        kind = CONTEXT_WIDTHS[width]
    conv_in = shapes.get(CONV_IN_KEY)
    if conv_in is not None and conv_in[1] != 4:
        raise SingleFileError(f"a UNet with {conv_in[1]} input channels (an inpainting or other variant); "
                              "a teacher must be a text-to-image UNet with 4")
    text = ("conditioner.embedders.", "cond_stage_model.")
    return {"kind": kind, "family": KINDS[kind], "unet_only": not any(k.startswith(text) for k in keys),
            **markers(shapes)}


def _tokenizer_roles(kind: str) -> list[str]:
    return ["tokenizer", "tokenizer_2"] if kind == "sdxl" else ["tokenizer"]


def _bpe_files(folder: Path) -> tuple[str, ...] | None:
    """The tokenizer file set a folder holds (see TOKENIZER_FILESETS), or None."""
    return next((names for names in TOKENIZER_FILESETS if all((folder / n).is_file() for n in names)), None)


def _from_hf_cache(cache_dir: str | Path | None = None) -> Path | None:
    """A folder of the local hugging-face cache (default: the hub's own) holding the CLIP BPE files;
    never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return None
    for repo, sub in CLIP_TOKENIZER_SOURCES:
        for names in TOKENIZER_FILESETS:
            found = [try_to_load_from_cache(repo, f"{sub}/{name}" if sub else name, cache_dir=cache_dir)
                     for name in names]
            if all(isinstance(p, str) and Path(p).is_file() for p in found):
                return Path(found[0]).parent
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def default_root() -> Path:
    from sitdistill.core.paths import cache_dir

    return cache_dir("single-file")


def config_folder(kind: str, config: str | Path | None = None, root: str | Path | None = None,
                  scheduler_overrides: dict[str, Any] | None = None, hf_cache: str | Path | None = None) -> Path:
    """A diffusers folder for ``from_single_file(config=...)`` of this model type, assembled offline.

    ``config``: a user's diffusers folder of the same type; its tokenizers are used when present.
    ``root``: where the folder is assembled (default ``<cache>/single-file``); it is kept, so BPE
    files placed in ``<root>/<kind>/tokenizer/`` are found next time.
    ``scheduler_overrides``: e.g. ``prediction_type`` and zero-terminal-SNR settings.
    ``hf_cache``: the hugging-face cache folder to look in (default: the hub's own).
    """
    if kind not in KINDS:
        raise SingleFileError(f"unknown model type {kind!r}; one of {sorted(KINDS)}")
    base = Path(root or default_root())
    shipped = CONFIGS / kind
    sched = json.loads((shipped / "scheduler" / "scheduler_config.json").read_text())
    sched.update(scheduler_overrides or {})
    # One folder per schedule (runs with other prediction types never share one); every file is
    # written through a temporary name and renamed, so a concurrent reader never sees half a file.
    tag = hashlib.sha256(json.dumps(scheduler_overrides or {}, sort_keys=True).encode()).hexdigest()[:8]
    folder = base / kind if not scheduler_overrides else base / f"{kind}-{tag}"
    for src in shipped.rglob("*.json"):
        dst = folder / src.relative_to(shipped)
        data = (json.dumps(sched, indent=1) + "\n").encode() if src.name == "scheduler_config.json" else src.read_bytes()
        if not dst.exists() or dst.read_bytes() != data:
            _write_atomic(dst, data)

    missing = []
    cached = _from_hf_cache(hf_cache)  # looked up once for every tokenizer role
    for role in _tokenizer_roles(kind):
        target = folder / role
        sources = [Path(config) / role] if config is not None else []
        sources += [target, base / kind / role]  # files a user placed in the plain folder serve every schedule
        if cached is not None:
            sources.append(cached)
        source = next((s for s in sources if _bpe_files(s)), None)
        if source is None:
            missing.append(target)
            continue
        if source != target:
            for name in _bpe_files(source):
                _write_atomic(target / name, (source / name).read_bytes())
    if missing:
        places = " and ".join(str(p) for p in missing)
        raise SingleFileError(
            f"no CLIP tokenizer found offline for this {kind} checkpoint: place vocab.json and merges.txt (CLIP's BPE "
            f"files, e.g. from openai/clip-vit-large-patch14; or its tokenizer.json) in {places}, or set teacher.config "
            "to a diffusers folder of this model type that has them (nothing is downloaded)")
    return folder


def scheduler_overrides(detected: dict[str, Any], prediction_type: str | None,
                        zero_terminal_snr: bool | None) -> dict[str, Any]:
    """The scheduler settings a file implies: the recipe's choice wins over the file's marker keys."""
    out: dict[str, Any] = {}
    pred = prediction_type or detected.get("prediction_type")
    if pred:
        out["prediction_type"] = pred
    zsnr = zero_terminal_snr if zero_terminal_snr is not None else detected.get("zero_terminal_snr")
    if zsnr:
        out.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    elif zsnr is False:  # said explicitly: off, whatever the source's scheduler config says
        out["rescale_betas_zero_snr"] = False
    return out
