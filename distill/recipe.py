"""Recipes: typed YAML for one distillation run.

A recipe is data only. It is read with omegaconf into the dataclasses below (a *structured config*),
so every key has a type and a default, and nothing in a YAML file can import or run code: YAML is
parsed with a safe loader, and interpolations may only reference other keys (`${training.seed}`),
never call a resolver (`${oc.env:...}` and friends are rejected).

    recipe = load_recipe("recipes/toy.yaml", ["training.max_steps=200", "student.preset=B/2"])

Inheritance: a file may say `extends: other.yaml` (relative to the file itself); chains are
allowed and a cycle is reported with the whole chain. Later files win; lists are replaced, not
concatenated (omegaconf's merge rule). Command-line overrides are applied last.

Errors are `RecipeError`s whose message is one line naming the key and the file: an unknown key
comes with the closest valid keys, a wrong type with the expected type, a value outside its
choices with the choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# ---------------------------------------------------------------------------------------------
# The schema. `choices` in a field's metadata is checked after merging; the CLI's help and the
# error messages read it from here, so every option is spelled once.
# ---------------------------------------------------------------------------------------------


def _choice(default: Any, choices: tuple, help: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


def _list(*items: Any) -> Any:
    return field(default_factory=lambda: list(items))


@dataclass
class TeacherConfig:
    # A diffusers folder, a hub id, a single-file .ckpt/.safetensors, or `toy:sd15` / `toy:sdxl`
    # (the project's own toy teachers, built and cached on first use).
    source: str = "toy:sd15"
    family: Optional[str] = _choice(None, (None, "sd15", "sdxl"), "auto-detected from the UNet when null")
    # A diffusers folder or hub id giving the configs of a single-file checkpoint; null: the model type
    # is read from the file's keys and the package's own configs are used, offline.
    config: Optional[str] = None
    vae: Optional[str] = None  # VAE override, e.g. madebyollin/sdxl-vae-fp16-fix
    vae_variant: Optional[str] = None  # the override's own variant / revision (never the teacher's)
    vae_revision: Optional[str] = None
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. fp16 weights of a hub repo
    dtype: str = _choice("float32", ("float32", "float16", "bfloat16"))
    vae_fp32: bool = True  # the SDXL VAE overflows in fp16 unless it is the fp16-fix one
    # Text-encoder layers to skip (diffusers' / kohya's clip skip; null = none): e.g. 2 for teachers
    # trained that way (NovelAI-derived SD1.5 models). Used for training targets and sampling alike.
    clip_skip: Optional[int] = None
    # Where the files cannot tell (a single file; an SD2 768-v file looks like an SD2 base one):
    # epsilon | v_prediction, and zero terminal SNR (rescaled betas, trailing spacing). null: as the source says.
    prediction_type: Optional[str] = _choice(None, (None, "epsilon", "v_prediction"))
    zero_terminal_snr: Optional[bool] = None


@dataclass
class StudentConfig:
    preset: str = "S/2"  # a key of students.PRESETS (`python cli.py presets` lists them)
    init: Optional[str] = None  # an official SiT/DiT .pt checkpoint, or a student folder
    # Which official checkpoint `init` is: sit (t in [0, 1] on a linear interpolant, velocity output:
    # mapped to the teacher's steps by equal SNR) or dit (DDPM steps, eps: used as is). null: from the
    # file name (SiT-... / DiT-...).
    init_kind: Optional[str] = _choice(None, (None, "sit", "dit"))
    prediction_type: str = _choice("epsilon", ("epsilon", "v_prediction"))
    qk_norm: bool = False
    # Mean of the projected text tokens added to the timestep embedding (a global text signal for
    # the adaLN modulation, like SDXL's pooled embeds; the student computes it, any teacher).
    text_pool: bool = False
    # The guidance scale w as an input (zero-initialised embedding), for losses.guided_teacher: the
    # student learns the teacher's guided prediction at each w and samples with guidance 1 and its
    # w set to the sampling guidance scale (LCM-style). Without it a guided target is learnt at the mean w.
    guidance_embed: bool = False
    gradient_checkpointing: bool = False
    # Optional overrides of the preset's shape (null keeps the preset's value).
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None


@dataclass
class ToyDataConfig:
    """The built-in toy world, used when `data.root` is null."""

    num_images: int = 512
    seed: int = 0
    # Colour x shape combinations left out of the data set entirely, e.g. ["red circle"].
    exclude_combos: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    root: Optional[str] = None  # folder of images + same-stem .txt captions; null = the toy world
    toy: ToyDataConfig = field(default_factory=ToyDataConfig)
    recursive: bool = True
    caption_extension: str = ".txt"
    missing_caption: str = _choice("skip", ("skip", "empty"))
    caption_prefix: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0  # leading tags kept in place when shuffling (kohya's name)
    tag_separator: str = ","
    caption_dropout: float = 0.0  # probability of an empty caption (classifier-free guidance)
    min_size: int = 64  # images whose shorter side is below this are skipped
    # Images with more pixels than this are skipped from their header, before decoding (null: no limit).
    max_pixels: Optional[int] = 64_000_000
    resolution: int = 512  # target area is resolution**2
    bucket: bool = True  # aspect-ratio buckets (the seed's --use_aspect_ratio_bucket)
    bucket_min_side: int = 256
    bucket_max_side: int = 1024
    bucket_step: int = 64  # a multiple of VAE factor x student patch size
    bucket_no_upscale: bool = False
    crop: str = _choice("center", ("center", "random"))
    small_bucket: str = _choice("repeat", ("repeat", "drop", "partial"))  # leftover items of a bucket
    num_workers: int = 0
    cache_latents: bool = True  # cache latents/text embeddings while the VAE/encoders are frozen
    cache_dir: Optional[str] = None  # default: <output.dir>/../.cache or $SITDISTILL_CACHE


@dataclass
class InputNoiseConfig:
    """(a) DDPM-IP: x~_t = x_t + gamma * sqrt(1 - abar_t) * xi (the noise perturbed by gamma): the
    teacher labels states just off the data manifold."""

    enabled: bool = False
    weight: float = 1.0
    gamma: float = 0.1


@dataclass
class CaptionMixConfig:
    """(b) captions recombined within a batch: new prompts for the same images."""

    enabled: bool = False
    weight: float = 1.0


@dataclass
class PromptFileConfig:
    """(b) prompts drawn from a file (one per line) instead of the image's caption."""

    enabled: bool = False
    weight: float = 1.0
    path: Optional[str] = None


@dataclass
class EmbeddingNoiseConfig:
    """(b) Gaussian noise on the text embeddings, relative to their RMS."""

    enabled: bool = False
    weight: float = 1.0
    sigma: float = 0.1


@dataclass
class TrajectoryConfig:
    """(c) off-data states from the teacher's own sampling trajectory (needs no image). One DDIM run
    of `num_steps` steps for a batch of prompts yields `num_steps` batches of states."""

    enabled: bool = False
    weight: float = 1.0
    num_steps: int = 20
    guidance_scale: float = 5.0
    # Where the prompts come from: the data set's captions (text only), the prompt file of
    # `prompt_file.path`, or fresh toy-world prompts.
    prompts: str = _choice("captions", ("captions", "prompt_file", "toy"))


@dataclass
class TimestepJitterConfig:
    """(d) the teacher and student are queried at t + delta, |delta| <= max_delta."""

    enabled: bool = False
    weight: float = 1.0
    max_delta: int = 50


@dataclass
class PerturbConfig:
    """The SDiT perturbation family: the teacher is the only target. Each sample of a batch is
    assigned to one enabled batch part (a, b, d), so one extra forward serves them all; `weight`
    scales a part's loss inside `losses.perturb`. The trajectory part has a batch of its own."""

    input_noise: InputNoiseConfig = field(default_factory=InputNoiseConfig)
    caption_mix: CaptionMixConfig = field(default_factory=CaptionMixConfig)
    prompt_file: PromptFileConfig = field(default_factory=PromptFileConfig)
    embedding_noise: EmbeddingNoiseConfig = field(default_factory=EmbeddingNoiseConfig)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    timestep_jitter: TimestepJitterConfig = field(default_factory=TimestepJitterConfig)


@dataclass
class FeatureConfig:
    """Student block outputs aligned to teacher UNet module outputs through a learnt projector."""

    student_blocks: list[int] = field(default_factory=list)
    teacher_modules: list[str] = field(default_factory=list)  # module paths, e.g. "mid_block"
    kind: str = _choice("cosine", ("cosine", "mse"))
    projector_hidden: int = 1024


@dataclass
class LossesConfig:
    """L = eps*L_eps + teacher*L_teacher + perturb*L_perturb + feature*L_feat."""

    eps: float = 1.0
    teacher: float = 1.0
    perturb: float = 0.0
    feature: float = 0.0
    min_snr_gamma: Optional[float] = None  # min-SNR-gamma weighting of the data noise loss
    # Weighting of the terms whose target is the teacher (teacher, perturbation, trajectory):
    # a key of distill.schedule.LOSS_WEIGHTINGS ("min_snr" uses min_snr_gamma).
    teacher_weighting: str = "none"
    timestep_sampling: str = "uniform"  # a key of distill.schedule.TIMESTEP_SAMPLERS
    guided_teacher: bool = False  # target the teacher's CFG prediction (scale drawn per sample)
    guidance_range: list[float] = _list(1.0, 7.5)
    perturbations: PerturbConfig = field(default_factory=PerturbConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)


@dataclass
class OptimizerConfig:
    name: str = _choice("adamw", ("adamw", "adamw8bit"))  # adamw8bit: the `lowbit` extra (torchao or bitsandbytes)
    lr: float = 1e-4
    betas: list[float] = _list(0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    fused: Optional[bool] = None  # null: fused AdamW where the device supports it
    lr_scheduler: str = _choice("constant", ("constant", "cosine", "linear"))
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # floor of the cosine/linear decay, as a fraction of lr
    # Learning rates of the end-to-end stage's groups (null: same as lr).
    vae_lr: Optional[float] = None
    text_encoder_lr: Optional[float] = None


@dataclass
class TrainingConfig:
    seed: int = 0
    max_steps: Optional[int] = 1000  # optimizer steps; null = run num_epochs
    num_epochs: Optional[int] = None
    batch_size: int = 8  # per process
    gradient_accumulation_steps: int = 1
    mixed_precision: str = _choice("no", ("no", "fp16", "bf16"))
    max_grad_norm: float = 1.0
    use_ema: bool = True
    ema_decay: float = 0.9999
    ema_on_cpu: bool = False
    # Shard the student (and its EMA) over the processes with FSDP2, one unit per SiT block, for
    # students that do not fit one GPU (3b). Launch with `accelerate launch --multi_gpu`; see the README.
    fsdp: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    # A new stage from an earlier one (e.g. the end-to-end stage after stage 1): a checkpoint folder,
    # or a run folder (its latest checkpoint). Weights only: student, EMA, projectors and any
    # student-side VAE/text encoders it holds; optimizer, LR schedule, step and data start fresh.
    # Ignored once this run has a checkpoint of its own to resume from.
    init_from: Optional[str] = None
    log_every: int = 10
    sample_every: int = 0  # student | teacher grids every N steps (0 = off)
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    # End-to-end stage (the seed's --train_vae / --train_text_encoder).
    train_vae: bool = False  # a trainable student-side copy of the VAE (settings in `e2e`)
    train_text_encoder: bool = False  # trainable student-side copies of the CLIP text encoder(s)


@dataclass
class E2EConfig:
    """The end-to-end stage (REPA-E style, Leng et al. 2025), on with training.train_vae /
    train_text_encoder. The teacher keeps its frozen VAE and encoders (its targets never drift);
    the student side gets trainable copies. The diffusion losses reach the VAE only through
    `diffusion_grad_to_vae` (REPA-E: that collapses the latent space); the VAE is trained by the
    `vae_*` terms below. The text encoders learn from the student's losses."""

    vae_mode: str = _choice("full", ("full", "lora"), "fine-tune every VAE weight, or a peft LoRA adapter")
    text_encoder_mode: str = _choice("full", ("full", "lora"), "the same choice for the text encoder(s)")
    lora_rank: int = 16
    lora_alpha: float = 16.0  # LoRA scale is alpha / rank
    vae_recon: float = 1.0  # weight of the pixel reconstruction through the student VAE
    vae_recon_kind: str = _choice("l1", ("l1", "l2", "l1+l2"))
    # KL of the student posterior to N(0, I), mean per latent element. (LDM's 1e-6 is on per-sample
    # sums against a summed pixel loss, about 2e-8 in these per-element units: this is stronger.)
    vae_kl: float = 1.0e-6
    # MSE(student latent mean, frozen teacher latent mean): keeps the student's latents where the
    # teacher's noise targets were learnt, so the teacher can still label them.
    vae_align: float = 1.0
    text_encoder_align: float = 0.0  # optional MSE(student, frozen encodings); drift is logged either way
    diffusion_grad_to_vae: bool = False  # ablation only: let eps/teacher/perturb losses train the VAE
    # REPA-E's end-to-end path: the representation-alignment term (losses.feature: student blocks vs
    # teacher UNet features) also trains the VAE through x_t, while the other diffusion terms stay
    # behind the stop-gradient. Costs one extra backward through the student.
    feature_grad_to_vae: bool = False


@dataclass
class SamplingConfig:
    scheduler: str = "euler"  # a key of distill.sampling.SCHEDULERS
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    # Lin et al. 2023's rescale of the guided prediction (0 = off); e.g. 0.7 for zero-terminal-SNR teachers.
    guidance_rescale: float = 0.0
    # null: the pipeline's unconditional input (SDXL: zeros under force_zeros_for_empty_prompt);
    # a string, "" included, is encoded as diffusers encodes it.
    negative_prompt: Optional[str] = None
    height: Optional[int] = None  # null: the data resolution
    width: Optional[int] = None
    seed: int = 0
    prompts: list[str] = field(default_factory=list)  # fixed validation prompts for sample grids


@dataclass
class EvaluationConfig:
    prompts_file: Optional[str] = None  # null: sampling.prompts, or held-out toy prompts
    num_prompts: int = 16
    seeds: list[int] = _list(0)
    baseline: Optional[str] = None  # a checkpoint trained without teacher, shown beside
    timestep_bins: int = 10
    # Toy-world runs: grade this many held-out prompts for the teacher and the student (EMA) at the
    # end of training, same sampler, guidance and seeds (the `sampling` section); 0 = off.
    at_end: int = 0
    fid_weights: Optional[str] = None  # local weights only: nothing is downloaded
    clip_weights: Optional[str] = None


@dataclass
class OutputConfig:
    dir: str = "runs/toy"
    tensorboard: bool = True


@dataclass
class Recipe:
    name: str = "untitled"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    e2e: E2EConfig = field(default_factory=E2EConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Recipe))
EXTENDS_KEY = "extends"


class RecipeError(ValueError):
    """A recipe problem, with a one-line message naming the key and the file."""


# ---------------------------------------------------------------------------------------------
# Schema introspection
# ---------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if get_origin(inner) is list:
        (item,) = get_args(inner) or (Any,)
        name = f"list of {getattr(item, '__name__', str(item))}"
    elif dataclasses.is_dataclass(inner):
        name = "a section (mapping)"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def all_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        inner, _ = _unwrap_optional(_hints(cls)[f.name])
        if dataclasses.is_dataclass(inner):
            keys.extend(all_keys(inner, key + "."))
    return keys


def _field_at(key: str) -> tuple[dataclasses.Field, Any]:
    cls: Any = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        f = fields[part]
        tp = _hints(cls)[part]
        if i == len(parts) - 1:
            return f, tp
        cls, _ = _unwrap_optional(tp)
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------
# Validation of raw YAML mappings against the schema (before omegaconf sees them), so that the
# messages can name the file and suggest keys.
# ---------------------------------------------------------------------------------------------


def _suggest(key: str) -> str:
    """Closest valid keys by their last component: `training.lr` points at `optimizer.lr`,
    `training.batchsize` at `training.batch_size`. Keys of the same section come first."""
    by_leaf: dict[str, list[str]] = {}
    for k in all_keys():
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    leaf = key.rsplit(".", 1)[-1]
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    found = [k for m in difflib.get_close_matches(leaf, list(by_leaf), n=4, cutoff=0.6) for k in by_leaf[m]]
    found.sort(key=lambda k: not k.startswith(section))  # stable: keeps match order within groups
    return f"; did you mean {', '.join(found[:3])}?" if found else ""


def _check_mapping(raw: Any, cls: type, prefix: str, where: str) -> None:
    if not isinstance(raw, dict):
        name = f"'{prefix.rstrip('.')}'" if prefix else "the recipe"
        raise RecipeError(f"{name} must be a section (mapping), got {type(raw).__name__} in {where}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str) or key not in names:
            raise RecipeError(f"unknown key '{full}' in {where}{_suggest(str(full))}")
        inner, optional = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(inner):
            if value is None and not optional:
                raise RecipeError(f"'{full}' must be a section (mapping), got null in {where}")
            if value is not None:
                _check_mapping(value, inner, full + ".", where)
        elif isinstance(value, dict):
            raise RecipeError(f"'{full}' expects {_type_name(hints[key])}, got a mapping in {where}")


_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


def _check_no_resolvers(raw: Any, where: str, path: str = "") -> None:
    """Interpolations may reference keys; resolvers (`${name:args}`) could read the environment
    or build objects, so a recipe may not use them."""
    if isinstance(raw, dict):
        for k, v in raw.items():
            _check_no_resolvers(v, where, f"{path}{k}.")
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            _check_no_resolvers(v, where, f"{path}{i}.")
    elif isinstance(raw, str):
        for ref in _INTERPOLATION.findall(raw):
            if ":" in ref:
                raise RecipeError(
                    f"'{path.rstrip('.')}' uses the resolver '${{{ref}}}' in {where}: recipes hold values "
                    "only; interpolations may reference other keys, e.g. ${training.seed}"
                )


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from None
    try:
        # SafeLoader: tags like !!python/object are refused, so YAML cannot build objects.
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"invalid YAML in {path}{at}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping of sections, got {type(raw).__name__} in {path}")
    return raw


def _load_chain(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """[(file, raw mapping)] from the root of the `extends` chain to `path`."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise RecipeError(f"cycle in 'extends': {cycle}")
    raw = _read_yaml(path)
    parent = raw.pop(EXTENDS_KEY, None)
    _check_mapping(raw, Recipe, "", str(path))
    _check_no_resolvers(raw, str(path))
    if parent is None:
        return [(path, raw)]
    if not isinstance(parent, str):
        raise RecipeError(f"'extends' must be a file path (str) in {path}")
    return _load_chain(path.parent / parent, chain + (path,)) + [(path, raw)]


def _parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not key=value")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key:
            raise RecipeError(f"override '{item}' has no key")
        try:
            value = load_yaml(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text  # a bare string such as `a: b` stays a string
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override '{item}' sets inside '{part}', which is a value")
        node[parts[-1]] = value
    return tree


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _merge(base: DictConfig, raw: dict, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, OmegaConf.create(raw))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        try:
            f, tp = _field_at(re.sub(r"\[\d+\]", "", key))
            expected = _type_name(tp)
        except (KeyError, TypeError):
            expected = "the schema's type"
        value = getattr(e, "msg", str(e)).splitlines()[0]
        raise RecipeError(f"'{key}' expects {expected} in {where} ({value})") from None


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true/false. YAML 1.1 (PyYAML's default) also reads a bare yes/no/
    on/off as a boolean, which turns `mixed_precision: no` (accelerate's spelling) into false; the
    schema's bool fields still accept yes/no/on/off as strings (omegaconf converts them)."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def load_yaml(text: str) -> Any:
    """A recipe's YAML (a file, an override's value, a checkpoint's recipe.yaml) with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_RecipeLoader)


def _check_choices(cfg: DictConfig, cls: type = Recipe, prefix: str = "") -> None:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = cfg[f.name]
        inner, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            if value is not None:
                _check_choices(value, inner, key + ".")
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            shown = "|".join("null" if c is None else str(c) for c in choices)
            raise RecipeError(f"'{key}' must be one of {shown}, got {value!r}")


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Read a recipe (following `extends`), apply `key=value` overrides, validate, resolve.

    Returns a read-only structured DictConfig whose attribute access is typed
    (`recipe.training.batch_size` is an int). Raises RecipeError with a one-line message.
    """
    cfg = OmegaConf.structured(Recipe)
    if path is not None:
        for file, raw in _load_chain(Path(path)):
            cfg = _merge(cfg, raw, str(file))
    if overrides:
        tree = _parse_overrides(overrides)
        _check_mapping(tree, Recipe, "", "the command-line overrides")
        _check_no_resolvers(tree, "the command-line overrides")
        cfg = _merge(cfg, tree, "the command-line overrides")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise RecipeError(f"cannot resolve '{key}': {str(e).splitlines()[0]}") from None
    _check_choices(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(recipe: DictConfig) -> str:
    """The resolved recipe as YAML (what `show-recipe` prints and `recipe.yaml` holds)."""
    return OmegaConf.to_yaml(recipe, resolve=True)


def save_recipe(recipe: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved recipe atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(to_yaml(recipe), encoding="utf-8")
    os.replace(tmp, path)
    return path


def as_dict(recipe: DictConfig | ListConfig, key: str | None = None) -> Any:
    """A plain-Python copy of the recipe (or of one section) to pass as keyword arguments."""
    node = OmegaConf.select(recipe, key) if key else recipe
    return OmegaConf.to_container(node, resolve=True)
