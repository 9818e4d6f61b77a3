"""Preflight: every resource a sweep needs, resolved and checked once, before anything trains.

A study that trains six variants for an hour and then cannot load its CLIP model, or whose
tracking store is read-only, has wasted the hour. So before the first variant starts, the
distinct resources of all variants (base model, VAE override, dataset, CLIP evaluation model,
device and its precision, tracking store and artifact root) are checked here, cheaply: a hub id must be in the
local hub cache or the hub must be reachable (and then the id must exist); a local path must
exist with the expected layout; the store must accept a query and the artifact root a file.
Nothing is downloaded or loaded. Every problem is reported at once, each naming the config key,
its value and what works offline instead.
"""

from __future__ import annotations

import functools
import os
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional
from urllib.parse import urlparse

from sdxl_ablate.config import Config, DataSource, ModelKind, Precision

OFFLINE_MODEL = "offline, use model=tiny or model=sdxl_random, or a local diffusers directory as model.pretrained=DIR"
OFFLINE_DATA = "offline, use data=sample, or data=folder data.path=DIR"
OFFLINE_CLIP = ("offline, use eval=tiny (a tiny random CLIP built in code) or eval=off, or give a local "
                "open_clip checkpoint file as eval.clip_pretrained=FILE")
# Seconds one hub request may take: a reachable hub answers a HEAD or an info query in well under.
HUB_TIMEOUT_S = 10.0


class PreflightError(RuntimeError):
    """One or more resources a sweep needs are missing; nothing has been trained."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("preflight failed, nothing was trained:\n  - " + "\n  - ".join(problems))


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> Optional[str]:
    """Why the hub cannot be reached, or None when it answers. One short request per process,
    through huggingface_hub's own HTTP session (no retries: offline, a retry only adds minutes)."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT_S)  # any HTTP answer means it is there
        return None
    except Exception as e:  # noqa: BLE001 - no connection, DNS failure, proxy or TLS error: all unreachable
        return (f"the hub at {constants.ENDPOINT} cannot be reached ({type(e).__name__}: {e}; "
                "set HF_HUB_OFFLINE=1 to skip the hub)")


def _hub_problem(key: str, value: str, kind: str, in_cache: Callable[[], bool],
                 exists_online: Callable[[], None], offline_alternative: str) -> Optional[str]:
    """None when `value` (a hub id) is cached or reachable and exists; else the problem."""
    if in_cache():
        return None
    why = hub_unreachable()
    if why:
        return f"{key}={value!r}: this hub {kind} is not in the local hub cache and {why}; {offline_alternative}"
    try:
        exists_online()
    except Exception as e:  # noqa: BLE001 - any answer but success means it cannot be used
        return f"{key}={value!r}: the hub has no such {kind} or refuses it ({type(e).__name__}: {e}); {offline_alternative}"
    return None


def _cached_file(repo: str, filename: str, repo_type: str = "model", revision: Optional[str] = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename, revision=revision, repo_type=repo_type), str)


def model_problems(cfg: Config) -> list[str]:
    m = cfg.model
    if m.kind != ModelKind.pretrained:
        return []
    from huggingface_hub import HfApi

    from sdxl_ablate.model.sdxl import _ACCEPTED_MODEL, _ACCEPTED_VAE, _SUBFOLDERS, ModelLoadError, _locate

    out = []
    sources = [("model.pretrained", m.pretrained, tuple(s for s in _SUBFOLDERS if not (s == "vae" and m.vae)),
                _ACCEPTED_MODEL, "model_index.json", m.revision)]
    if m.vae:
        sources.append(("model.vae", m.vae, ("config.json",), _ACCEPTED_VAE, "config.json", None))
    for key, value, required, accepted, marker, revision in sources:
        try:
            source = _locate(key, value, required, accepted)
        except ModelLoadError as e:
            out.append(str(e))
            continue
        if source.local:
            continue
        problem = _hub_problem(key, value, "model", lambda: _cached_file(value, marker, revision=revision),
                               lambda: HfApi().model_info(value, revision=revision, timeout=HUB_TIMEOUT_S), OFFLINE_MODEL)
        if problem:
            out.append(problem)
    return out


def data_problems(cfg: Config) -> list[str]:
    d = cfg.data
    if d.source == DataSource.sample:
        return []
    from sdxl_ablate.data.datasets import DataError, check_folder

    if d.source == DataSource.folder:
        try:
            check_folder(Path(d.path or ""))
        except DataError as e:
            return [str(e)]
        return []
    from huggingface_hub import HfApi

    def in_cache() -> bool:
        # `datasets` keeps a hub dataset in the hub cache (dataset card or data files).
        from huggingface_hub import scan_cache_dir

        try:
            return any(r.repo_id == d.name and r.repo_type == "dataset" for r in scan_cache_dir().repos)
        except Exception:  # noqa: BLE001 - no cache directory yet
            return False

    problem = _hub_problem("data.name", d.name, "dataset", in_cache,
                           lambda: HfApi().dataset_info(d.name, timeout=HUB_TIMEOUT_S), OFFLINE_DATA)
    return [problem] if problem else []


def clip_problems(cfg: Config) -> list[str]:
    ev = cfg.eval
    if not ev.enabled or ev.clip_model == "tiny":
        return []
    import open_clip
    from huggingface_hub import HfApi

    key = f"eval.clip_model={ev.clip_model!r} eval.clip_pretrained"
    if ev.clip_model not in open_clip.list_models():
        return [f"eval.clip_model={ev.clip_model!r}: not an open_clip model (e.g. ViT-L-14, ViT-B-32); {OFFLINE_CLIP}"]
    if Path(ev.clip_pretrained).expanduser().is_file():
        return []
    pretrained = open_clip.get_pretrained_cfg(ev.clip_model, ev.clip_pretrained)
    if not pretrained:
        tags = open_clip.list_pretrained_tags_by_model(ev.clip_model)
        return [f"{key}={ev.clip_pretrained!r}: neither a file nor an open_clip tag of this model "
                f"(tags: {', '.join(tags) or 'none'}); {OFFLINE_CLIP}"]
    repo = pretrained.get("hf_hub", "").strip("/")
    if not repo:  # a URL download: only a reachable network can serve it
        if not hub_unreachable():
            return []
        return [f"{key}={ev.clip_pretrained!r}: downloaded from {pretrained.get('url')!r}, which cannot be reached; "
                f"{OFFLINE_CLIP}"]
    problem = _hub_problem(key, ev.clip_pretrained, "CLIP checkpoint",
                           lambda: any(_cached_file(repo, f) for f in ("open_clip_model.safetensors",
                                                                        "open_clip_pytorch_model.bin")),
                           lambda: HfApi().model_info(repo, timeout=HUB_TIMEOUT_S), OFFLINE_CLIP)
    return [problem] if problem else []


def device_problems(cfg: Config) -> list[str]:
    import torch

    dev = cfg.device
    if not dev.startswith("cuda"):
        return []
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return [f"device={dev!r}: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                "use device=cpu, or device=auto to take a GPU only where there is one"]
    if ":" in dev and int(dev.split(":")[1]) >= n:
        return [f"device={dev!r}: only {n} GPU(s) are visible (cuda:0..cuda:{n - 1})"]
    return []


def precision_problems(cfg: Config) -> list[str]:
    """An explicit trainer.precision=bf16 on a GPU without native bf16 (a T4: compute capability
    7.5): emulated bf16 would run, slowly and not as the write-ups trained. Every GPU the job may
    claim is checked (the one of cuda:N, else all visible); `auto` needs no check."""
    if cfg.trainer.precision != Precision.bf16:
        return []
    from sdxl_ablate.model.precision import bf16_problem, cards_for

    return [p for p in (bf16_problem(card) for card in cards_for(cfg.device)) if p]


def tracking_problems(cfg: Config) -> list[str]:
    from sdxl_ablate.track.tracker import connect, resolve_uri

    uri = resolve_uri(cfg.tracking)
    out = []
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            return [f"tracking.uri={uri!r}: the folder {str(db.parent)!r} does not exist"]
        if not os.access(db if db.exists() else db.parent, os.W_OK):
            return [f"tracking.uri={uri!r}: {str(db if db.exists() else db.parent)!r} is not writable"]
    try:
        connect(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure means runs could not be recorded
        out.append(f"tracking.uri={uri!r}: the MLflow tracking store does not answer ({type(e).__name__}: {e})")
    root = cfg.tracking.artifact_root
    local_root = _local_path(root) if root else (None if uri.startswith(("http://", "https://")) else Path.cwd() / "mlartifacts")
    if local_root is not None:
        try:
            local_root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=local_root, prefix=f".preflight-{uuid.uuid4().hex}"):
                pass
        except OSError as e:
            out.append(f"tracking.artifact_root={str(root or local_root)!r}: cannot write there ({e})")
    return out


def _local_path(root: str) -> Optional[Path]:
    """A local folder for a plain path or file:// URI; None for a remote URI (s3://, mlflow-artifacts:/)."""
    parsed = urlparse(root)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # not a Windows drive letter
        return None
    return Path(root).expanduser()


# Each check with the fields it depends on: a sweep's variants mostly share their resources,
# and each distinct resource is checked once.
CHECKS: tuple[tuple[Callable[[Config], list[str]], Callable[[Config], tuple]], ...] = (
    (device_problems, lambda c: (c.device,)),
    (precision_problems, lambda c: (c.device, c.trainer.precision)),
    (tracking_problems, lambda c: (c.tracking.uri, c.tracking.artifact_root)),
    (model_problems, lambda c: (c.model.kind, c.model.pretrained, c.model.revision, c.model.vae)),
    (data_problems, lambda c: (c.data.source, c.data.name, c.data.path)),
    (clip_problems, lambda c: (c.eval.enabled, c.eval.clip_model, c.eval.clip_pretrained)),
)


def problems(cfgs: Iterable[Config]) -> list[str]:
    """Every problem of every check over the distinct resources of `cfgs`, each reported once."""
    found: list[str] = []
    seen: set[tuple] = set()
    for cfg in cfgs:
        for check, key in CHECKS:
            if (check.__name__, *key(cfg)) in seen:
                continue
            seen.add((check.__name__, *key(cfg)))
            found += [p for p in check(cfg) if p not in found]
    return found


def check(cfgs: Iterable[Config], gpu_launcher: Optional[str] = None) -> None:
    """Raises PreflightError listing every missing resource; returns quietly when all are there.
    `gpu_launcher`: the sweep's launcher preset when it gives every job a GPU of its own."""
    found = problems(cfgs)
    if gpu_launcher:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            found.insert(0, f"hydra/launcher={gpu_launcher} needs a CUDA GPU, but none is visible "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); drop the preset "
                            "to run the sweep here, on the CPU")
    if found:
        raise PreflightError(found)
