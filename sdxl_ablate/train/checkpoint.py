"""Resumable training checkpoints: written atomically, verified by checksum, loaded without pickle.

A checkpoint is a directory `step-00000040/` holding

- `state.safetensors`: every tensor of the training state (LoRA weights, optimizer moments,
  the torch CPU/CUDA RNG states and the noise generator's state, as uint8 tensors),
- `state.json`: everything else (step, data order, python RNG, lr scheduler, loss scaler, the
  optimizer's hyperparameters, losses so far, and the config it was trained with),
- `manifest.json`: the sha256 and size of the two files, written last.

It is written into a hidden temporary directory, fsynced and renamed into place, so a kill at
any moment leaves either the complete new checkpoint or none (the earlier ones are untouched).
Loading checks the manifest first; a checkpoint whose files do not match is skipped with a
warning and the previous one is used. Nothing is unpickled: tensors come from safetensors,
the rest from JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdxl_ablate.track.files import fsync_path, write_json_durably

log = logging.getLogger(__name__)

TENSORS = "state.safetensors"
META = "state.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})$")
_TMP = re.compile(r"^\.step-\d{8}\.tmp-\d+$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, missing, or from another training."""


class ConfigMismatch(CheckpointError):
    """Resuming with another config than the checkpoint's: names every key that differs."""

    def __init__(self, path: Path, differences: list[str]):
        self.differences = differences
        super().__init__(f"checkpoint {path} was trained with a different config; refusing to resume. "
                         "Differing keys (checkpoint -> now):\n  - " + "\n  - ".join(differences)
                         + "\nRun with the checkpoint's values, or trainer.resume=never to start afresh.")


# --------------------------------------------------------------------------- (de)serialising
# A state is nested dicts/lists/tuples of tensors and plain values. Tensors go to safetensors
# under their path; the rest to JSON, with tuples and non-string dict keys (the optimizer's
# state is keyed by parameter index) marked so they come back exactly as they were.

def pack(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not obj.keys() & {"__tensor__", "__items__", "__tuple__"}:
            return {k: pack(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[k, pack(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state at {path!r}: cannot store a {type(obj).__name__} without pickle")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {unpack(k, tensors): unpack(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- files
def step_of(path: Path) -> int:
    m = _NAME.match(path.name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a name like step-00000040)")
    return int(m.group(1))


def list_checkpoints(directory: Path) -> list[Path]:
    """The completed checkpoints in `directory`, oldest first (temporary ones are not listed)."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name)), key=step_of)


def verify(path: Path) -> None:
    """Raises CheckpointError saying what is wrong unless every file matches the manifest."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (the write did not complete)")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: unreadable {MANIFEST}: {err}") from err
    for name in (TENSORS, META):
        f = path / name
        if name not in files:
            raise CheckpointError(f"{path}: {name} is not in the manifest")
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != files[name]["size"]:
            raise CheckpointError(f"{path}: {name} has {f.stat().st_size} bytes, the manifest says {files[name]['size']}")
        if _sha256(f) != files[name]["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its sha256 checksum (corrupt)")


def write_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Writes `state` as checkpoint `step` atomically, then keeps only the last `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    if final.is_dir():
        try:
            verify(final)
            log.info("checkpoint %s already exists", final)
            return final  # the same step of the same training: the same state
        except CheckpointError as err:
            log.warning("replacing a bad checkpoint: %s", err)
            shutil.rmtree(final)
    tmp = directory / f".step-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors: dict[str, torch.Tensor] = {}
        meta = {"format": FORMAT_VERSION, "step": step, "state": pack(state, tensors)}
        save_file(tensors, str(tmp / TENSORS))
        fsync_path(tmp / TENSORS)
        write_json_durably(tmp / META, meta)
        files = {name: {"sha256": _sha256(tmp / name), "size": (tmp / name).stat().st_size} for name in (TENSORS, META)}
        write_json_durably(tmp / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": files})
        fsync_path(tmp)
        os.rename(tmp, final)  # the moment the checkpoint exists: all of it or none
        fsync_path(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(directory, keep)
    return final


def prune(directory: Path, keep: int) -> None:
    """Removes all but the last `keep` checkpoints and any temporary directory a killed write
    left behind (one writer per directory: the caller holds its lock)."""
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for p in directory.iterdir():
        if _TMP.match(p.name) and not p.name.endswith(f".tmp-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The verified state of one checkpoint (raises CheckpointError if it does not verify)."""
    verify(path)
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')}, this version reads {FORMAT_VERSION}")
    return unpack(meta["state"], load_file(str(path / TENSORS)))


def latest_valid(directory: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a line for each newer one that did not."""
    skipped: list[str] = []
    for path in reversed(list_checkpoints(directory)):
        try:
            verify(path)
            return path, skipped
        except CheckpointError as err:
            log.warning("skipping a corrupt checkpoint, using the one before: %s", err)
            skipped.append(str(err))
    return None, skipped


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: saved -> current` for every hashed config entry that differs."""
    current = json.loads(json.dumps(current, default=str))
    keys = sorted(saved.keys() | current.keys())
    missing = "<absent>"
    return [f"{k}: {saved.get(k, missing)!r} -> {current.get(k, missing)!r}"
            for k in keys if saved.get(k, missing) != current.get(k, missing)]


# --------------------------------------------------------------------------- the training state
def rng_state(generator: torch.Generator, rng: random.Random) -> dict[str, Any]:
    return {
        "python": rng.getstate(),
        "torch_cpu": torch.get_rng_state(),
        # Only once CUDA is in use: a CPU run must not start a CUDA context just to save its RNG
        # (unused, it is what torch.manual_seed left, which a resumed run sets again).
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator, rng: random.Random) -> None:
    version, internal, gauss = state["python"]
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(state["torch_cuda"]):
            raise CheckpointError(f"the checkpoint holds the RNG state of {len(state['torch_cuda'])} CUDA "
                                  "device(s); fewer are visible here")
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    generator.set_state(state["generator"])


def capture(ts) -> dict[str, Any]:
    """The state of the loop after `ts.step` optimizer steps (ts: train.TrainState)."""
    ts.timer.settle()  # the step times still measured on the GPU (a checkpoint waits for it anyway)
    r = ts.result
    return {
        "step": ts.step,
        "nonfinite_in_row": ts.nonfinite_in_row,
        "lora": {name: p.detach() for name, p in ts.named_params.items()},
        "optimizer": ts.optimizer.state_dict(),
        "lr_scheduler": ts.lr_schedule.state_dict(),
        "scaler": ts.scaler.state_dict(),
        "rng": rng_state(ts.generator, ts.rng),
        "data_order": ts.order.state_dict(),
        "result": {"losses": list(r.losses), "objective_losses": list(r.objective_losses),
                   "nonfinite_steps": r.nonfinite_steps, "step_times": list(r.step_times)},
    }


def restore(ts, state: dict[str, Any]) -> None:
    """Puts a captured state back into a freshly prepared loop (same model, same optimizer kind)."""
    names = set(ts.named_params)
    if names != set(state["lora"]):
        missing, extra = sorted(names - set(state["lora"])), sorted(set(state["lora"]) - names)
        raise CheckpointError(f"the checkpoint's LoRA tensors do not match this model's adapters: "
                              f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]})")
    with torch.no_grad():
        for name, p in ts.named_params.items():
            saved = state["lora"][name]
            if saved.shape != p.shape:
                raise CheckpointError(f"LoRA tensor {name}: checkpoint shape {tuple(saved.shape)}, model {tuple(p.shape)}")
            p.copy_(saved)
    ts.optimizer.load_state_dict(state["optimizer"])
    ts.lr_schedule.load_state_dict(state["lr_scheduler"])
    ts.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], ts.generator, ts.rng)
    ts.order.load_state_dict(state["data_order"])
    ts.step = state["step"]
    ts.nonfinite_in_row = state["nonfinite_in_row"]
    ts.result.losses = list(state["result"]["losses"])
    ts.result.objective_losses = list(state["result"].get("objective_losses", []))
    ts.result.nonfinite_steps = state["result"]["nonfinite_steps"]
    ts.result.step_times = list(state["result"]["step_times"])
    ts.result.steps = len(ts.result.losses)


@dataclass
class Checkpointer:
    """What the training loop calls: `restore` once before the first step, `after_step` after each.

    directory: where this training's checkpoints live; every: steps between checkpoints (0 or
    None: only the last step); keep: how many to keep; config: the hashed config entries (stored,
    and compared on resume); resume_from: the checkpoint to continue from, or None."""

    directory: Path
    every: int | None
    keep: int
    config: dict[str, Any]
    resume_from: Path | None = None
    written: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def restore(self, ts, n_train: int) -> int:
        """Loads `resume_from` (if any) into the loop state; returns the step to start from."""
        if self.resume_from is None:
            return 0
        state = read_checkpoint(self.resume_from)
        diffs = config_differences(state["config"], self.config)
        if diffs:
            raise ConfigMismatch(self.resume_from, diffs)
        if state["n_train"] != n_train:
            raise CheckpointError(f"checkpoint {self.resume_from} was trained on {state['n_train']} images; "
                                  f"the training set now has {n_train}: the data changed, refusing to resume")
        restore(ts, state["train"])
        log.info("resumed from %s at step %d", self.resume_from, ts.step)
        return ts.step

    def after_step(self, ts, total_steps: int, n_train: int) -> Path | None:
        """Writes a checkpoint when one is due (every `every` steps, and after the last)."""
        due = ts.step >= total_steps or (bool(self.every) and ts.step % self.every == 0)
        if not due:
            return None
        state = {"config": self.config, "n_train": n_train, "total_steps": total_steps, "train": capture(ts)}
        try:
            path = write_checkpoint(self.directory, ts.step, state, self.keep)
        except OSError as err:
            # A full or failing disk: the last good checkpoint is intact; training goes on.
            msg = f"checkpoint at step {ts.step} could not be written to {self.directory}: {err}"
            log.error("%s (the previous checkpoint is kept; training goes on)", msg)
            self.failures.append(msg)
            return None
        self.written.append(path)
        log.debug("checkpoint written: %s", path)
        return path


class NoCheckpoints:
    """A loop that is not checkpointed (data-parallel runs, for now): starts at step 0, writes nothing."""

    failures: list[str] = []

    def restore(self, ts, n_train: int) -> int:
        return 0

    def after_step(self, ts, total_steps: int, n_train: int) -> None:
        return None
