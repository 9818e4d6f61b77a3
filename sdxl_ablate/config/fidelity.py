"""How faithful each recipe preset and the study are to the write-up they come from.

Per write-up (the seeds: 000-003 are recipes, conf/experiment/*.yaml; 004 is the ablation study,
sweeps/naruto_study.yaml with conf/variant/*), a list of settings: the config key, what the
write-up says, its value in the key's terms when it states one, and why the project differs or
where an unstated value comes from. The project's value is read from the composed Hydra config,
never written here, so the README table (between the markers below) cannot drift from conf/:

    python -m sdxl_ablate.config.fidelity --write    # regenerate the README block (make fidelity)
    python -m sdxl_ablate.config.fidelity --check    # exit 1 when README differs (tests/test_fidelity.py)

A setting whose write-up states a value the config does not have, and that gives no reason, is
an error (`FidelityError`): a preset that drifts from its write-up fails the check.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from sdxl_ablate.config.schema import CONF_DIR, REPO_ROOT, Config, flatten, register_configs, to_typed

README = REPO_ROOT / "README.md"
BEGIN, END = "<!-- fidelity:begin (python -m sdxl_ablate.config.fidelity --write) -->", "<!-- fidelity:end -->"


class _NotStated:
    def __repr__(self) -> str:
        return "NOT_STATED"


NOT_STATED: Any = _NotStated()  # the write-up gives no value for this setting


class FidelityError(ValueError):
    """A preset's value differs from what its write-up states, with no reason given."""


@dataclass(frozen=True)
class Row:
    key: str  # flat config key, e.g. "trainer.precision"
    says: str  # what the write-up says (quoted where it can be)
    value: Any = NOT_STATED  # the write-up's value in this key's terms, or NOT_STATED
    why: str = ""  # why the project differs, or where an unstated value is taken from
    variant: Optional[str] = None  # study rows: the variant whose composed config is read


@dataclass(frozen=True)
class Seed:
    file: str  # /work/shared/seeds/<file>.txt's stem prefix, e.g. "000"
    title: str
    overrides: tuple[str, ...]  # what composes the preset or the study
    rows: tuple[Row, ...]


ATTN = "`to_q`, `to_k`, `to_v`, `to_out.0`"
ATTN_CODE = '["to_k", "to_q", "to_v", "to_out.0"]'
NOT_IN_TRAINING_VAE = ("the project has no VAE slicing/tiling in training: the latent cache encodes each image "
                       "once, in batches sized to fit 16 GiB, before the UNet trains")

SEEDS: tuple[Seed, ...] = (
    Seed("000", "SDXL fine-tuning for Naruto art style (Colab T4)", ("experiment=naruto_r32_512_fp16",), (
        Row("lora.targets", f"attention layers {ATTN}", "attn"),
        Row("lora.rank", "`lora_rank = 32`", 32),
        Row("lora.alpha", "`lora_alpha = 16`", 16.0),
        Row("lora.dropout", "`lora_dropout = 0.1`", 0.1),
        Row("data.resolution", "`resolution = 512`", 512),
        Row("data.heldout", "trains on the whole dataset", 0,
            "same; the evaluation's reference images are then training images (tag `eval.reference=train`)"),
        Row("trainer.epochs", "`num_epochs = 5` (1,530 optimizer steps at effective batch 4)", 5),
        Row("trainer.batch_size", "`train_batch_size = 1`", 1),
        Row("trainer.grad_accum", "`gradient_accumulation_steps = 4`", 4),
        Row("trainer.lr", "`learning_rate = 1e-5`", 1e-5),
        Row("trainer.precision", "`mixed_precision = \"fp16\"`", "fp16"),
        Row("trainer.base_weights", "\"UNet: FP32 loaded, mixed precision handled by Accelerator\"", "fp32"),
        Row("model.vae_fp16_safe", "\"VAE: FP32 (encoding requires precision)\"", False),
        Row("trainer.gradient_checkpointing", "`unet.enable_gradient_checkpointing()`", True),
        Row("trainer.optimizer", "`bitsandbytes.optim.AdamW8bit`", "adamw8bit"),
        Row("trainer.max_grad_norm", "\"Gradient clipping (max_norm=1.0)\"", 1.0),
        Row("trainer.checkpoint_every", "`checkpoint-500/`, `checkpoint-1000/`, ...", 500,
            "same; its epoch checkpoints (`epoch-2/`, `epoch-4/`) are not made"),
        Row("eval.steps", "`num_inference_steps=30`", 30),
        Row("eval.prompts", "its three test prompts",
            ["Naruto Uzumaki eating ramen", "Bill Gates in Naruto style", "A boy with blue eyes in Naruto style"]),
        Row("eval.vae_tiling", "`vae.enable_slicing()` and `vae.enable_tiling()`", True,
            "same at evaluation; " + NOT_IN_TRAINING_VAE),
        Row("data.crop", "not stated", NOT_STATED, "the project default (center, as diffusers' scripts)"),
    )),
    Seed("001", "SDXL LoRA with diffusers' script, 1024 px, text encoders", ("experiment=naruto_1024_te_fp16vae",), (
        Row("lora.targets", "\"injects ... into attention layers\"", "attn"),
        Row("lora.text_encoder", "`--train_text_encoder`", True),
        Row("data.resolution", "`--resolution=1024`", 1024),
        Row("data.heldout", "trains on the whole dataset", 0,
            "same; the evaluation's reference images are then training images (tag `eval.reference=train`)"),
        Row("trainer.batch_size", "`--train_batch_size=3`", 3),
        Row("trainer.max_steps", "\"Good convergence within 1000 steps\"", 1000),
        Row("trainer.lr", "`--learning_rate=1e-4`", 1e-4),
        Row("trainer.lr_scheduler", "`--lr_scheduler=\"constant\"`", "constant"),
        Row("trainer.precision", "`--mixed_precision=\"fp16\"`", "fp16"),
        Row("model.vae", "`--pretrained_vae_model_name_or_path=\"madebyollin/sdxl-vae-fp16-fix\"`",
            "madebyollin/sdxl-vae-fp16-fix"),
        Row("trainer.optimizer", "`--use_8bit_adam`", "adamw8bit"),
        Row("trainer.gradient_checkpointing", "`--gradient_checkpointing`", True),
        Row("eval.prompts", "`--validation_prompt=\"cute dragon creature\"`", ["cute dragon creature"]),
        Row("lora.rank", "not stated", NOT_STATED, "the project default (16)"),
        Row("eval.steps", "not stated", NOT_STATED, "the project default (25)"),
    )),
    Seed("002", "Naruto-style SDXL LoRA, 75 images, DreamBooth script", ("experiment=naruto_75_instance_bf16",), (
        Row("lora.targets", f"`unet_target_modules = {ATTN_CODE}`", "attn"),
        Row("data.limit", "`dataset.select(range(75))`", 75),
        Row("data.heldout", "trains on the 75 images", 0,
            "same; the evaluation's reference images are then training images (tag `eval.reference=train`)"),
        Row("data.instance_prompt", "`--instance_prompt \"Naruto style anime character\"`", "Naruto style anime character"),
        Row("data.class_prompt", "`--class_prompt \"anime character\"`", "anime character",
            "same value, but recorded only: prior preservation (class images, a prior loss term) is not "
            "implemented, and the write-up does not say it passed `--with_prior_preservation`"),
        Row("data.resolution", "`--resolution 512`", 512),
        Row("trainer.max_steps", "\"1200-step fine-tuning\"", 1200),
        Row("trainer.batch_size", "`--train_batch_size 2`", 2),
        Row("trainer.grad_accum", "`--gradient_accumulation_steps 2`", 2),
        Row("trainer.precision", "`--mixed_precision bf16`", "bf16"),
        Row("trainer.optimizer", "`--use_8bit_adam`", "adamw8bit"),
        Row("eval.attention_slicing", "`pipe.enable_attention_slicing()`", True),
        Row("eval.vae_tiling", "`pipe.enable_vae_tiling()`", True),
        Row("lora.rank", "not stated", NOT_STATED, "the project default (16)"),
    )),
    Seed("003", "Rasengan-XL technical report", ("experiment=naruto_r16a32_512_fp16",), (
        Row("lora.targets", f"`{ATTN_CODE}`, \"the Self-Attention and Cross-Attention projection layers\"", "attn"),
        Row("lora.rank", "\"Rank (r): 16\"", 16),
        Row("lora.alpha", "\"Alpha: 32\"", 32.0),
        Row("data.resolution", "\"Resolution: 512x512\"", 512),
        Row("data.crop", "\"resized, center-cropped, normalized\"", "center"),
        Row("data.heldout", "the 1,221 image-text pairs", 0,
            "same; the evaluation's reference images are then training images (tag `eval.reference=train`)"),
        Row("trainer.precision", "\"fp16 for UNet/Text Encoders\"", "fp16"),
        Row("model.vae_fp16_safe", "\"fp32 for VAE\"", False),
        Row("trainer.optimizer", "\"8-bit AdamW optimizer\"", "adamw8bit"),
        Row("trainer.gradient_checkpointing", "`unet.enable_gradient_checkpointing()`", True),
        Row("eval.fuse_lora", "`pipe.unet.merge_and_unload()`", True),
        Row("trainer.max_steps", "not stated", NOT_STATED, "the project default (100)"),
        Row("trainer.lr", "not stated", NOT_STATED, "the project default (1e-4)"),
    )),
)

_S = "not stated in the study; taken from "
# Settings all six variants share are read from variant (d), `attn`; rows starting "(a)".."(f)"
# are read from that variant.
STUDY = Seed("004", "The ablation study the project reproduces; shared settings as variant (d) composes them", ("sweep=naruto_study",), (
    Row("trainer.precision", "\"Float16 UNet and text encoders\"", "fp16", variant="attn"),
    Row("trainer.base_weights", "\"Float16 UNet\"", "compute", variant="attn"),
    Row("model.vae_fp16_safe", "\"Float32 VAE for stability\"", False, variant="attn"),
    Row("trainer.gradient_checkpointing", "\"Gradient checkpointing\"", True, variant="attn"),
    Row("trainer.noise_offset", "\"Noise offset\" (no value)", NOT_STATED,
        _S + "the common default 0.1 (the offset-noise write-up, crosslabs.org; kohya's sd-scripts)", variant="attn"),
    Row("data.crop", "\"Random cropping for more training variety\"", "random", variant="attn"),
    Row("data.crop_scale", "not stated", NOT_STATED,
        "no write-up or common default gives one (diffusers' Resize + RandomCrop, 1.0, never crops a square "
        "image); the project's choice", variant="attn"),
    Row("data.crops_per_image", "not stated", NOT_STATED,
        "the project's choice: 4 random crops per image, cached once for the sweep, one picked at every step "
        "(cheaper than encoding every step live, `trainer.cache_latents=false`)", variant="attn"),
    Row("trainer.grad_accum", "\"Gradient accumulation to simulate larger batch size\" (no value)", NOT_STATED,
        _S + "seed 000 (batch 1 x 4)", variant="attn"),
    Row("trainer.batch_size", "not stated", NOT_STATED, _S + "seed 000", variant="attn"),
    Row("lora.dropout", "\"0.0 dropout through LoRA dropout\"", 0.0, variant="attn"),
    Row("lora.rank", "not stated", NOT_STATED, _S + "seed 003 (same fp16 UNet / fp32 VAE plan)", variant="attn"),
    Row("lora.alpha", "not stated", NOT_STATED, _S + "seed 003", variant="attn"),
    Row("data.resolution", "not stated", NOT_STATED, _S + "seeds 000, 002 and 003 (512 px on a 16 GB card)",
        variant="attn"),
    Row("trainer.lr", "not stated", NOT_STATED, _S + "seed 001 (diffusers' SDXL LoRA default)", variant="attn"),
    Row("trainer.optimizer", "not stated for (a)-(d)", NOT_STATED, _S + "seeds 000-003 (all 8-bit AdamW)",
        variant="attn"),
    Row("trainer.max_steps", "not stated", NOT_STATED, _S + "seed 001 (\"good convergence within 1000 steps\")",
        variant="attn"),
    Row("data.heldout", "not stated (trains on the dataset)", NOT_STATED,
        "the project's choice: 4 images kept out, so the held-out loss measures generalisation", variant="attn"),
    Row("eval.vae_tiling", "\"VAE slicing and tiling\"", True, NOT_IN_TRAINING_VAE, variant="attn"),
    # The variants.
    Row("lora.text_encoder", "(a) \"LoRA on text encoders and unet many layers\"", True, variant="te_all"),
    Row("lora.targets", "(a) \"many layers like convolutions, cross attention\"", "all", variant="te_all"),
    Row("lora.text_encoder", "(b) \"LoRA on text encoders and unet single self attention layer\"", True,
        variant="te_attn"),
    Row("lora.targets", "(b) \"single self attention layer\" (its header: \"jus the attention layers\")",
        "self_attn", "same; the other reading (`attn`) is `sweep=attention_scope`", variant="te_attn"),
    Row("lora.text_encoder", "(c) text encoders \"**not** having lora\"", False, variant="all"),
    Row("lora.targets", "(c) \"unet many layers\"", "all", variant="all"),
    Row("lora.text_encoder", "(d) text encoders \"**not** having lora\"", False, variant="attn"),
    Row("lora.targets", "(d) \"unet self attention\" (its header: \"just the attention layers\")", "self_attn",
        "same; the other reading (`attn`) is `sweep=attention_scope`", variant="attn"),
    Row("lora.use_dora", "(e) \"DoRA weight decomposition\"", True, variant="dora_prodigy"),
    Row("lora.text_encoder", "(e) \"Frozen VAE & text encoders\"", False, variant="dora_prodigy"),
    Row("lora.targets", "(e) not stated (\"rest almost same\")", NOT_STATED,
        "the study's (d), self-attention; its conclusion says cross attention was not tried", variant="dora_prodigy"),
    Row("trainer.optimizer", "(e) \"Prodigy optimizer\", \"8-bit Adam (fallback)\"", "prodigy",
        "same; no fallback: a missing Prodigy is an error", variant="dora_prodigy"),
    Row("trainer.snr_gamma", "(e) \"Min-SNR gamma loss weighting\" (no gamma)", NOT_STATED,
        _S + "the common default 5 (Hang et al. 2023; diffusers' scripts)", variant="dora_prodigy"),
    Row("model.vae", "(e) \"FP16-Fix VAE\"", "madebyollin/sdxl-vae-fp16-fix", variant="dora_prodigy"),
    Row("model.vae_fp16_safe", "(e) \"FP16-Fix VAE\"", True, variant="dora_prodigy"),
    Row("data.caption_dropout", "(e) \"Caption dropout\" (no rate)", NOT_STATED,
        _S + "the common default 0.1 (Stable Diffusion's own 10% text dropping)", variant="dora_prodigy"),
    Row("lora.text_encoder", "(f) text encoders \"**not** having lora\"", False, variant="attn_dropout05"),
    Row("lora.targets", "(f) \"jus the attention layers\", after self-attention did best", "self_attn",
        "same on the self-attention reading; `sweep=attention_scope` measures the other", variant="attn_dropout05"),
    Row("lora.dropout", "(f) \"dropout as 0.5\"", 0.5, variant="attn_dropout05"),
))

ALL: tuple[Seed, ...] = (*SEEDS, STUDY)


def compose(overrides: Sequence[str]) -> Config:
    """The typed config `python -m sdxl_ablate <overrides>` runs."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return to_typed(hydra_compose(config_name="config", overrides=list(overrides)))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return ", ".join(f'"{v}"' for v in value)
    return str(value)


def verdict(row: Row, value: Any) -> str:
    if row.value is NOT_STATED:
        if not row.why:
            raise FidelityError(f"{row.key}: the write-up states no value, so say where the project's comes from")
        return row.why
    if value == row.value:
        return row.why or "same"
    if not row.why:
        raise FidelityError(f"{row.key}={_show(value)}: the write-up says {_show(row.value)} ({row.says}) and no "
                            "reason is given for the difference")
    return "different: " + row.why


def table(seed: Seed, extra: Sequence[str] = ()) -> str:
    """The markdown table of one write-up; `extra` overrides are added (a test drifts a preset)."""
    cfgs: dict[Optional[str], dict[str, Any]] = {}
    lines = [f"**{seed.file}: {seed.title}** (`{' '.join(seed.overrides)}`)", "",
             "| setting | the write-up says | the project | same? |", "|---|---|---|---|"]
    for row in seed.rows:
        if row.variant not in cfgs:
            variant = [f"variant={row.variant}"] if row.variant else []
            cfgs[row.variant] = flatten(compose([*seed.overrides, *variant, *extra]))
        value = cfgs[row.variant][row.key]
        lines.append(f"| `{row.key}` | {row.says} | `{_show(value)}` | {verdict(row, value)} |")
    return "\n".join(lines)


def render() -> str:
    return "\n\n".join(table(seed) for seed in ALL)


def readme_block(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise FidelityError(f"README has no fidelity markers ({BEGIN} ... {END})")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def write(readme: Path = README) -> bool:
    """Rewrites the README block; True when it changed."""
    text = readme.read_text()
    old = readme_block(text)
    new = render()
    if old == new:
        return False
    head, rest = text.split(BEGIN, 1)
    readme.write_text(f"{head}{BEGIN}\n{new}\n{END}{rest.split(END, 1)[1]}")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdxl_ablate.config.fidelity", description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite README.md's fidelity block")
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md's block is not the generated one")
    args = ap.parse_args(argv)
    if args.write:
        print("README.md fidelity tables " + ("updated" if write() else "already current"))
        return 0
    if args.check:
        if readme_block(README.read_text()) != render():
            print("README.md's fidelity tables differ from conf/: run python -m sdxl_ablate.config.fidelity --write",
                  file=sys.stderr)
            return 1
        print("README.md fidelity tables match conf/")
        return 0
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
