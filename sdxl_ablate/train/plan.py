"""`python -m sdxl_ablate.plan [overrides]`: the dry run. Does this variant fit, and what will it cost?

Composes the config exactly like `python -m sdxl_ablate` (same overrides, same checks), builds
the chosen architecture on the meta device (shapes, no weights: seconds on a CPU even for the
full SDXL), attaches the variant's adapters, and prints JSON: parameter counts, the arithmetic
of one training step, and the predicted peak GPU memory against the budget.

How the memory prediction works
-------------------------------
One training step is *run* on meta tensors, through the trainer's own code
(`train.setup`'s placement and switches, `precompute.encode_images/encode_prompts`,
`train.objective.diffusion_loss`, `backward`), while two interpreters watch it:

- an autocast stand-in (`_CudaAutocast`, a TorchFunctionMode) casts operands the way CUDA
  autocast does (matmuls and convolutions in the compute dtype; normalisations, softmax,
  interpolation and losses in fp32), since meta tensors have no autocast of their own; and
  attention runs as flash / memory-efficient SDPA does on a GPU (output + log-sum-exp saved,
  no L x L matrix);
- an allocation tracker (`_Watcher`, a TorchDispatchMode) adds up every tensor storage the
  step creates and frees (weak references tell when one dies), and records the peak; it also
  counts every op's FLOPs with torch's FLOP formulas.

Gradient checkpointing is real here too (the trainer's own checkpointing function; the
recomputation happens in the simulated backward), so the simulated peak reacts to every switch
as the GPU does. The predicted peak allocated is

    static (weights as stored, LoRA weights fp32, optimizer state by optimizer kind)
    + the simulated peak of the step (inputs, activations, gradients, recomputation)

and the predicted peak reserved adds what the CUDA caching allocator keeps beyond the live
tensors (`predict_reserved_gib`: the step's transient memory times a fragmentation factor,
plus a constant for workspaces), three coefficients fitted to the benchmark's measurements and
checked against every benchmark configuration (`sdxl_ablate.bench` records both numbers).
The same run also counts the step's FLOPs (torch's FLOP counter; attention by its formula).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import weakref
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from sdxl_ablate.config import CONF_DIR, BaseWeights, Config, ConfigError, ModelKind, Optimizer, register_configs, to_typed
from sdxl_ablate.config.identity import adapter

GIB = 1024**3

# What the CUDA caching allocator reserves beyond the tensors alive at the simulated peak:
#   reserved = static + step_peak * (RESERVED_STEP_SCALE [+ RESERVED_FP8_EXTRA]) + RESERVED_OVERHEAD_GIB
# The step's transient memory fragments (2 MiB pages, CUDA graphs' private pools, and with fp8
# storage the weight-sized dequantized copies of every layer); the constant is cuBLAS/cuDNN
# workspaces and segment granularity. Fitted (least squares on the relative error) to the 28
# configurations of results/bench_1024px.json and results/bench_512px.json: NVIDIA H100 80GB,
# torch 2.11, expandable segments, measured 2026-11-22 (python -m sdxl_ablate.bench); largest
# error there 7.7%.
RESERVED_STEP_SCALE = 1.216
RESERVED_FP8_EXTRA = 0.258
RESERVED_OVERHEAD_GIB = 0.453


def predict_reserved_gib(static_gib: float, step_peak_gib: float, fp8: bool) -> float:
    """The calibrated allocator model above."""
    scale = RESERVED_STEP_SCALE + (RESERVED_FP8_EXTRA if fp8 else 0.0)
    return static_gib + step_peak_gib * scale + RESERVED_OVERHEAD_GIB


# Optimizer state bytes per trainable parameter (the fp32 LoRA weights and gradients are
# counted by the simulation itself): AdamW 2 x fp32 moments; bitsandbytes' 8-bit AdamW two
# uint8 moments plus block-wise fp32 scales (1 per 256); Prodigy 4 x fp32 (two moments, the
# initial weights, the s estimate).
OPTIMIZER_STATE_BYTES = {Optimizer.adamw: 8.0, Optimizer.adamw8bit: 2.0 + 8.0 / 256, Optimizer.prodigy: 16.0}


# --- composing the config, like python -m sdxl_ablate --------------------------------------


def compose(overrides: Sequence[str]) -> Config:
    """The typed config for these overrides, from conf/ (raises ConfigError when invalid)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        dcfg = hydra_compose(config_name="config", overrides=list(overrides))
    return to_typed(dcfg)


# --- the model on the meta device -----------------------------------------------------------


def architecture(cfg: Config) -> str:
    """tiny -> the tiny architecture; pretrained and sdxl_random -> the full-size SDXL base."""
    return "tiny" if cfg.model.kind == ModelKind.tiny else "sdxl"


def build_meta(cfg: Config, dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    """The variant's components as shapes only (meta device), with its adapters attached."""
    from sdxl_ablate.model.lora import add_adapters
    from sdxl_ablate.model.sdxl import build_components

    # The variant's own architecture, frozen, in no memory; the stand-in tokenizers give the
    # text encoders their fixed 77-token input without the vocabulary files.
    c = SimpleNamespace(**vars(build_components(architecture(cfg), "meta", dtype)))
    c.tokenizer = c.tokenizer_2 = _Tokenizer()
    c.base_params = {n: _numel(getattr(c, n)) for n in ("unet", "text_encoder", "text_encoder_2", "vae")}
    c.trainable = add_adapters(c, cfg.lora)
    return c


class _Tokenizer:
    """Stands in for CLIP's tokenizer: ids of the right shape (the values do not matter here)."""

    def __call__(self, prompts, **kwargs):
        return SimpleNamespace(input_ids=torch.zeros(len(prompts), 77, dtype=torch.long))


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- the simulated step ---------------------------------------------------------------------


class _Watcher(TorchDispatchMode):
    """Adds up the bytes of every storage created while active (weak references say when one
    is freed; tensors that existed before, the weights, are not counted here), and the FLOPs
    of every op, by torch's FLOP formulas (those of torch.utils.flop_counter)."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.formulas = flop_registry
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.flops = 0
        self.recompute_flops = 0
        self.recomputing = 0  # > 0 while a checkpointed block is recomputed in the backward

    def add_flops(self, n: int) -> None:
        self.flops += n
        if self.recomputing:
            self.recompute_flops += n

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.add_flops(formula(*args, **kwargs, out_val=out))
        # Views and in-place results share an input's storage: nothing new was allocated.
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in inputs:
                    # The CUDA caching allocator hands out multiples of 512 bytes.
                    n = -(-storage.nbytes() // 512) * 512
                    self.live[key] = n
                    self.current += n
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


_LOWER = {F.linear, F.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
          torch.baddbmm, torch.addmm, torch.mm, torch.einsum}
_FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.mse_loss,
         F.interpolate, torch.exp, torch.Tensor.exp}


class _CudaAutocast(TorchFunctionMode):
    """CUDA autocast's casting rules for the ops SDXL uses, on meta tensors; and attention as
    the flash / memory-efficient kernels store it. `dtype=None`: no casting (fp32 training)."""

    def __init__(self, dtype: torch.dtype | None, watcher: _Watcher):
        super().__init__()
        self.dtype = dtype
        self.watcher = watcher

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (self._cast(x, self.dtype) if self.dtype else x for x in args[:3])
            return _MeasuredAttention.apply(q, k, v, self)
        if self.dtype is not None and not _autocast_off():
            if func in _LOWER:
                args, kwargs = tree_map(lambda x: self._cast(x, self.dtype), (args, kwargs))
            elif func in _FP32:
                args, kwargs = tree_map(lambda x: self._cast(x, torch.float32), (args, kwargs))
        return func(*args, **kwargs)

    @staticmethod
    def _cast(x, dtype):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64 and x.dtype != dtype:
            return x.to(dtype)
        return x


class _Recomputation:
    """Wraps the checkpointing function: the module call re-enters the autocast stand-in
    (the backward's recomputation runs outside it, where the GPU's checkpoint re-enters real
    autocast), and the FLOPs of recomputation (calls made during the backward) are told apart."""

    def __init__(self, mode: "_CudaAutocast"):
        self.mode = mode

    def wrap(self, checkpoint_func):
        def wrapped(module, *args, **kwargs):
            fn = module.__call__ if isinstance(module, torch.nn.Module) else module
            return checkpoint_func(self._in_mode(fn), *args, **kwargs)
        return wrapped

    def _in_mode(self, fn):
        def call(*args, **kwargs):
            if torch._C._current_graph_task_id() == -1:  # the forward pass
                return fn(*args, **kwargs)
            self.mode.watcher.recomputing += 1
            try:
                with self.mode:
                    return fn(*args, **kwargs)
            finally:
                self.mode.watcher.recomputing -= 1
        return call


_AUTOCAST_OFF = [0]


@contextlib.contextmanager
def _no_autocast():
    """What `torch.autocast(..., enabled=False)` does on the GPU (the VAE encodes in its own dtype)."""
    _AUTOCAST_OFF[0] += 1
    try:
        yield
    finally:
        _AUTOCAST_OFF[0] -= 1


def _autocast_off() -> bool:
    return _AUTOCAST_OFF[0] > 0


class _MeasuredAttention(torch.autograd.Function):
    """SDPA as the GPU's flash / memory-efficient kernels keep it: the output and a fp32
    log-sum-exp per query saved for the backward, which recomputes the scores."""

    @staticmethod
    def forward(ctx, q, k, v, mode):
        from torch.utils.flop_counter import sdpa_flop_count

        mode.watcher.add_flops(sdpa_flop_count(q.shape, k.shape, v.shape))
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mode = mode
        return out

    @staticmethod
    def backward(ctx, grad):
        from torch.utils.flop_counter import sdpa_backward_flop_count

        q, k, v, out, lse = ctx.saved_tensors
        ctx.mode.watcher.add_flops(sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape))
        accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # the fp32 dq accumulator
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del accum
        return dq, dk, dv, None


@dataclass
class StepSimulation:
    batch_size: int
    resolution: int
    static_bytes: int  # resident for the whole run: weights, LoRA weights, optimizer state
    weights_bytes: int  # of which: the frozen weights on the GPU
    lora_bytes: int  # of which: LoRA weights (fp32) and optimizer state
    step_peak_bytes: int  # the simulated step's own peak: inputs, activations, gradients
    flops: int  # executed by one optimizer step (recomputation included)
    model_flops: int  # forward + backward without recomputation
    params: dict  # frozen parameters per component
    trainable: dict  # trainable parameters: unet, text_encoders, total
    fp8: bool = False  # base weights stored in fp8

    @property
    def peak_allocated_gib(self) -> float:
        return (self.static_bytes + self.step_peak_bytes) / GIB

    @property
    def peak_reserved_gib(self) -> float:
        return predict_reserved_gib(self.static_bytes / GIB, self.step_peak_bytes / GIB, self.fp8)


def simulate_step(cfg: Config, batch_size: int | None = None) -> StepSimulation:
    """One optimizer step of `cfg` on the meta device (see the module docstring)."""
    from sdxl_ablate.model.precision import compute_dtype

    if "auto" in (cfg.trainer.precision.value, cfg.trainer.gradient_checkpointing):
        cfg, _ = for_the_card(cfg)  # a composed config, as `python -m sdxl_ablate.plan` gets it
    batch = batch_size or cfg.trainer.batch_size
    r = _run_step(cfg, batch, compute_dtype(cfg))
    c = r["components"]
    te = sum(p.numel() for n in ("text_encoder", "text_encoder_2") for p in getattr(c, n).parameters()
             if p.requires_grad)
    total = sum(p.numel() for p in c.trainable)
    return StepSimulation(
        batch_size=batch, resolution=cfg.data.resolution,
        static_bytes=r["static"], weights_bytes=r["weights"], lora_bytes=r["lora"],
        step_peak_bytes=r["peak"], flops=r["flops"], model_flops=r["model_flops"],
        params=c.base_params, trainable={"unet": total - te, "text_encoders": te, "total": total},
        fp8=cfg.trainer.base_weights == BaseWeights.fp8,
    )


def _run_step(cfg: Config, batch: int, dtype: torch.dtype) -> dict:
    from sdxl_ablate.data.precompute import encode_images, encode_prompts
    from sdxl_ablate.train.objective import diffusion_loss
    from sdxl_ablate.train.auto import checkpointing_on
    from sdxl_ablate.train.setup import configure, place_components

    t, lo = cfg.trainer, cfg.lora
    res = cfg.data.resolution
    c = build_meta(cfg, dtype)
    # The trainer's own setup, less what only a real device has (compile, channels_last).
    place_components(c, cfg, torch.device("meta"))
    configure(c, cfg)
    watcher = _Watcher()
    autocast = _CudaAutocast(dtype if dtype != torch.float32 else None, watcher)
    recompute = _Recomputation(autocast)
    if checkpointing_on(cfg, torch.device("cuda")):
        # The backward's recomputation runs outside the autocast stand-in (the GPU's real
        # checkpoint re-enters autocast itself): make each checkpointed call re-enter it.
        for m in (*c.unet.modules(), *c.text_encoder.modules(), *c.text_encoder_2.modules()):
            if callable(getattr(m, "_gradient_checkpointing_func", None)):
                m._gradient_checkpointing_func = recompute.wrap(m._gradient_checkpointing_func)

    # What stays on the GPU while training: the UNet; the VAE and the text encoders only where
    # they run at every step (no cache; text encoders when they train).
    on_gpu = [c.unet]
    if not t.cache_latents:
        on_gpu += [c.vae, c.text_encoder, c.text_encoder_2]
    elif lo.text_encoder:
        on_gpu += [c.text_encoder, c.text_encoder_2]
    weights = sum(_bytes(m) for m in on_gpu) - sum(p.numel() * 4 for p in c.trainable)
    n_trainable = sum(p.numel() for p in c.trainable)
    lora = n_trainable * 4 + int(n_trainable * OPTIMIZER_STATE_BYTES[t.optimizer])

    meta = torch.device("meta")
    latent = res // 8
    with autocast, watcher:
        if t.cache_latents:
            mean = torch.empty(batch, 4, latent, latent, device=meta)
            std = torch.empty(batch, 4, latent, latent, device=meta)
        else:
            pixels = torch.empty(batch, 3, res, res, device=meta)
            with _no_autocast():
                mean, std = encode_images(c.vae, pixels)
        latents = (mean + std * torch.randn(mean.shape, device=meta)).to(dtype)
        del mean, std
        if t.cache_latents and not lo.text_encoder:
            seq = c.unet.config.cross_attention_dim
            embeds = torch.empty(batch, 77, seq, device=meta, dtype=dtype)
            pooled = torch.empty(batch, c.text_encoder_2.config.projection_dim, device=meta, dtype=dtype)
        else:
            with torch.set_grad_enabled(lo.text_encoder):
                embeds, pooled = encode_prompts(c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2,
                                                [""] * batch)
        time_ids = torch.empty(batch, 6, device=meta, dtype=dtype)
        loss = diffusion_loss(c.unet, c.noise_scheduler, latents, embeds, pooled, time_ids, cfg, None)
        del latents, embeds, pooled, time_ids
        loss.backward()
        del loss
    return {"static": weights + lora, "weights": weights, "lora": lora, "peak": watcher.peak,
            "flops": watcher.flops, "model_flops": watcher.flops - watcher.recompute_flops, "components": c}


def predicted_fit(cfg: Config, device: torch.device) -> dict[str, float]:
    """The dry run's prediction for a variant about to train on `device`, as metrics: its peak
    reserved GPU memory and the headroom left under the budget (`memory.budget()`: the card's total
    less what it holds outside the allocator, the same rule as the memory guard's cap). Empty where
    the plan cannot predict: the allocator model is fitted to full-size SDXL on CUDA, so the tiny
    model and a CPU run get no number rather than a made-up one. The simulation takes 5 to 20 s of
    CPU for full-size SDXL (measured on a busy 2-core machine), small beside loading and training it."""
    if device.type != "cuda" or architecture(cfg) != "sdxl":
        return {}
    reserved = simulate_step(cfg).peak_reserved_gib
    return {"plan/predicted_peak_gib": reserved, "plan/predicted_headroom_gib": cfg.memory.budget() - reserved}


def resolve_checkpointing(cfg: Config, device: torch.device, predict=None):
    """`trainer.gradient_checkpointing=auto` decided for `device` (train/auto.py says the rule):
    -> (`cfg` with the switch set to what runs, the choice). `predict(cfg) -> peak reserved GiB`
    defaults to this dry run; a prediction that fails is named in the choice and means on."""
    from dataclasses import replace

    from sdxl_ablate.train.auto import AUTO, decide, predictable

    if cfg.trainer.gradient_checkpointing != AUTO or not predictable(cfg, device):
        choice = decide(cfg, device)
    else:
        without = replace(cfg, trainer=replace(cfg.trainer, gradient_checkpointing=False))
        predict = predict or (lambda c: simulate_step(c).peak_reserved_gib)
        try:
            choice = decide(cfg, device, predict(without))
        except Exception as err:  # noqa: BLE001 - the prediction is advisory; on is the safe side
            choice = decide(cfg, device, None, f"{type(err).__name__}: {err}")
    return replace(cfg, trainer=replace(cfg.trainer, gradient_checkpointing=choice.enabled)), choice


def for_the_card(cfg: Config):
    """The dry run predicts a CUDA run on the card of `cfg.memory`: `auto` settings resolved as
    they would be there (precision by the profile's `bf16_native`; none: a bf16 GPU assumed;
    checkpointing by this prediction). -> (resolved cfg, {key: how it was resolved})."""
    from dataclasses import replace

    from sdxl_ablate.config import Precision

    notes = {}
    if cfg.trainer.precision == Precision.auto:
        native = cfg.memory.bf16_native
        resolved = Precision.fp16 if native is False else Precision.bf16
        card = cfg.memory.card or "no card profile"
        why = ("no native bf16" if native is False else "bf16 native" if native else "a bf16-native GPU assumed")
        notes["precision"] = f"auto -> {resolved.value} ({card}: {why})"
        cfg = replace(cfg, trainer=replace(cfg.trainer, precision=resolved))
    cfg, choice = resolve_checkpointing(cfg, torch.device("cuda"))
    if choice.requested == "auto":
        notes["gradient_checkpointing"] = f"auto -> {str(choice.enabled).lower()} ({choice.reason})"
    return cfg, notes


# --- the report -----------------------------------------------------------------------------


def plan(cfg: Config) -> dict:
    """The dry run's report for a composed config (JSON-ready)."""
    cfg, resolved = for_the_card(cfg)
    sim = simulate_step(cfg)
    t, m = cfg.trainer, cfg.memory
    reserved = sim.peak_reserved_gib
    budget = m.budget()
    return {
        "model": cfg.model.kind.value,
        "architecture": "sdxl-base (full size)" if architecture(cfg) == "sdxl" else "tiny",
        "variant": adapter(cfg),
        "params": sim.params,
        "trainable_params": sim.trainable,
        "step": {
            "resolution": cfg.data.resolution, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
            "precision": t.precision.value, "base_weights": t.base_weights.value,
            "gradient_checkpointing": t.gradient_checkpointing, "cache_latents": t.cache_latents,
            "optimizer": t.optimizer.value,
            "tflop_per_step": round(sim.flops * t.grad_accum / 1e12, 3),
            "model_tflop_per_image": round(sim.model_flops / 1e12 / sim.batch_size, 3),
        },
        "memory": {
            "weights_gib": round(sim.weights_bytes / GIB, 3),
            "lora_and_optimizer_gib": round(sim.lora_bytes / GIB, 3),
            "step_peak_gib": round(sim.step_peak_bytes / GIB, 3),
            "predicted_peak_allocated_gib": round(sim.peak_allocated_gib, 3),
            "predicted_peak_reserved_gib": round(reserved, 3),
            # The card's side: what it would hold at the peak (reserved + what the process holds
            # outside the allocator) against its total; the budget is the allocator's share.
            "card": m.card,
            "card_total_gib": None if m.card_total_mib is None else round(m.card_total_mib / 1024, 3),
            "overhead_gib": round(m.overhead_gib(), 3),
            "predicted_card_peak_gib": round(reserved + m.overhead_gib(), 3),
            "budget_gib": round(budget, 3),
            "fits": bool(reserved <= budget),
        },
        "resolved": resolved,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdxl_ablate.plan",
        description="Dry run: parameter counts, FLOPs and predicted peak GPU memory of a variant, "
                    "from the same Hydra overrides as `python -m sdxl_ablate`.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=sdxl_random lora.targets=all")
    args = parser.parse_args(argv)
    try:
        cfg = compose(args.overrides)
    except ConfigError as err:
        print(f"sdxl_ablate.plan: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra's own errors: unknown group option, wrong type or enum value
        if type(err).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        cause = f"\n  {err.__cause__}" if err.__cause__ else ""
        print(f"sdxl_ablate.plan: invalid configuration: {err}{cause}", file=sys.stderr)
        return 2
    print(json.dumps(plan(cfg), indent=2))
    return 0
