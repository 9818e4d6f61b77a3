"""Kohya-format names for SDXL LoRA modules: the original (SGM) UNet layout and the CLIP text encoders.

ComfyUI, AUTOMATIC1111/Forge and kohya's sd-scripts name an SDXL LoRA module by its path in
Stability AI's original UNet (`sgm`'s `UNetModel`: `input_blocks`, `middle_block`,
`output_blocks`), dots written as underscores, behind `lora_unet_`; the text encoders by their
Hugging Face CLIP path behind `lora_te1_` / `lora_te2_`. Diffusers builds a different module
tree for the same weights, so the map between the two is derived here from the diffusers UNet
config, from these documented facts about the original layout:

- `input_blocks[0]` is `conv_in`. Then, for each resolution level, one input block per ResNet
  (`[resnet, transformer]` where the level has attention, else `[resnet]`), and after every
  level but the last one block holding the downsampler (its conv is called `op`).
- `middle_block` is `[resnet, transformer, resnet]`.
- `output_blocks` walk the levels in reverse, `layers_per_block + 1` blocks per level, each
  `[resnet, transformer?]`; the last block of every level except the final (full-resolution)
  one also holds the upsampler (its conv is called `conv`).
- A ResNet block is `in_layers = [norm, SiLU, conv]`, `emb_layers = [SiLU, linear]`,
  `out_layers = [norm, SiLU, dropout, conv]`, `skip_connection`; a transformer keeps the
  diffusers names (`proj_in`, `transformer_blocks.N.attn1.to_q`, `ff.net.0.proj`, ...).
- `time_embed = [linear, SiLU, linear]`, `label_emb = [[linear, SiLU, linear]]`,
  `out = [norm, SiLU, conv]`.
"""

from __future__ import annotations

from typing import Any, Mapping

UNET_PREFIX = "lora_unet_"
# Kohya's prefixes for SDXL's two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG).
TEXT_ENCODER_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# The module path inside a CLIP text model as transformers 4.x, the published checkpoints and
# every LoRA tool spell it. transformers 5's CLIPTextModel drops the `text_model.` level.
CLIP_ROOT = "text_model."

# diffusers ResNet child -> the original ResNet block's child.
_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the block structure.
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}


class NamingError(ValueError):
    """A module name with no place in the original SDXL layout."""


def _per_level(value: Any, levels: int, what: str) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise NamingError(f"unet config {what}={value}: expected one value per level ({levels})")
    return value


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def sgm_block_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """{diffusers block path: original block path}, e.g. "down_blocks.1.attentions.0" -> "input_blocks.4.1".

    Also maps `...downsamplers.0` / `...upsamplers.0` to the block holding the resampler."""
    cfg = dict(unet_config)
    levels = len(cfg["block_out_channels"])
    down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if len(down_types) != levels or len(up_types) != levels:
        raise NamingError(f"unet config: {levels} levels but down_block_types={down_types}, up_block_types={up_types}")
    per_level = _per_level(cfg["layers_per_block"], levels, "layers_per_block")
    out: dict[str, str] = {}
    k = 1  # input_blocks.0 is conv_in
    for i in range(levels):
        for j in range(per_level[i]):
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            if _has_attention(down_types[i]):
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
            k += 1
        if i < levels - 1:
            out[f"down_blocks.{i}.downsamplers.0"] = f"input_blocks.{k}.0"
            k += 1
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")  # diffusers' default
    if mid_type is not None:
        out["mid_block.resnets.0"] = "middle_block.0"
        if _has_attention(mid_type):
            out["mid_block.attentions.0"] = "middle_block.1"
            out["mid_block.resnets.1"] = "middle_block.2"
        else:
            out["mid_block.resnets.1"] = "middle_block.1"
    k = 0
    up_per_level = list(reversed(per_level))
    for i in range(levels):
        attn = _has_attention(up_types[i])
        for j in range(up_per_level[i] + 1):
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            if attn:
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
            if j == up_per_level[i] and i < levels - 1:
                out[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{k}.{2 if attn else 1}"
            k += 1
    return out


def sgm_module_name(name: str, block_map: Mapping[str, str]) -> str:
    """The original-layout path of the diffusers UNet module `name` (dots kept)."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    # Blocks are 3 or 4 dotted parts deep ("mid_block.resnets.0", "down_blocks.1.resnets.0").
    for depth in (4, 3):
        block = ".".join(parts[:depth])
        if block in block_map:
            rest = parts[depth:]
            break
    else:
        raise NamingError(f"UNet module {name!r} lies in no block of the original SDXL layout")
    target = block_map[block]
    inner = ".".join(rest)
    kind = parts[depth - 2]
    if kind == "resnets":
        if inner not in _RESNET:
            raise NamingError(f"UNet module {name!r}: a ResNet has no child {inner!r} in the original layout "
                              f"(known: {sorted(_RESNET)})")
        return f"{target}.{_RESNET[inner]}"
    if kind == "attentions":
        return f"{target}.{inner}" if inner else target
    if kind == "downsamplers" and inner == "conv":
        return f"{target}.op"
    if kind == "upsamplers" and inner == "conv":
        return f"{target}.conv"
    raise NamingError(f"UNet module {name!r} has no counterpart in the original SDXL layout")


def unet_key(name: str, block_map: Mapping[str, str]) -> str:
    """Kohya's name of a diffusers UNet module: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`."""
    return UNET_PREFIX + sgm_module_name(name, block_map).replace(".", "_")


def canonical_text_encoder_name(name: str) -> str:
    """A CLIP text-encoder module path with the `text_model.` level, whatever transformers built."""
    return name if name.startswith(CLIP_ROOT) else CLIP_ROOT + name


def text_encoder_key(component: str, name: str) -> str:
    """Kohya's name of a text-encoder module: `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`."""
    if component not in TEXT_ENCODER_PREFIXES:
        raise NamingError(f"component {component!r}: expected one of {sorted(TEXT_ENCODER_PREFIXES)}")
    return TEXT_ENCODER_PREFIXES[component] + canonical_text_encoder_name(name).replace(".", "_")
