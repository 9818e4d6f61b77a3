"""trainer.compile: torch.compile per repeated UNet block, and its undoing.

Here, not in train/, because the shared base (model/basecache.py) must be handed back eager."""

from __future__ import annotations

import torch

# The blocks compiled one by one: they hold nearly all of the arithmetic and of the small
# kernels, and they repeat (70 transformer blocks of 2 shapes), so a few compiled graphs serve
# the whole UNet. Compiling the UNet whole takes minutes; per block, about one. diffusers lists
# only the transformer blocks as the UNet's repeated blocks.
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def compile_blocks(unet) -> None:
    """torch.compile every transformer and resnet block of the UNet in place."""
    import torch._dynamo

    # One graph per distinct block shape (and per batch size): SDXL has about 20; the default
    # recompile limit (8) would leave the rest eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 4096)
    unet._repeated_blocks = list(REPEATED_BLOCKS)
    unet.compile_repeated_blocks(dynamic=False)  # fixed shapes: a batch size is one compile, then reused


def uncompile_blocks(unet: torch.nn.Module) -> None:
    """Back to eager modules (evaluation runs other shapes; no reason to compile those).
    Neither torch nor diffusers has an undo for `Module.compile`: it only sets this attribute."""
    for m in unet.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
