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
from safetensors.torch import load_file

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
_MAGNITUDE = "lora_magnitude_vector"
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
        if name in TEXT_ENCODERS:
            # transformers' LoRA loader maps a DoRA magnitude only under its ".weight" name;
            # under peft's bare name it keeps the fresh magnitude and merely warns.
            state = {k + ".weight" if k.endswith(_MAGNITUDE) else k: v for k, v in state.items()}
        kwargs[f"{name}_lora_layers"] = state
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    out_dir = Path(out_dir)
    StableDiffusionXLPipeline.save_lora_weights(out_dir, weight_name=LORA_FILE, **kwargs)
    return out_dir / LORA_FILE


def saved_state(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {peft key: tensor}} of a saved LoRA file (prefix stripped, magnitude names as peft's)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        component, rest = key.split(".", 1)
        out.setdefault(component, {})[rest.removesuffix(".weight") if rest.endswith(_MAGNITUDE + ".weight") else rest] = tensor
    return out


def _load_problems(saved: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> str:
    """'' when the model's adapter holds exactly the saved tensors, else what differs.

    Key names alone are not enough: a loader that fails to map a key leaves the freshly
    initialised adapter tensor in place under the right name, with only a warning."""
    missing = sorted(saved.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - saved.keys())
    # Compared in the model's dtype: a bf16 or fp16 pipeline holds the fp32 file rounded.
    differ = sorted(k for k in saved.keys() & loaded.keys()
                    if not torch.equal(saved[k].to(loaded[k].dtype), loaded[k].detach().cpu()))
    parts = [f"{len(v)} {what} (e.g. {v[:2]})" for what, v in
             (("saved tensors missing", missing), ("adapter tensors not in the file", unexpected),
              ("tensors with other values than saved", differ)) if v]
    return "; ".join(parts)


def load_lora(pipe, path: str | Path, adapter_name: str = "variant", fuse: bool = False) -> None:
    """`pipe.load_lora_weights` plus the checks it lacks: every key loaded, inference mode.

    Raises LoraLoadError naming the missing keys if any saved tensor did not reach the model.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraLoadError(f"LoRA file {path} does not exist")
    # The steps of `pipe.load_lora_weights`, public classmethods of the same loader, except that
    # a text encoder the file has no keys for is skipped: load_lora_weights would call its
    # loader anyway, which then warns "No LoRA keys associated to CLIPTextModel" for every
    # UNet-only LoRA.
    state, alphas, metadata = pipe.lora_state_dict(str(path.parent), weight_name=path.name,
                                                   unet_config=pipe.unet.config, return_lora_metadata=True)
    pipe.load_lora_into_unet(state, network_alphas=alphas, unet=pipe.unet, adapter_name=adapter_name,
                             metadata=metadata)
    for name in TEXT_ENCODERS:
        if any(key.startswith(f"{name}.") for key in state):
            pipe.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=getattr(pipe, name),
                                             prefix=name, lora_scale=pipe.lora_scale, adapter_name=adapter_name,
                                             metadata=metadata)
    for component, saved in saved_state(path).items():
        problems = _load_problems(saved, get_peft_model_state_dict(getattr(pipe, component), adapter_name=adapter_name))
        if problems:
            raise LoraLoadError(f"LoRA {path} did not load completely into {component}: {problems}")
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
