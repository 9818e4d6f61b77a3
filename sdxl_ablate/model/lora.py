"""LoRA adapters: the one table from target names to module names, attach, save, reload.

Saved LoRAs are plain diffusers LoRA files (`pytorch_lora_weights.safetensors`) with the
peft adapter config stored as metadata, so `StableDiffusionXLPipeline.load_lora_weights`
restores rank, alpha and DoRA exactly; dropout is left out (a training setting), and
text-encoder keys have one spelling whatever transformers version wrote them. `load_lora`
checks, module by module, that every saved tensor arrived with its scale: a dropped key is an
error, never a quiet partial (or base-model) run. The kohya-format export is export/lora_export.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file

from sdxl_ablate.config import LoraConfig, Targets
from sdxl_ablate.model.kohya import CLIP_ROOT, canonical_text_encoder_name

# UNet module names (peft matches a name or a dotted suffix) for each `lora.targets` value.
UNET_TARGETS: dict[Targets, tuple[str, ...]] = {
    # Self- and cross-attention projections of every transformer block.
    Targets.attn: ("to_q", "to_k", "to_v", "to_out.0"),
    # The same projections of the self-attention (attn1) or the cross-attention (attn2) alone:
    # the study's "single self attention layer" and its "cross attention" read literally.
    Targets.self_attn: ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"),
    Targets.cross_attn: ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
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
# Where diffusers stores the adapter configs in a LoRA file's safetensors metadata.
_METADATA_KEY = "lora_adapter_metadata"
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


def inference_adapter_config(config: PeftLoraConfig | dict) -> dict:
    """The adapter config as saved with the weights: without dropout.

    Dropout is a training setting (the run's params keep it); saved, it would make a plain
    `load_lora_weights` rebuild Dropout modules, active in train mode, so that two generations
    with the same seed differ."""
    return {**(config.to_dict() if isinstance(config, PeftLoraConfig) else config), "lora_dropout": 0.0}


def save_lora(components, out_dir: str | Path) -> Path:
    """Writes the adapters as one diffusers LoRA file with their configs as metadata."""
    modules = lora_modules(components)
    # LoRA weights are saved in fp32 whatever the training precision, for exact reloads.
    states = {name: {k: v.detach().to("cpu", torch.float32).contiguous()
                     for k, v in get_peft_model_state_dict(module).items()} for name, module in modules.items()}
    configs = {name: inference_adapter_config(module.peft_config["default"]) for name, module in modules.items()}
    return write_lora_file(Path(out_dir) / LORA_FILE, states, configs)


def write_lora_file(path: Path, states: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict]) -> Path:
    """One diffusers LoRA file of {component: peft state} with each component's adapter config
    as metadata. Text-encoder keys get their one canonical spelling here, for training's file
    and the export's alike: the `text_model.` level whatever transformers built (5.x's
    CLIPTextModel has none), and DoRA magnitudes under ".weight" (transformers' LoRA loader maps
    a magnitude only under that name; under peft's bare name it keeps the fresh one and merely warns)."""
    from diffusers import StableDiffusionXLPipeline

    kwargs = {}
    for component, state in states.items():
        if component in TEXT_ENCODERS:
            state = {canonical_text_encoder_name(k) + (".weight" if k.endswith(_MAGNITUDE) else ""): v
                     for k, v in state.items()}
        kwargs[f"{component}_lora_layers"] = state
        kwargs[f"{component}_lora_adapter_metadata"] = configs[component]
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    return path


def saved_state(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {peft key: tensor}} of a saved LoRA file (prefix stripped, magnitude names as peft's)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        component, rest = key.split(".", 1)
        out.setdefault(component, {})[rest.removesuffix(".weight") if rest.endswith(_MAGNITUDE + ".weight") else rest] = tensor
    return out


def saved_configs(path: str | Path) -> dict[str, dict]:
    """{component: peft adapter config as saved} from a LoRA file's metadata ({} if it has none)."""
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(_METADATA_KEY)
    out: dict[str, dict] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, field = key.split(".", 1)
        out.setdefault(component, {})[field] = value
    return out


def adapter_scaling(config: dict, module_path: str, rank: int) -> float:
    """The factor peft multiplies this module's B @ A by: alpha / rank (alpha / sqrt(rank) with rsLoRA),
    with the config's per-module alpha_pattern taken into account."""
    alpha = config["lora_alpha"]
    patterns = config.get("alpha_pattern") or {}
    if patterns:
        key = get_pattern_key(list(patterns), module_path)
        alpha = patterns.get(key, alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def split_key(key: str) -> tuple[str, str]:
    """A peft key -> (module path, part): part is "lora_A", "lora_B" or "magnitude"."""
    if key.endswith("." + _MAGNITUDE):
        return key[: -len(_MAGNITUDE) - 1], "magnitude"
    for part in ("lora_A", "lora_B"):
        if key.endswith(f".{part}.weight"):
            return key[: -len(part) - len(".weight") - 1], part
    raise LoraLoadError(f"LoRA key {key!r} is none of <module>.lora_A.weight, <module>.lora_B.weight, "
                        f"<module>.{_MAGNITUDE}")


def find_module(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The module at `path`, in either spelling of a CLIP text encoder's path (with or without
    the `text_model.` level that transformers 4 has and 5 drops)."""
    spellings = [path, path[len(CLIP_ROOT):] if path.startswith(CLIP_ROOT) else CLIP_ROOT + path]
    for spelling in spellings:
        try:
            return model.get_submodule(spelling)
        except AttributeError:
            continue
    return None


def _adapter_tensor(module: torch.nn.Module, part: str, adapter: str) -> torch.Tensor:
    if part == "magnitude":
        return module.lora_magnitude_vector[adapter].weight
    return getattr(module, part)[adapter].weight


def _load_problems(model: torch.nn.Module, saved: dict[str, torch.Tensor], config: dict | None,
                   adapter: str) -> str:
    """'' when the model's adapter holds exactly the saved tensors at the saved modules (and,
    given the saved config, applies the saved scale), else what differs.

    Checked module by module and by value, not by key spelling: a loader that fails to map a
    key leaves the freshly initialised adapter tensor in place under the right name, with only
    a warning; and the same module may be spelled two ways (see find_module)."""
    from peft.tuners.lora import LoraLayer

    missing, differ, scale = [], [], []
    found: set[tuple[int, str]] = set()
    for key, tensor in saved.items():
        path, part = split_key(key)
        module = find_module(model, path)
        try:
            loaded = _adapter_tensor(module, part, adapter)
        except (AttributeError, KeyError, TypeError):
            missing.append(key)
            continue
        found.add((id(module), part))
        # Compared in the model's dtype: a bf16 or fp16 pipeline holds the fp32 file rounded.
        if loaded.shape != tensor.shape or not torch.equal(tensor.to(loaded.dtype), loaded.detach().cpu()):
            differ.append(key)
        if part == "lora_A" and config is not None:
            expected = adapter_scaling(config, path, tensor.shape[0])
            if not math.isclose(module.scaling[adapter], expected, rel_tol=1e-6):
                scale.append(f"{path}: {module.scaling[adapter]} instead of {expected}")
    unexpected = [
        f"{name}.{part}" for name, module in model.named_modules() if isinstance(module, LoraLayer)
        for part in ("lora_A", "lora_B", "magnitude")
        if adapter in (module.lora_magnitude_vector if part == "magnitude" else getattr(module, part))
        and (id(module), part) not in found
    ]
    parts = [f"{len(v)} {what} (e.g. {v[:2]})" for what, v in
             (("saved tensors missing", missing), ("adapter tensors not in the file", unexpected),
              ("tensors with other values than saved", differ), ("modules with another scale", scale)) if v]
    return "; ".join(parts)


def load_lora(pipe, path: str | Path, adapter_name: str = "variant", fuse: bool = False) -> None:
    """`pipe.load_lora_weights` plus the checks it lacks: every tensor loaded, scale, inference mode.

    Raises LoraLoadError naming what differs if any saved tensor did not reach its module.
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
    configs = saved_configs(path)
    for component, saved in saved_state(path).items():
        problems = _load_problems(getattr(pipe, component), saved, configs.get(component), adapter_name)
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

    for name, module in lora_modules(components).items():
        if name == "unet":
            module.unload_lora()
        else:  # what diffusers' pipelines do to a text encoder (transformers has no such call)
            recurse_remove_peft_layers(module)
            del module.peft_config
            module._hf_peft_config_loaded = False


def lora_b_all_zero(components) -> bool:
    """True when every LoRA B (up) matrix is exactly zero: the adapters are still the identity."""
    b = [p for m in lora_modules(components).values() for n, p in m.named_parameters() if ".lora_B." in n]
    return bool(b) and all(torch.count_nonzero(p) == 0 for p in b)
