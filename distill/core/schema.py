"""The recipe schema: one dataclass per section, every key with its type, default and (in a
field's metadata) its choices. `sitdistill.core.recipe` reads YAML into it; the CLI's help and the error
messages read the choices from here, so every option is spelled once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


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
    # Which states: "path", the states the sampler passes through (on its `num_steps` grid);
    # "renoised", the runs' end points (the teacher's samples) noised afresh, as data images are
    # (timesteps by `losses.timestep_sampling`): as many states per sampling run either way.
    states: str = _choice("path", ("path", "renoised"))
    # The fraction of states served with the prompt a random permutation of their batch gives them
    # (another row's, unless it maps a row to itself; the teacher's eps for that prompt is the
    # target), as caption_mix does with data
    # states: how the prediction answers a prompt the state does not show.
    swap_prompts: float = 0.0
    # Align the student's features to the teacher's on these states too (the `losses.features`
    # blocks and modules, weighted by `losses.feature`, which must be > 0). With `losses.eps` and
    # `losses.teacher` at 0 and no batch part on, the run is data-free and aligned on these states only.
    align: bool = False


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


# The parts of PerturbConfig that act on a data batch (every one but the trajectory part, which has
# a batch of its own), in the fixed order the per-sample assignment follows: `sitdistill.train.perturb`
# keys its parts by these names.
BATCH_PARTS = ("input_noise", "caption_mix", "prompt_file", "embedding_noise", "timestep_jitter")


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
    # a key of sitdistill.core.schedule.LOSS_WEIGHTINGS ("min_snr" uses min_snr_gamma).
    teacher_weighting: str = "none"
    timestep_sampling: str = "uniform"  # a key of sitdistill.core.schedule.TIMESTEP_SAMPLERS
    guided_teacher: bool = False  # target the teacher's CFG prediction (scale drawn per sample)
    guidance_range: list[float] = _list(1.0, 7.5)
    # CFG pairs: half of each batch repeats the other half's x_t with the unconditional input, and
    # this weight puts a term on the guidance direction (student's cond - uncond against the
    # teacher's). 0 = off.
    guidance_pairs: float = 0.0
    perturbations: PerturbConfig = field(default_factory=PerturbConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)


@dataclass
class OptimizerConfig:
    # adamw8bit: the `lowbit` extra (torchao or bitsandbytes). muon: Muon for the student blocks'
    # 2-D weights, AdamW for the rest (sitdistill.core.muon), at `lr` x `muon_lr_scale`.
    name: str = _choice("adamw", ("adamw", "adamw8bit", "muon"))
    lr: float = 1e-4
    betas: list[float] = _list(0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    fused: Optional[bool] = None  # null: fused AdamW where the device supports it
    lr_scheduler: str = _choice("constant", ("constant", "cosine", "linear"))
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # floor of the cosine/linear decay, as a fraction of lr
    muon_lr_scale: float = 1.0  # Muon's learning rate over `lr` (its update RMS is AdamW's at 1.0)
    muon_momentum: float = 0.95
    # Names (or parts of names) of block matrices that stay on AdamW under Muon, e.g. adaLN_modulation.
    muon_exclude: list[str] = _list()
    # Muon's Newton-Schulz precision. auto: bfloat16 on CUDA and on a CPU with bfloat16 matmul
    # units (AVX512-BF16, AMX), float32 elsewhere.
    muon_ns_dtype: str = _choice("auto", ("auto", "float32", "bfloat16"))
    # Muon's Newton-Schulz form. auto: in float32, a wide or tall matrix's iterations run on its
    # Gram matrix (the same result to rounding, 1.5x-2.1x faster for the toy student's widest; core.muon.gram_pays);
    # plain: every matrix as torch.optim.Muon iterates it.
    muon_ns_form: str = _choice("auto", ("auto", "plain"))
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
    mixed_precision: str = _choice("no", ("no", "fp16", "bf16", "auto"))  # auto: bf16 where the hardware multiplies it (core.precision)
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
    scheduler: str = "euler"  # a key of sitdistill.infer.sampling.SCHEDULERS
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
