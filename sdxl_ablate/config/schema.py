"""The configuration schema: typed dataclasses, registered with Hydra's ConfigStore.

Values live in conf/*.yaml; types and defaults live here, once. Hydra checks enum and
type fields while it composes (so `lora.targets=atn` fails before anything loads,
naming the allowed values); the cross-field checks in `Config.__post_init__` run when
the composed config becomes a typed object and report every problem at once.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf



__all__ = [
    "ConfigError",
    "ModelKind",
    "DataSource",
    "Crop",
    "Targets",
    "Precision",
    "Optimizer",
    "Schedule",
    "BaseWeights",
    "ModelConfig",
    "DataConfig",
    "LoraConfig",
    "TrainerConfig",
    "MemoryConfig",
    "EvalConfig",
    "TrackingConfig",
    "Config",
    "cross_field_problems",
    "memory_problems",
    "cache_root",
    "register_configs",
    "to_typed",
    "flatten",
    "unused_keys",
    "used_params",
    "to_yaml",
    "REPO_ROOT",
    "CONF_DIR",
]

class ConfigError(ValueError):
    """A configuration that composes but cannot be run; lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


class ModelKind(str, enum.Enum):
    pretrained = "pretrained"  # hub id or local diffusers directory
    tiny = "tiny"  # SDXL architecture, ~5M params (mostly token embeddings), built in code
    sdxl_random = "sdxl_random"  # full-size SDXL architecture, random weights


class DataSource(str, enum.Enum):
    hub = "hub"
    folder = "folder"
    sample = "sample"


class Crop(str, enum.Enum):
    center = "center"
    random = "random"


class Targets(str, enum.Enum):
    attn = "attn"
    all = "all"


class Precision(str, enum.Enum):
    # auto: bf16 where the GPU runs it natively (compute capability 8.0+), else fp16 with loss
    # scaling; fp32 on the CPU. Resolved per run before anything trains (model/precision.py),
    # and the run records the value that ran.
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Optimizer(str, enum.Enum):
    adamw = "adamw"
    adamw8bit = "adamw8bit"
    prodigy = "prodigy"


class Schedule(str, enum.Enum):
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"


class BaseWeights(str, enum.Enum):
    """Storage of the frozen base weights of the UNet."""

    compute = "compute"  # the compute dtype of trainer.precision
    # float8 (e4m3) storage with a scale per output channel, dequantized layer by layer for the
    # compute-dtype matmul: half the memory of bf16 weights, no extra dependency (train/memory.py).
    fp8 = "fp8"


@dataclass
class ModelConfig:
    # The defaults here are the real task's (what `python -m sdxl_ablate` composes); conf/'s
    # group files say only where an option differs (tests/test_config.py keeps it so).
    kind: ModelKind = ModelKind.pretrained
    # Hub id or local directory in diffusers layout; used when kind=pretrained.
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"
    revision: Optional[str] = None
    # Optional VAE override (hub id or directory), e.g. madebyollin/sdxl-vae-fp16-fix.
    vae: Optional[str] = None
    # True only for a VAE that is safe in fp16; otherwise the VAE always runs in fp32.
    vae_fp16_safe: bool = False
    # Keep the frozen base loaded between the variants of a sweep process (basecache.py):
    # restored and verified bit for bit after each variant. false: load it for every variant.
    keep_loaded: bool = True


@dataclass
class DataConfig:
    source: DataSource = DataSource.hub
    name: str = "lambdalabs/naruto-blip-captions"  # hub dataset id (source=hub)
    path: Optional[str] = None  # image folder with metadata.jsonl (source=folder)
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    limit: Optional[int] = None  # keep the first N training images
    heldout: int = 4  # last N images: reference style images + held-out loss, never trained on
    instance_prompt: Optional[str] = None  # one prompt for every image instead of captions
    caption_dropout: float = 0.0  # probability of training on the empty prompt
    resolution: int = 1024
    crop: Crop = Crop.center
    flip: bool = False
    sample_size: int = 16  # images in the generated sample dataset (source=sample)


@dataclass
class LoraConfig:
    targets: Targets = Targets.attn
    text_encoder: bool = False  # LoRA on both text encoders' q/k/v/out projections too
    use_dora: bool = False
    dropout: float = 0.0
    rank: int = 16
    alpha: float = 16.0


@dataclass
class TrainerConfig:
    max_steps: int = 100  # optimizer steps; ignored when epochs is set
    epochs: Optional[int] = None
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scheduler: Schedule = Schedule.constant
    warmup_steps: int = 0
    optimizer: Optimizer = Optimizer.adamw
    weight_decay: float = 1e-2
    precision: Precision = Precision.auto
    base_weights: BaseWeights = BaseWeights.compute
    # true | false | auto: off where the dry run predicts the variant fits the memory budget
    # without it, on otherwise (and on where there is no prediction: CPU, the tiny model);
    # resolved per run (train/auto.py), which records the value that ran.
    gradient_checkpointing: Union[bool, str] = "auto"
    max_grad_norm: Optional[float] = 1.0
    noise_offset: float = 0.0
    snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting, e.g. 5.0
    seed: int = 0
    max_nonfinite_in_row: int = 5  # that many skipped non-finite steps in a row end the run
    log_every: int = 1
    # Encode images and (frozen) prompts once and share the cache across the sweep.
    cache_latents: bool = True
    cache_dir: Optional[str] = None  # default: ~/.cache/sdxl_ablate
    # Speed switches that leave the numbers as they are (README "Trainer defaults"), CUDA only:
    compile: bool = True  # torch.compile each transformer/resnet block (about 2 min, once per shape)
    channels_last: bool = True  # NHWC activations for cuDNN's fastest convolutions
    # Capture each step's forward + backward once as a CUDA graph and replay it (not with
    # text-encoder LoRA, nor with LoRA dropout under checkpointing: the trainer says so).
    cuda_graphs: bool = True
    # Wait for the GPU after every step, so that each step's time is its own wall time (the
    # benchmark's per-step times). Off, the loop waits once per step only to read the loss, and
    # times steps with CUDA events, so the host can queue the next step's work meanwhile.
    sync_every_step: bool = False
    save_lora: bool = True
    # Checkpoints and resume (README "Resuming and faults"). A checkpoint every N optimizer steps
    # (null or 0: only at the end), the last `keep_checkpoints` kept, under
    # <checkpoint_dir>/<study>/<config_hash>/ (default checkpoint_dir: <cwd>/checkpoints).
    checkpoint_every: Optional[int] = 50
    keep_checkpoints: int = 2
    checkpoint_dir: Optional[str] = None
    # auto: continue from the last good checkpoint of this config, if any | never: start afresh
    # (earlier checkpoints of this config are removed) | a checkpoint directory to continue from.
    resume: str = "auto"
    # Run even when a finished run (status ok) of the same config hash exists in the experiment.
    force: bool = False


MIB = 1024**2


@dataclass
class MemoryConfig:
    """The memory budget: a card profile (conf/memory/<card>.yaml) or a plain allocator budget.

    A card profile gives the card's reported total and what a process holds outside PyTorch's
    allocator there (CUDA context, library kernels and workspaces); the allocator may then take
    `card_total_mib - overhead_mib` (`budget()`), and the peak the card would see is the
    allocator's peak reserved plus the overhead. The defaults are the T4's (conf/memory/t4_16gb.yaml
    says where each number comes from)."""

    card: Optional[str] = "Tesla T4"  # the card this budget emulates (null: none)
    card_total_mib: Optional[int] = 15360  # the card's reported total memory
    overhead_mib: int = 1024  # held outside the allocator on that card (provisional: see the profile)
    bf16_native: Optional[bool] = False  # the card runs bf16 natively (compute capability 8.0+)
    total_source: str = "nvidia-smi total of a Tesla T4 as commonly reported (15360MiB); not measured here"
    overhead_source: str = ("provisional (public reports, not measured here): ~450 MiB the driver does not give "
                            "CUDA + ~400 MB context (pytorch/pytorch#107667, #109888), rounded up - measure with "
                            "python -m sdxl_ablate.perf.card_overhead")
    # A plain allocator budget instead of a card profile (memory=unlimited); null with a card.
    budget_gib: Optional[float] = None
    # Cap the CUDA process at the budget, so a variant that would not fit the card fails here
    # too, even on a larger GPU.
    enforce: bool = True
    expandable_segments: bool = True

    def budget(self) -> float:
        """GiB the allocator may reserve: the card's total less the overhead, or budget_gib."""
        if self.card_total_mib is not None:
            return (self.card_total_mib - self.overhead_mib) * MIB / 1024**3
        return float(self.budget_gib)  # type: ignore[arg-type]

    def overhead_gib(self) -> float:
        """What the card would hold beyond the allocator's reserved memory (0 without a card)."""
        return self.overhead_mib * MIB / 1024**3 if self.card_total_mib is not None else 0.0


@dataclass
class EvalConfig:
    enabled: bool = True
    prompts: list[str] = field(
        default_factory=lambda: [
            "Naruto Uzumaki eating ramen",
            "Bill Gates in Naruto style",
            "A boy with blue eyes in Naruto style",
            "cute dragon creature",
        ]
    )
    seeds: list[int] = field(default_factory=lambda: [0])
    resolution: Optional[int] = None  # default: data.resolution
    steps: int = 25
    guidance_scale: float = 5.0
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "laion2b_s32b_b82k"  # open_clip tag or a checkpoint file; "tiny" = random tiny CLIP
    fuse_lora: bool = False
    vae_tiling: bool = False
    attention_slicing: bool = False
    heldout_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    # Sample images during training every N optimizer steps (and the base model at step 0),
    # into MLflow's image history (sdxl_ablate/samples.py); 0 or null: off.
    every_n_steps: Optional[int] = None


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # default: sqlite:///<cwd>/mlflow.db
    experiment: Optional[str] = None  # default: the study name
    artifact_root: Optional[str] = None  # default: <cwd>/mlartifacts
    log_weights: bool = True


@dataclass
class Config:
    study: str = "default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        problems = cross_field_problems(self)
        if problems:
            raise ConfigError(problems)


def cross_field_problems(cfg: Config) -> list[str]:
    """Every check a single field's type cannot express; returns all problems found."""
    p: list[str] = []
    lo, tr, da, ev = cfg.lora, cfg.trainer, cfg.data, cfg.eval
    if lo.rank < 1:
        p.append(f"lora.rank={lo.rank}: must be an integer >= 1 (e.g. 4, 16, 32)")
    if lo.alpha <= 0:
        p.append(f"lora.alpha={lo.alpha}: must be > 0")
    if not 0.0 <= lo.dropout < 1.0:
        p.append(f"lora.dropout={lo.dropout}: must be in [0, 1)")
    if da.resolution < 8 or da.resolution % 8:
        p.append(f"data.resolution={da.resolution}: must be a positive multiple of 8 (e.g. 512, 1024)")
    if not 0.0 <= da.caption_dropout <= 1.0:
        p.append(f"data.caption_dropout={da.caption_dropout}: must be in [0, 1]")
    if da.limit is not None and da.limit < 1:
        p.append(f"data.limit={da.limit}: must be >= 1, or null for all images")
    if da.heldout < 0:
        p.append(f"data.heldout={da.heldout}: must be >= 0")
    if da.source == DataSource.folder and not da.path:
        p.append("data.source=folder needs data.path (a folder with images and metadata.jsonl)")
    if da.sample_size < 1:
        p.append(f"data.sample_size={da.sample_size}: must be >= 1")
    for name in ("max_steps", "batch_size", "grad_accum", "log_every", "max_nonfinite_in_row"):
        value = getattr(tr, name)
        if value < 1:
            p.append(f"trainer.{name}={value}: must be >= 1")
    if tr.epochs is not None and tr.epochs < 1:
        p.append(f"trainer.epochs={tr.epochs}: must be >= 1, or null to train for max_steps")
    if tr.lr <= 0:
        p.append(f"trainer.lr={tr.lr}: must be > 0 (Prodigy expects 1.0)")
    if tr.warmup_steps < 0:
        p.append(f"trainer.warmup_steps={tr.warmup_steps}: must be >= 0")
    if tr.max_grad_norm is not None and tr.max_grad_norm <= 0:
        p.append(f"trainer.max_grad_norm={tr.max_grad_norm}: must be > 0, or null for no clipping")
    if tr.snr_gamma is not None and tr.snr_gamma <= 0:
        p.append(f"trainer.snr_gamma={tr.snr_gamma}: must be > 0, or null for plain MSE")
    if tr.noise_offset < 0:
        p.append(f"trainer.noise_offset={tr.noise_offset}: must be >= 0")
    if tr.checkpoint_every is not None and tr.checkpoint_every < 0:
        p.append(f"trainer.checkpoint_every={tr.checkpoint_every}: must be >= 1, or 0/null for a checkpoint "
                 "only at the end")
    if tr.keep_checkpoints < 1:
        p.append(f"trainer.keep_checkpoints={tr.keep_checkpoints}: must be >= 1 (the last K checkpoints are kept)")
    if not tr.resume:
        p.append("trainer.resume is empty: use auto, never, or a checkpoint directory")
    elif tr.resume not in ("auto", "never") and tr.force:
        p.append(f"trainer.resume={tr.resume} with trainer.force=true: force starts afresh; "
                 "drop one of them")
    if tr.base_weights == BaseWeights.fp8 and lo.use_dora:
        p.append("trainer.base_weights=fp8 with lora.use_dora=true: DoRA needs the base weights "
                 "in a float dtype; use trainer.base_weights=compute")
    p += memory_problems(cfg.memory)
    gc = tr.gradient_checkpointing
    if not isinstance(gc, bool) and gc != "auto":
        p.append(f"trainer.gradient_checkpointing={gc!r}: must be true, false or auto")
    if ev.enabled and not ev.prompts:
        p.append("eval.prompts is empty: give at least one prompt or set eval.enabled=false")
    if ev.steps < 1:
        p.append(f"eval.steps={ev.steps}: must be >= 1")
    if ev.resolution is not None and (ev.resolution < 8 or ev.resolution % 8):
        p.append(f"eval.resolution={ev.resolution}: must be a positive multiple of 8")
    if ev.every_n_steps is not None and ev.every_n_steps < 0:
        p.append(f"eval.every_n_steps={ev.every_n_steps}: must be >= 1 (samples every N steps), or 0/null for off")
    if not cfg.study or "/" in cfg.study:
        p.append(f"study={cfg.study!r}: must be a non-empty name without '/'")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        p.append(f"device={dev!r}: must be auto, cpu, cuda or cuda:N")
    return p


def memory_problems(m: MemoryConfig) -> list[str]:
    """A card profile (card_total_mib, overhead_mib) or a plain budget (budget_gib), not both."""
    p: list[str] = []
    if m.card_total_mib is not None and m.budget_gib is not None:
        p.append(f"memory.budget_gib={m.budget_gib} with memory.card_total_mib={m.card_total_mib}: a card "
                 "profile's budget is its total less memory.overhead_mib; set memory.card_total_mib=null for "
                 "a plain budget (as memory=unlimited does), or drop memory.budget_gib")
    elif m.card_total_mib is None and m.budget_gib is None:
        p.append("memory: neither memory.card_total_mib (a card profile, e.g. memory=t4_16gb) nor "
                 "memory.budget_gib (a plain budget) is set")
    if m.card_total_mib is not None:
        if m.card_total_mib <= 0:
            p.append(f"memory.card_total_mib={m.card_total_mib}: must be > 0 (MiB, e.g. 15360 for a T4)")
        if m.overhead_mib < 0:
            p.append(f"memory.overhead_mib={m.overhead_mib}: must be >= 0 (MiB held outside the allocator)")
        elif m.card_total_mib > 0 and m.overhead_mib >= m.card_total_mib:
            p.append(f"memory.overhead_mib={m.overhead_mib}: must be below memory.card_total_mib="
                     f"{m.card_total_mib}, or nothing is left for the allocator")
    if m.budget_gib is not None and m.budget_gib <= 0:
        p.append(f"memory.budget_gib={m.budget_gib}: must be > 0")
    return p


# The checkout's Hydra config tree (conf/) and committed sweeps (sweeps/): the package is
# installed editable from the checkout, and every composer of configs reads these.
REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


def cache_root() -> Path:
    """Where the derived files live (tokenizer, sample dataset, latent cache):
    $SDXL_ABLATE_CACHE, else ~/.cache/sdxl_ablate."""
    return Path(os.environ.get("SDXL_ABLATE_CACHE") or Path.home() / ".cache" / "sdxl_ablate")


def register_configs() -> None:
    """Registers the schema so conf/config.yaml can extend it (`defaults: [schema, ...]`)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)


def to_typed(cfg: DictConfig | dict[str, Any]) -> Config:
    """Composed (or plain) config -> typed `Config`; runs the cross-field checks."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    # Hydra's own `hydra` node is not part of the schema.
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def flatten(cfg: Config) -> dict[str, Any]:
    """`{"lora.rank": 16, ...}`: the resolved config as flat params for MLflow."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True))
    return out


def unused_keys(cfg: Config) -> set[str]:
    """Flat keys whose values did not take part in this run: the hub id when the tiny model
    ran, the dataset name when the sample data ran, every eval setting with eval off."""
    keys: set[str] = set()
    if cfg.model.kind != ModelKind.pretrained:
        keys |= {"model.pretrained", "model.revision", "model.vae"}
    source = cfg.data.source
    if source != DataSource.hub:
        keys.add("data.name")
    if source != DataSource.folder:
        keys.add("data.path")
    if source == DataSource.sample:
        keys.add("data.split")
    else:
        keys.add("data.sample_size")
    if cfg.trainer.epochs is not None:
        keys.add("trainer.max_steps")
    if not cfg.eval.enabled:
        keys |= {k for k in flatten(cfg) if k.startswith("eval.") and k != "eval.enabled"}
    return keys


def used_params(cfg: Config) -> dict[str, Any]:
    """The flat params to record: what ran, without the fields of unused sources."""
    unused = unused_keys(cfg)
    return {k: v for k, v in flatten(cfg).items() if k not in unused}


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
