"""LoRA adapters: the one table from target names to module names, attach, save, reload.

Saved LoRAs are plain diffusers LoRA files (`pytorch_lora_weights.safetensors`) with the
peft adapter config stored as metadata, so `StableDiffusionXLPipeline.load_lora_weights`
restores rank, alpha, DoRA and dropout exactly. `load_lora` checks that every saved tensor
arrived: a dropped key is an error, never a quiet partial (or base-model) run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict
from safetensors import safe_open

from .config import LoraConfig, Targets

# UNet module names (peft matches a name or a dotted suffix) for each `lora.targets` value.
UNET_TARGETS: dict[Targets, tuple[str, ...]] = {
    # Self- and cross-attention projections of every transformer block.
    Targets.attn: ("to_q", "to_k", "to_v", "to_out.0"),
    # Attention, plus the transformer blocks' feed-forward and in/out projections, plus
    # every ResNet block's convolutions and time-embedding projection.
    Targets.all: (
        "to_q", "to_k", "to_v", "to_out.0",
        "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
        "conv1", "conv2", "conv_shortcut", "time_emb_proj",
    ),
}
# Both CLIP text encoders (lora.text_encoder=true): self-attention projections.
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

LORA_FILE = "pytorch_lora_weights.safetensors"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class LoraLoadError(RuntimeError):
    """A saved LoRA did not load completely."""


def peft_config(cfg: LoraConfig, target_modules: tuple[str, ...]) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_dora=cfg.use_dora,
        init_lora_weights="gaussian",  # B = 0: the untrained adapter leaves the model unchanged
        target_modules=list(target_modules),
    )


def lora_modules(components) -> dict[str, torch.nn.Module]:
    """The components that carry an adapter, by their diffusers name."""
    named = {"unet": components.unet, **{n: getattr(components, n) for n in TEXT_ENCODERS}}
    return {n: m for n, m in named.items() if getattr(m, "peft_config", None)}


def add_adapters(components, cfg: LoraConfig) -> list[torch.nn.Parameter]:
    """Attaches the variant's adapters; returns the trainable parameters (the LoRA ones only)."""
    components.unet.add_adapter(peft_config(cfg, UNET_TARGETS[cfg.targets]))
    if cfg.text_encoder:
        for name in TEXT_ENCODERS:
            getattr(components, name).add_adapter(peft_config(cfg, TEXT_ENCODER_TARGETS))
    params = [p for m in lora_modules(components).values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"lora.targets={cfg.targets.value} matched no module of the UNet")
    return params


def count_trainable(components) -> int:
    return sum(p.numel() for m in lora_modules(components).values() for p in m.parameters() if p.requires_grad)


def save_lora(components, out_dir: str | Path) -> Path:
    """Writes the adapters as one diffusers LoRA file with their configs as metadata."""
    from diffusers import StableDiffusionXLPipeline

    modules = lora_modules(components)
    kwargs = {}
    for name, module in modules.items():
        # LoRA weights are saved in fp32 whatever the training precision, for exact reloads.
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(module).items()}
        kwargs[f"{name}_lora_layers"] = state
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    out_dir = Path(out_dir)
    StableDiffusionXLPipeline.save_lora_weights(out_dir, weight_name=LORA_FILE, **kwargs)
    return out_dir / LORA_FILE


def saved_keys(path: str | Path) -> dict[str, set[str]]:
    """{component: {key without the component prefix}} of a saved LoRA file."""
    out: dict[str, set[str]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            component, rest = key.split(".", 1)
            out.setdefault(component, set()).add(rest)
    return out


def load_lora(pipe, path: str | Path, adapter_name: str = "variant", fuse: bool = False) -> None:
    """`pipe.load_lora_weights` plus the checks it lacks: every key loaded, inference mode.

    Raises LoraLoadError naming the missing keys if any saved tensor did not reach the model.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraLoadError(f"LoRA file {path} does not exist")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    for component, keys in saved_keys(path).items():
        module = getattr(pipe, component)
        loaded = set(get_peft_model_state_dict(module, adapter_name=adapter_name))
        missing = sorted(keys - loaded)
        if missing:
            raise LoraLoadError(
                f"{len(missing)} of {len(keys)} LoRA tensors for {component} were not loaded from {path}, "
                f"e.g. {missing[:3]}"
            )
    for component in ("unet", *TEXT_ENCODERS):
        # Modules built in code start in train mode, and load_lora_weights does not change
        # that: LoRA dropout would stay active at inference.
        getattr(pipe, component).eval()
    if fuse:
        pipe.fuse_lora(adapter_names=[adapter_name])


def remove_adapters(components) -> None:
    """Strips the adapters, restoring the base modules exactly (no merge)."""
    from diffusers.utils import recurse_remove_peft_layers

    for module in lora_modules(components).values():
        recurse_remove_peft_layers(module)
        del module.peft_config
        module._hf_peft_config_loaded = False
