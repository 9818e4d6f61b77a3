"""The frozen base model, loaded once per sweep process and lent to each variant in turn.

Hydra runs a sweep's jobs in one process; rebuilding the full-size SDXL for every variant
costs ~45 s (fp32 on the CPU, then cast and moved), more than a short variant's training.
`acquire(cfg, device)` hands out the cached base when one with the same identity is loaded
(model source, device, compute dtype, VAE dtype), else loads it; `release(components)` takes it
back and restores it to exactly the state it was lent in:

- adapters removed (`lora.remove_adapters`), never merged; compiled block wrappers dropped;
  gradient checkpointing off (and the input-grad hook transformers adds for PEFT models);
  channels-last weights back to contiguous; VAE slicing/tiling off; attention processors as
  they were; every module back in eval mode, frozen, on its device in its dtype.
- then it is *verified*: a fingerprint of every parameter and buffer (shape, dtype, device,
  and two integer checksums of its raw bits, so a single flipped bit or two swapped values
  show) plus the module tree (classes, train flags, hooks, checkpointing and compile flags)
  must equal the one taken when the base was loaded. If anything differs the base is dropped
  (a warning names what changed) and the next variant loads a fresh one: a variant never
  trains on a base that an earlier variant touched.

Variants whose preparation changes the base weights for good are lent the base for their
own use and it is dropped afterwards (the next variant reloads): `trainer.base_weights=fp8`
(quantized in place; peft would also give new adapters the fp8 dtype of their base layer),
`eval.fuse_lora=true` (the LoRA is added into the weights), and `model.keep_loaded=false`.

Cost of the check: one pass over the weights on their device (about 3 integer kernels per
tensor); for the full SDXL on a GPU a fraction of a second, logged per variant as
`time/teardown_s` with the rest of the release.

Also here: `enable_compile_caches()`, torch's on-disk compile caches under the project's
cache root, so a second process (a re-run of the study) reuses the compiled blocks.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from sdxl_ablate.config import BaseWeights, Config, ModelKind, cache_root
from sdxl_ablate.model.sdxl import SDXLComponents, build_sdxl_random, load_components
from sdxl_ablate.model.placement import place as place_module
from sdxl_ablate.model.precision import compute_dtype, unet_dtype, vae_dtype

log = logging.getLogger(__name__)

# The weights of model=sdxl_random are drawn from this seed (on the device they are built
# on), so the random base is the same in every process and for every variant.
RANDOM_MODEL_SEED = 0


@dataclass(frozen=True)
class BaseKey:
    """Everything that decides the loaded base's values and placement."""

    kind: str
    pretrained: str | None
    revision: str | None
    vae: str | None
    vae_fp16_safe: bool
    device: str
    dtype: str  # the frozen text encoders (trainer.precision)
    vae_dtype: str
    unet_dtype: str  # the frozen UNet: dtype, or fp32 with trainer.base_weights=fp32


def base_key(cfg: Config, device: torch.device) -> BaseKey:
    m = cfg.model
    dtype = compute_dtype(cfg)
    pretrained = m.kind == ModelKind.pretrained
    return BaseKey(m.kind.value, m.pretrained if pretrained else None, m.revision if pretrained else None,
                   m.vae if pretrained else None, m.vae_fp16_safe, str(_full_device(device)), str(dtype),
                   str(vae_dtype(cfg, dtype)), str(unet_dtype(cfg, dtype)))


def _full_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class _Entry:
    key: BaseKey
    components: SDXLComponents
    fingerprint: dict
    attn_processors: dict
    loaded_s: float
    uses: int = 0


@dataclass
class _Lease:
    entry: _Entry
    shared: bool  # False: the variant keeps (and spoils) it; dropped on release


@dataclass
class Stats:
    """What the cache did in this process (tests and the phase records read it)."""

    loads: int = 0
    reuses: int = 0
    dropped_changed: int = 0
    last_event: str = ""
    last_verify_s: float = 0.0
    differences: list[str] = field(default_factory=list)


# One base at a time: two full SDXL copies would not fit the 16 GiB budget beside a variant.
_CACHED: _Entry | None = None
_LEASES: dict[int, _Lease] = {}
stats = Stats()


def acquire(cfg: Config, device: torch.device | str) -> SDXLComponents:
    """The base for this variant, placed as the trainer wants it (frozen, eval mode, UNet and
    text encoders on `device` in the compute dtype, VAE in its own dtype)."""
    global _CACHED
    device = _full_device(device)
    if device.type == "cuda" and cfg.trainer.compile:
        enable_compile_caches()
    key = base_key(cfg, device)
    shared = shareable(cfg)
    entry = _CACHED if _CACHED is not None and _CACHED.key == key else None
    if entry is not None:
        stats.reuses += 1
        stats.last_event = "reused"
        log.debug("base model reused (%s, %s, loaded %d variants ago)", key.kind, key.dtype, entry.uses)
    else:
        if _CACHED is not None:
            log.debug("base model changed (%s -> %s): dropping the loaded one", _CACHED.key, key)
        drop()  # free the old base before the new one is loaded
        entry = _load(cfg, key, device)
        stats.loads += 1
        stats.last_event = "loaded"
    entry.uses += 1
    if shared:
        _CACHED = entry
    else:
        _CACHED = None  # this variant changes the base for good: it is its own copy now
        stats.last_event += ", lent for this variant only"
        log.info("base model lent for this variant only (%s): the next variant loads a fresh one", why_not_shared(cfg))
    # A fresh training noise schedule per variant: diffusers' schedulers keep tensors they move
    # to the device as state.
    c = entry.components
    c.noise_scheduler = type(c.noise_scheduler).from_config(c.noise_scheduler.config)
    _LEASES[id(c)] = _Lease(entry, shared)
    return c


def release(components: SDXLComponents | None) -> None:
    """Takes the base back after a variant (also after a failed one): restores and verifies it,
    or drops it if it was lent for good or cannot be restored exactly."""
    global _CACHED
    if components is None:
        return
    lease = _LEASES.pop(id(components), None)
    if lease is None:
        return  # not ours
    if not lease.shared:
        lease.entry.components = None  # type: ignore[assignment]
        stats.last_verify_s, stats.differences = 0.0, []
        _collect(components)
        return
    started = time.perf_counter()
    try:
        restore(lease.entry)
        differences = compare(lease.entry.fingerprint, fingerprint(lease.entry.components))
    except Exception as err:  # noqa: BLE001 - a base we cannot restore is dropped, never reused
        differences = [f"restoring failed: {type(err).__name__}: {err}"]
    stats.last_verify_s = time.perf_counter() - started
    stats.differences = differences
    if differences:
        stats.dropped_changed += 1
        log.warning("the variant left the base model changed (%d differences, e.g. %s); it is dropped and "
                    "the next variant loads a fresh one", len(differences), differences[:3])
        if _CACHED is lease.entry:
            drop()


def last_use() -> dict:
    """How the last variant got its base and what giving it back cost (for phases.json)."""
    return {"event": stats.last_event, "verify_s": round(stats.last_verify_s, 4), "loads": stats.loads,
            "reuses": stats.reuses, "changed": len(stats.differences)}


def drop() -> None:
    """Forgets the cached base (its memory goes back once no variant holds it)."""
    global _CACHED
    if _CACHED is not None:
        _CACHED.components = None  # type: ignore[assignment]
    _CACHED = None
    _collect(None)


def cached_key() -> BaseKey | None:
    return None if _CACHED is None else _CACHED.key


def shareable(cfg: Config) -> bool:
    return not why_not_shared(cfg)


def why_not_shared(cfg: Config) -> str:
    if not cfg.model.keep_loaded:
        return "model.keep_loaded=false"
    if cfg.trainer.base_weights == BaseWeights.fp8:
        return "trainer.base_weights=fp8 quantizes the base in place"
    if cfg.eval.enabled and cfg.eval.fuse_lora and cfg.trainer.save_lora:
        return "eval.fuse_lora=true adds the LoRA into the base weights"
    return ""


def _collect(components) -> None:
    del components
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# --- loading -------------------------------------------------------------------------------


def _load(cfg: Config, key: BaseKey, device: torch.device) -> _Entry:
    started = time.perf_counter()
    dtype = compute_dtype(cfg)
    vae = vae_dtype(cfg, dtype)
    if cfg.model.kind == ModelKind.sdxl_random:
        c = build_random_base(device, dtype, vae)
    else:
        c = load_components(cfg.model)
    place(c, device, dtype, vae, unet_dtype(cfg, dtype))
    entry = _Entry(key, c, fingerprint(c), dict(c.unet.attn_processors), time.perf_counter() - started)
    log.debug("base model loaded in %.1f s (%s on %s, %s)", entry.loaded_s, key.kind, key.device, key.dtype)
    return entry


def build_random_base(device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype) -> SDXLComponents:
    """The full-size random SDXL born on `device` in its final dtypes (no fp32 CPU copy), its
    weights drawn from RANDOM_MODEL_SEED on that device's generator: the same model in every
    process on this kind of device. The caller's random streams are left as they were."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(RANDOM_MODEL_SEED)
        return build_sdxl_random(device, dtype, vae_dtype=vae_dtype)


def place(c: SDXLComponents, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype,
          unet_dtype: torch.dtype | None = None) -> None:
    """The lent state: as train.setup.place_components places the modules, frozen, in eval mode."""
    place_module(c.unet, device, unet_dtype or dtype)
    for module in (c.text_encoder, c.text_encoder_2):
        place_module(module, device, dtype)
    place_module(c.vae, device, vae_dtype)
    for module in (c.unet, c.vae, c.text_encoder, c.text_encoder_2):
        module.eval().requires_grad_(False)


# --- restoring -----------------------------------------------------------------------------


def restore(entry: _Entry) -> None:
    """Undoes what a variant (training and evaluation) does to the base, without touching a
    weight's value: see the module docstring for the list."""
    from sdxl_ablate.model.lora import lora_modules, remove_adapters
    from sdxl_ablate.model.compile import uncompile_blocks

    c = entry.components
    uncompile_blocks(c.unet)
    if lora_modules(c):
        remove_adapters(c)
    # Checkpointing off, as diffusers' and transformers' disable calls do it (their method names
    # differ between versions; the flag they set does not).
    for part in (c.unet, c.text_encoder, c.text_encoder_2):
        for m in part.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                m.gradient_checkpointing = False
    for enc in (c.text_encoder, c.text_encoder_2):
        # The hook transformers adds to the input embeddings for PEFT + checkpointing.
        if getattr(enc, "_require_grads_hooks", None) or hasattr(enc, "_require_grads_hook"):
            enc.disable_input_require_grads()
    c.unet.to(memory_format=torch.contiguous_format)
    c.vae.disable_slicing()
    c.vae.disable_tiling()
    if dict(c.unet.attn_processors) != entry.attn_processors:  # e.g. attention slicing at evaluation
        c.unet.set_attn_processor(dict(entry.attn_processors))
    k = entry.key
    place(c, torch.device(k.device), _dtype(k.dtype), _dtype(k.vae_dtype), _dtype(k.unet_dtype))


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


# --- verifying -----------------------------------------------------------------------------

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 20  # elements per checksum pair: 8 MiB of int64 temporaries at a time
_WEIGHTS: dict[str, torch.Tensor] = {}


def _position_weights(n: int, device: torch.device) -> torch.Tensor:
    key = str(device)
    w = _WEIGHTS.get(key)
    if w is None:
        # Weights 1.._CHUNK by position: the weighted sum also changes when two values of a chunk swap
        # (it moves by (x_i - x_j)(w_i - w_j), nonzero and far below 2^64; int64 sums wrap around).
        w = _WEIGHTS[key] = torch.arange(1, _CHUNK + 1, device=device, dtype=torch.int64)
    return w[:n]


def tensor_checksum(t: torch.Tensor) -> torch.Tensor:
    """Two int64 checksums per chunk of the tensor's raw bits (plain and position-weighted sums
    of the bit patterns read as integers), on the tensor's device. Equal tensors, bit for bit,
    give equal checksums; a change of any value changes the plain sum (different bit pattern
    means a different integer)."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    ints = flat if not (flat.is_floating_point() or flat.is_complex()) else flat.view(_INT_OF_SIZE[flat.element_size()])
    sums = []
    for chunk in ints.split(_CHUNK):
        x = chunk.to(torch.int64)
        sums.append(torch.stack([x.sum(), (x * _position_weights(x.numel(), x.device)).sum()]))
    return torch.cat(sums) if sums else torch.zeros(0, dtype=torch.int64, device=t.device)


def fingerprint(c: SDXLComponents) -> dict:
    """{name: description} of every module and tensor of the base (see the module docstring)."""
    out: dict = {}
    pending: list[tuple[str, torch.Tensor]] = []
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(c, part)
        for name, m in module.named_modules():
            out[f"module {part}.{name}"] = (
                type(m).__qualname__, m.training, _hooks(m), getattr(m, "gradient_checkpointing", None),
                getattr(m, "_compiled_call_impl", None) is not None,
                getattr(m, "use_slicing", None), getattr(m, "use_tiling", None))
        tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        for name, t in tensors:
            key = f"tensor {part}.{name}"
            out[key] = (tuple(t.shape), str(t.dtype), str(t.device), tuple(t.stride()), t.requires_grad)
            pending.append((key, t))
    # The checksums are computed on each tensor's own device and fetched together (one sync).
    by_device: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, t in pending:
        by_device.setdefault(str(t.device), []).append((key, tensor_checksum(t)))
    for items in by_device.values():
        sizes = [s.numel() for _, s in items]
        values = torch.cat([s for _, s in items]).cpu().tolist() if items else []
        i = 0
        for (key, _), n in zip(items, sizes):
            out[key] = (*out[key], tuple(values[i:i + n]))
            i += n
    return out


# Hooks a library installs by itself at a module's first forward, the same in every process,
# that change no value: transformers 5 records hidden states through them.
_LAZY_HOOK_MODULES = ("transformers.utils.output_capturing",)


def _hooks(m: torch.nn.Module) -> tuple[str, ...]:
    hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values(),
             *m._backward_pre_hooks.values()]
    names = (f"{getattr(h, '__module__', '?')}.{getattr(h, '__qualname__', type(h).__qualname__)}" for h in hooks)
    return tuple(sorted(n for n in names if not n.startswith(_LAZY_HOOK_MODULES)))


def compare(before: dict, after: dict) -> list[str]:
    """What differs between two fingerprints, one line each."""
    lines = [f"{k}: missing now" for k in before.keys() - after.keys()]
    lines += [f"{k}: new" for k in after.keys() - before.keys()]
    for k in before.keys() & after.keys():
        if before[k] != after[k]:
            lines.append(f"{k}: {_short(before[k])} -> {_short(after[k])}")
    return sorted(lines)


def _short(value) -> str:
    text = str(value)
    return text if len(text) < 160 else text[:157] + "..."


# --- compile caches ------------------------------------------------------------------------


def enable_compile_caches() -> dict[str, str]:
    """torch's on-disk compile caches, under the project's cache root unless set already.

    What is reused when (trainer.compile, CUDA only):
    - within a process: dynamo keeps compiled code on the blocks' shared `forward` code
      objects, guarded on the module structure. A later variant whose blocks have the same
      structure (same LoRA targets and kind, same shapes and dtype) reuses them without
      compiling; a different structure (e.g. targets=all after attn, DoRA) compiles once and
      then keeps both.
    - across processes: Inductor's FX graph cache and AOTAutograd's cache (compiled forward +
      backward graphs, keyed by the graph and the inputs' metadata) and Triton's kernel cache
      live on disk here, so a second run of the study re-traces the blocks (dynamo itself is
      not cached) but skips Inductor's code generation and the kernel compilation.
    """
    root = cache_root() / "compile"
    dirs = {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}
    for name, path in dirs.items():
        os.environ.setdefault(name, path)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return {name: os.environ[name] for name in dirs}
