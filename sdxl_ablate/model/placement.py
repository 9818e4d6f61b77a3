"""Moving and casting models without diffusers' spurious float32 warning."""

from __future__ import annotations

from typing import Optional

import torch


def place(module: torch.nn.Module, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """`module.to(device, dtype)`, casting only when the dtype differs.

    Why not `.to(device, dtype)`: diffusers' `ModelMixin.to` warns "There are modules in
    UNet2DConditionModel that should be kept in float32: []" whenever a dtype is passed, also
    when the model has no module to keep in float32 (the list is empty) and also when nothing
    changes, so every variant printed it several times. A model that does list float32
    modules still goes through the library's own `.to`, which handles (and warns about) them.
    """
    module.to(device)
    tensors = [*module.parameters(), *module.buffers()]
    # Module.to(dtype) casts the floating-point tensors only: a no-op when they all have it.
    if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in tensors):
        if getattr(module, "_keep_in_fp32_modules", None):
            module.to(dtype=dtype)
        else:
            torch.nn.Module.to(module, dtype=dtype)
    return module
