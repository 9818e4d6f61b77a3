"""Export a trained LoRA for the tools people make images with.

    python -m sdxl_ablate.export <run id | lora file> --format kohya|diffusers [--dtype fp16|bf16|fp32] --out FILE

`kohya` is the format ComfyUI, AUTOMATIC1111/Forge and kohya's sd-scripts read: per module
`<name>.lora_down.weight`, `<name>.lora_up.weight` and a scalar `<name>.alpha` (the real
`lora_alpha`: without it these tools apply scale 1.0, not alpha/rank), names in the original
SDXL layout (see kohya.py), `ss_*` and `modelspec.*` metadata so the tools show it as an SDXL
LoRA, and DoRA magnitudes as `<name>.dora_scale`. `diffusers` rewrites the project's own file
in the given dtype, with text-encoder keys in their canonical spelling and no dropout in the
adapter config (files saved by older versions of this project may have either).

A run id is looked up in MLflow (`--tracking-uri`, default as in training:
`sqlite:///<cwd>/mlflow.db`); its `lora/pytorch_lora_weights.safetensors` artifact is exported
and its run name becomes the title. Every finished run also logs the kohya file itself
(`log_kohya`, called by the runner).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from sdxl_ablate.config import TrackingConfig
from sdxl_ablate.model.precision import DTYPES, dtype_of
from sdxl_ablate.model.kohya import NamingError, sgm_block_map, text_encoder_key, unet_key
from sdxl_ablate.model.lora import (
    LORA_FILE,
    TEXT_ENCODERS,
    LoraLoadError,
    adapter_scaling,
    inference_adapter_config,
    saved_configs,
    saved_state,
    split_key,
    write_lora_file,
)

FORMATS = ("kohya", "diffusers")
LORA_ARTIFACT = f"lora/{LORA_FILE}"

# What the tools do with a DoRA file (read from their loaders, 2026-11). Printed by the CLI
# and written into the file's description.
DORA_NOTE = (
    "DoRA: magnitudes are stored as <module>.dora_scale, one value per output channel "
    "(shape [out, 1] or [out, 1, 1, 1]). ComfyUI and Forge apply them, but divide by the norm "
    "of the base weight where training (peft) divides by the norm of the adapted weight, so "
    "their result is close to, not equal to, the trained model. AUTOMATIC1111 decomposes "
    "along the input axis only and mis-applies them; kohya's networks.lora and diffusers' "
    "load_lora_weights of a kohya file ignore them (plain LoRA). Exact DoRA: the diffusers "
    "file (pytorch_lora_weights.safetensors) with diffusers."
)

# kohya's and Stability AI's model-spec names for SDXL (sd-scripts' sai_model_spec).
_SS_BASE_MODEL_VERSION = "sdxl_base_v1-0"
_MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"


@dataclass(frozen=True)
class BaseModel:
    """What a LoRA was trained on, as its metadata says it: the version and architecture the
    tools read (A1111/Forge list a LoRA for SDXL checkpoints only when the version says SDXL) and
    the name shown in its title."""

    version: str
    architecture: str
    name: str


def base_model(kind: str, pretrained: Optional[str] = None) -> BaseModel:
    """The base of a run with `model.kind` (and `model.pretrained`): only a pretrained SDXL claims
    to be SDXL base 1.0; the test model and random weights say what they are, so no tool offers
    their LoRA for a real SDXL checkpoint."""
    if kind == "pretrained":
        return BaseModel(_SS_BASE_MODEL_VERSION, _MODELSPEC_ARCHITECTURE, pretrained or "unknown pretrained SDXL")
    if kind == "tiny":
        return BaseModel("sdxl_ablate_tiny", "sdxl-ablate-tiny/lora", "tiny test model, random weights")
    if kind == "sdxl_random":
        return BaseModel("sdxl_ablate_random", _MODELSPEC_ARCHITECTURE, "SDXL architecture, random weights")
    raise ExportError(f"model.kind={kind!r}: expected one of pretrained, tiny, sdxl_random")
_MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


class ExportError(ValueError):
    """An export that cannot be made; the message names the bad value and what is accepted."""


@dataclass
class KohyaModule:
    key: str  # lora_unet_... / lora_te1_... / lora_te2_...
    component: str
    rank: int
    alpha: float
    kernel: int  # 1 for linear and 1x1 conv layers, 3 for 3x3 convs


def _unet_block_map() -> dict[str, str]:
    """The diffusers -> original block map of the SDXL-base UNet (config only, nothing built)."""
    from sdxl_ablate.model.sdxl import SDXL_UNET_CONFIG

    return sgm_block_map(SDXL_UNET_CONFIG)


def _modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"lora_A"|"lora_B"|"magnitude": tensor}} of one component's peft state."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        path, part = split_key(key)
        out.setdefault(path, {})[part] = tensor
    return out


def to_kohya(
    state: dict[str, dict[str, torch.Tensor]],
    configs: dict[str, dict],
    dtype: torch.dtype = torch.float16,
    unet_config: Optional[dict] = None,
) -> tuple[dict[str, torch.Tensor], list[KohyaModule]]:
    """The kohya tensors of a LoRA given as {component: peft state} with its adapter configs.

    `unet_config` (default: SDXL base) decides the original-layout block numbers."""
    block_map = sgm_block_map(unet_config) if unet_config is not None else _unet_block_map()
    tensors: dict[str, torch.Tensor] = {}
    modules: list[KohyaModule] = []
    for component, comp_state in state.items():
        if component not in ("unet", *TEXT_ENCODERS):
            raise ExportError(f"LoRA component {component!r}: expected unet, text_encoder or text_encoder_2")
        if component not in configs:
            raise ExportError(f"the LoRA file has no adapter config for {component} (rank and alpha unknown); "
                              "expected a file saved by sdxl_ablate or diffusers with its adapter metadata")
        for path, parts in sorted(_modules(comp_state).items()):
            if set(parts) - {"magnitude"} != {"lora_A", "lora_B"}:
                raise ExportError(f"{component}.{path}: has {sorted(parts)}, expected lora_A and lora_B")
            key = unet_key(path, block_map) if component == "unet" else text_encoder_key(component, path)
            if f"{key}.lora_down.weight" in tensors:
                raise ExportError(f"two modules map to the kohya name {key}")
            down, up = parts["lora_A"], parts["lora_B"]
            rank = down.shape[0]
            # Kohya tools scale by alpha / rank: the alpha that gives peft's scale exactly.
            alpha = adapter_scaling(configs[component], path, rank) * rank
            tensors[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
            tensors[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
            # fp32 whatever the weights: a scalar costs nothing, and alpha must survive exactly.
            tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            if "magnitude" in parts:
                # peft keeps one magnitude per output channel ([out] for linear layers,
                # [1, out, 1, 1] for convs); ComfyUI recognises the output-axis form by its
                # first dimension: [out, 1] / [out, 1, 1, 1].
                shape = (up.shape[0],) + (1,) * (up.dim() - 1)
                tensors[f"{key}.dora_scale"] = parts["magnitude"].reshape(shape).to(dtype).contiguous()
            kernel = down.shape[-1] if down.dim() == 4 else 1
            modules.append(KohyaModule(key, component, rank, alpha, kernel))
    if not modules:
        raise ExportError("the LoRA file holds no LoRA module")
    return tensors, modules


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def kohya_metadata(
    modules: list[KohyaModule], title: str, use_dora: bool, resolution: Optional[int] = None,
    source: str = "", base: Optional[BaseModel] = None,
) -> dict[str, str]:
    """The `ss_*` (kohya) and `modelspec.*` (Stability AI model spec) metadata the tools display.

    A1111/Forge decide SD1 vs SDXL from `ss_base_model_version`; without it an SDXL LoRA is
    hidden for SDXL checkpoints. `base`: what the run trained on (its title names it); None for a
    bare file, taken to be an SDXL base LoRA."""
    # kohya's network_dim/alpha cover linear and 1x1 conv layers; 3x3 convs have their own
    # conv_dim/conv_alpha in the network args.
    linear = [m for m in modules if m.kernel == 1] or modules
    conv = [m for m in modules if m.kernel > 1]
    args: dict[str, str] = {}
    if conv:
        args["conv_dim"] = str(_most_common([m.rank for m in conv]))
        args["conv_alpha"] = _number(_most_common([m.alpha for m in conv]))
    if use_dora:
        # LyCORIS's names for a DoRA LoRA with output-axis decomposition.
        args.update({"algo": "lora", "dora_wd": "True", "wd_on_out": "True"})
    on = f" on {base.name}" if base is not None else ""
    description = f"SDXL LoRA trained with sdxl-ablate{on}{f' ({source})' if source else ''}."
    if use_dora:
        description += " " + DORA_NOTE
    meta = {
        "ss_network_module": "lycoris.kohya" if use_dora else "networks.lora",
        "ss_network_dim": str(_most_common([m.rank for m in linear])),
        "ss_network_alpha": _number(_most_common([m.alpha for m in linear])),
        "ss_base_model_version": base.version if base else _SS_BASE_MODEL_VERSION,
        "ss_v2": "False",
        "ss_output_name": title,
        "ss_network_train_unet_only": str(all(m.component == "unet" for m in modules)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": base.architecture if base else _MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": _MODELSPEC_IMPLEMENTATION,
        "modelspec.title": f"{title} ({base.name})" if base else title,
        "modelspec.description": description,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
    }
    if base is not None:
        meta["ss_sd_model_name"] = base.name
    if args:
        meta["ss_network_args"] = json.dumps(args)
    if resolution:
        meta["ss_resolution"] = f"({resolution}, {resolution})"
        meta["modelspec.resolution"] = f"{resolution}x{resolution}"
    return meta


def write_kohya(lora_file: str | Path, out: str | Path, title: str, dtype: torch.dtype = torch.float16,
                resolution: Optional[int] = None, source: str = "", unet_config: Optional[dict] = None,
                base: Optional[BaseModel] = None) -> Path:
    """The kohya file of a diffusers LoRA file saved by this project (`unet_config`: the UNet it
    was trained on, default SDXL base)."""
    state, configs = saved_state(lora_file), saved_configs(lora_file)
    tensors, modules = to_kohya(state, configs, dtype, unet_config)
    use_dora = any(k.endswith(".dora_scale") for k in tensors)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=kohya_metadata(modules, title, use_dora, resolution, source, base))
    return out


def write_diffusers(lora_file: str | Path, out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """The diffusers file, re-saved in `dtype` with canonical text-encoder keys and no dropout."""
    state, configs = saved_state(lora_file), saved_configs(lora_file)
    for component in state:
        if component not in configs:
            raise ExportError(f"the LoRA file has no adapter config for {component}; expected a file saved "
                              "by sdxl_ablate or diffusers with its adapter metadata")
    return write_lora_file(Path(out), {c: {k: v.to(dtype).contiguous() for k, v in s.items()} for c, s in state.items()},
                           {c: inference_adapter_config(configs[c]) for c in state})


def kohya_filename(run_name: str) -> str:
    """`<run name>_kohya.safetensors` with the name made safe for every file system and for
    A1111's `<lora:NAME:weight>` prompt syntax: '=' becomes '-', ',' becomes '_', any other
    character outside [A-Za-z0-9._-] becomes '_'.

    `lora.targets=all,lora.rank=4` -> `lora.targets-all_lora.rank-4_kohya.safetensors`."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_name.replace("=", "-").replace(",", "_")).strip("._") or "lora"
    return f"{safe}_kohya.safetensors"


def log_kohya(tracker, lora_file: Path, run_name: str, unet_config: dict, resolution: Optional[int] = None,
              base: Optional[BaseModel] = None) -> Path:
    """Writes the kohya file (fp16) beside the run's diffusers file and logs it as
    `lora/<name>_kohya.safetensors`; `unet_config`: the config of the UNet that was trained,
    `base`: what it was (`base_model`)."""
    out = write_kohya(lora_file, Path(lora_file).parent / kohya_filename(run_name), title=run_name,
                      resolution=resolution, source=f"MLflow run {tracker.run_id}", unet_config=dict(unet_config),
                      base=base)
    tracker.log_artifact(out, "lora")
    return out


# --- the command line -------------------------------------------------------------------------

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class _Source:
    lora_file: Path
    title: str
    resolution: Optional[int]
    description: str
    unet_config: Optional[dict] = None  # None: SDXL base
    base: Optional[BaseModel] = None  # None: a bare file, taken to be an SDXL base LoRA


def _from_run(run_id: str, tracking_uri: str, workdir: Path) -> _Source:
    from mlflow.exceptions import MlflowException

    from sdxl_ablate.track.tracker import connect

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        # MLflow would create an empty store there: say what is missing instead.
        raise ExportError(f"run id {run_id!r}: no MLflow store at {tracking_uri} (run from the folder that "
                          f"holds mlflow.db, or pass --tracking-uri)")
    client = connect(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ExportError(f"run id {run_id!r}: no such run in the MLflow store {tracking_uri} "
                          f"(pass --tracking-uri, or a LoRA file instead)") from err
    try:
        path = Path(client.download_artifacts(run_id, LORA_ARTIFACT, str(workdir)))
    except (MlflowException, OSError) as err:
        raise ExportError(f"run {run_id} ({run.info.run_name}) has no artifact {LORA_ARTIFACT}: it failed, or "
                          f"ran with trainer.save_lora=false or tracking.log_weights=false") from err
    res = run.data.params.get("data.resolution")
    unet_config = None
    if run.data.params.get("model.kind") == "tiny":  # the test model: its own block layout
        from sdxl_ablate.model.sdxl import build_unet

        unet_config = dict(build_unet("tiny", "meta").config)
    kind = run.data.params.get("model.kind", "pretrained")
    return _Source(path, run.info.run_name or run_id, int(res) if res and res.isdigit() else None,
                   f"MLflow run {run_id}", unet_config, base_model(kind, run.data.params.get("model.pretrained")))


def _resolve(source: str, tracking_uri: str, workdir: Path) -> _Source:
    path = Path(source).expanduser()
    if path.is_file():
        title = path.stem if path.name != LORA_FILE else path.parent.name or path.stem
        return _Source(path, title, None, path.name)
    if _RUN_ID.match(source):
        return _from_run(source, tracking_uri, workdir)
    raise ExportError(f"{source!r} is neither an existing LoRA file nor an MLflow run id "
                      f"(32 hex digits, as in the MLflow UI)")


def main(argv: Optional[list[str]] = None) -> int:
    from sdxl_ablate.track.tracker import resolve_uri

    parser = argparse.ArgumentParser(
        prog="python -m sdxl_ablate.export",
        description="Export a trained LoRA (an MLflow run id or a pytorch_lora_weights.safetensors file) "
                    "for ComfyUI / AUTOMATIC1111 / Forge (kohya) or diffusers.")
    parser.add_argument("source", help="an MLflow run id, or a LoRA file saved by sdxl_ablate")
    parser.add_argument("--format", choices=FORMATS, default="kohya",
                        help="kohya: ComfyUI, A1111/Forge, sd-scripts (default); diffusers: load_lora_weights")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="tensor dtype (default fp16)")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--title", help="the name tools show (default: the run name, or the file's name)")
    parser.add_argument("--tracking-uri", default=resolve_uri(TrackingConfig()),
                        help="MLflow store to look a run id up in (default: %(default)s)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        parser.error(f"--out {args.out!r}: must end in .safetensors")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = _resolve(args.source, args.tracking_uri, Path(tmp))
            dtype = dtype_of(args.dtype)
            if args.format == "kohya":
                write_kohya(src.lora_file, out, args.title or src.title, dtype, src.resolution, src.description,
                            src.unet_config, src.base)
            else:
                write_diffusers(src.lora_file, out, dtype)
            dora = any(c.get("use_dora") for c in saved_configs(src.lora_file).values())
    except (ExportError, NamingError, LoraLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}, {args.dtype}) from {src.description}")
    if dora and args.format == "kohya":
        print(DORA_NOTE)
    return 0
