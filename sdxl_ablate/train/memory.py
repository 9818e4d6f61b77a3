"""The memory guard: cap the process at the budget, measure each variant's peak cleanly.

On CUDA the caching allocator is capped at the budget, `memory.budget()`: for a card profile
(conf/memory/<card>.yaml) the card's reported total less what a process holds there outside
the allocator (CUDA context, library kernels and workspaces: `memory.overhead_mib`). So a
variant that would not fit a T4 raises OutOfMemoryError here too, even on an 80 GB GPU, and the
peak the card itself would see, reserved + overhead, is logged as `memory/peak_card_gib`. Peak
allocated and peak reserved are reset at the start of every variant, because Hydra runs a
sweep's jobs in one process and the counters (and the cache) would otherwise carry over.
On CPU there is no allocator to cap: the peak resident set size of the process is
recorded instead, under its own metric name, after giving freed heap back to the kernel and
resetting its high-water mark. Each variant has two phases, measured apart: setup and input
caching (`memory/precompute_peak_*`), then training (`memory/peak_*`), so a warm or cold
latent cache does not change the training number; `memory/headroom_gib` is the budget minus
the larger of the two.
"""

from __future__ import annotations

import gc
import os
import resource
from dataclasses import dataclass

import torch

GIB = 1024**3


def is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def configure_allocator(expandable_segments: bool) -> None:
    """Must run before the first CUDA allocation; later calls are harmless no-ops."""
    if expandable_segments and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # Segments that grow in place instead of new fixed blocks: less fragmentation, so
        # reserved stays close to allocated (what a 16 GB card can actually hold).
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


@dataclass
class MemoryGuard:
    budget_gib: float  # what the allocator may reserve
    device: torch.device
    enforce: bool = True
    # What the emulated card holds outside the allocator (None: no card profile, no card-side peak).
    overhead_gib: float | None = None

    @classmethod
    def for_config(cls, memory, device: torch.device) -> "MemoryGuard":
        """The guard of a `MemoryConfig`: its budget rule and, for a card profile, its overhead."""
        overhead = memory.overhead_gib() if memory.card_total_mib is not None else None
        return cls(memory.budget(), device, memory.enforce, overhead)

    def __post_init__(self) -> None:
        # torch.device("cuda") names no GPU; the per-process cap needs the index.
        self.device = torch.device(self.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def start(self) -> None:
        """Caps the process at the budget and starts the first measurement phase."""
        if self.cuda and self.enforce:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.budget_gib * GIB / total), self.device)
        self.reset_peak()

    def reset_peak(self) -> None:
        """Starts a measurement phase: first gives back what is no longer used (earlier variants'
        or phases' cached blocks and freed heap), so the next peak counts live memory plus this
        phase, whatever ran before it in the process."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            # cuBLAS keeps a workspace per (handle, stream) for the life of the process; each
            # variant's training stream would add one more. Freed here, remade on first use.
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:
                clear_workspaces()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            trim_heap()
            reset_peak_rss()

    def peak(self, prefix: str = "memory/peak") -> dict[str, float]:
        """Peak memory since the phase began, in GiB, under names that say what was measured."""
        if self.cuda:
            reserved = torch.cuda.max_memory_reserved(self.device) / GIB
            out = {f"{prefix}_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                   f"{prefix}_reserved_gib": reserved}
            if self.overhead_gib is not None:
                # What the card would hold at that peak: the allocator's reserved memory plus what
                # the process holds outside it (the profile's overhead, not measured in this run).
                out[f"{prefix}_card_gib"] = reserved + self.overhead_gib
            return out
        return {f"{prefix}_rss_gib": peak_rss_bytes() / GIB}

    def current(self, prefix: str = "memory/phase_start") -> dict[str, float]:
        """What is held right now (at a phase start: the live memory the phase begins from)."""
        if self.cuda:
            return {f"{prefix}_allocated_gib": torch.cuda.memory_allocated(self.device) / GIB,
                    f"{prefix}_reserved_gib": torch.cuda.memory_reserved(self.device) / GIB}
        return {f"{prefix}_rss_gib": current_rss_bytes() / GIB}

    def headroom(self, *peaks: dict[str, float]) -> dict[str, float]:
        """The budget minus the largest peak of the phases, in GiB. With a card profile the budget is
        the card's total less the overhead, so this is also the card's total less its card-side
        peak (`*_card_gib`). On CUDA the peak reserved:
        with the cap on, a variant over the budget dies with an OOM before this is logged, so
        a negative number means the guard was off (memory.enforce=false). On CPU nothing is
        capped and the peak RSS is the whole process's (interpreter, libraries, data), so the
        number is host memory left under the budget, not whether a 16 GB card would fit."""
        suffix = "_reserved_gib" if self.cuda else "_rss_gib"
        peak = max(v for p in peaks for k, v in p.items() if k.endswith(suffix))
        return {"memory/headroom_gib": self.budget_gib - peak}

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def trim_heap() -> None:
    """Returns the C heap's free pages to the kernel (glibc), so the resident set is what is
    live, not what an earlier, larger variant once needed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may then include freed memory the allocator kept


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets the VmHWM high-water mark (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: peak_rss_bytes then reports the process-lifetime peak


def _proc_status_bytes(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    return _proc_status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- fp8 storage of the frozen base weights (trainer.base_weights=fp8) ----------------------
#
# The frozen UNet weights are half of a LoRA step's memory at 1024 px. Stored as float8 (e4m3)
# with one scale per output channel they take half the bytes of bf16; each layer dequantizes
# its weight to the compute dtype just for its own matmul (a transient of one layer's size),
# and a custom autograd function keeps autograd from saving that bf16 copy for the backward
# (it dequantizes again there). The matmuls themselves stay in the compute dtype, so only the
# frozen weights' rounding changes (about 2 significant bits less than bf16), not the LoRA math.

FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max  # 448


def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (fp8 weight, fp32 scale per output channel) with weight ~= fp8 * scale."""
    w = weight.detach().float()
    amax = w.flatten(1).abs().amax(dim=1).clamp(min=1e-12)
    scale = (amax / _FP8_MAX).view(-1, *([1] * (w.dim() - 1)))
    return (w / scale).to(FP8), scale


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias, dtype):
        w = w8.to(dtype) * scale.to(dtype)
        ctx.save_for_backward(w8, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return torch.nn.functional.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        w = w8.to(ctx.dtype) * scale.to(ctx.dtype)
        return (grad.to(ctx.dtype) @ w).to(ctx.x_dtype), None, None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias, dtype, stride, padding, dilation, groups):
        w = w8.to(dtype) * scale.to(dtype)
        ctx.save_for_backward(w8, scale)
        ctx.conf = (dtype, x.dtype, x.shape, stride, padding, dilation, groups)
        b = None if bias is None else bias.to(dtype)
        return torch.nn.functional.conv2d(x.to(dtype), w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        dtype, x_dtype, x_shape, stride, padding, dilation, groups = ctx.conf
        w = w8.to(dtype) * scale.to(dtype)
        gx = torch.nn.grad.conv2d_input(x_shape, w, grad.to(dtype), stride, padding, dilation, groups)
        return gx.to(x_dtype), None, None, None, None, None, None, None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen nn.Linear whose weight is stored in fp8 (see above). Still an nn.Linear, so
    peft wraps it like any other layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return _Fp8Linear.apply(x, self.weight, self.weight_scale, self.bias, dtype)


class Fp8Conv2d(torch.nn.Conv2d):
    """A frozen nn.Conv2d whose weight is stored in fp8 (see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise NotImplementedError("fp8 base weights support zero-padded convolutions only")
        dtype = self.compute_dtype
        if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return _Fp8Conv2d.apply(x, self.weight, self.weight_scale, self.bias, dtype,
                                self.stride, self.padding, self.dilation, self.groups)


def store_base_weights_fp8(module: torch.nn.Module, compute_dtype: torch.dtype, min_params: int = 4096) -> int:
    """Turns every frozen Linear/Conv2d of `module` (LoRA base layers included, LoRA weights
    never) into its fp8-storage twin, in place; returns the number of weights converted.
    Layers under `min_params` weights (e.g. the 4-channel conv_in) stay as they are."""
    converted = 0
    for m in module.modules():
        if type(m) not in (torch.nn.Linear, torch.nn.Conv2d) or m.weight.requires_grad:
            continue
        if m.weight.numel() < min_params or _is_lora_weight(m):
            continue
        w8, scale = _quantize(m.weight)
        m.__class__ = Fp8Linear if isinstance(m, torch.nn.Linear) else Fp8Conv2d
        m.weight = torch.nn.Parameter(w8, requires_grad=False)
        m.register_buffer("weight_scale", scale, persistent=False)
        m.compute_dtype = compute_dtype
        converted += w8.numel()
    return converted


def dequantize_base_weights(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Undoes `store_base_weights_fp8` in place: plain Linear/Conv2d layers holding
    fp8 * scale in `dtype`. Inference then runs in one dtype, and a fused LoRA is added to
    the real weights rather than to their fp8 codes."""
    for m in module.modules():
        if isinstance(m, (Fp8Linear, Fp8Conv2d)):
            weight = (m.weight.float() * m.weight_scale.float()).to(dtype)
            m.__class__ = torch.nn.Linear if isinstance(m, Fp8Linear) else torch.nn.Conv2d
            del m.weight_scale, m.compute_dtype
            m.weight = torch.nn.Parameter(weight, requires_grad=False)


def _is_lora_weight(m: torch.nn.Module) -> bool:
    # peft's lora_A / lora_B are plain Linear/Conv2d layers inside ModuleDicts; they train.
    return any(p.requires_grad for p in m.parameters())


def describe_peak(peak: dict[str, float]) -> str:
    """The training peak for a log line, as the budget sees it: the card-side peak with a card
    profile, else CUDA reserved, else the CPU's resident set."""
    for key, what in (("memory/peak_card_gib", "card-side"), ("memory/peak_reserved_gib", "CUDA reserved"),
                      ("memory/peak_rss_gib", "CPU RSS")):
        if key in peak:
            return f"peak memory {peak[key]:.2f} GiB ({what})"
    return "peak memory not measured"
