"""trainer.cuda_graphs: a micro-batch's forward and backward captured once and replayed."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch

from sdxl_ablate.config import Config
from sdxl_ablate.train.auto import checkpointing_on

log = logging.getLogger(__name__)


class GraphedStep:
    """trainer.cuda_graphs: one micro-batch's forward and backward, captured once as a CUDA graph
    and replayed at every later step.

    Why: a step launches ~17,000-25,000 kernels, and launching each from Python costs the host
    more time than most of them take on the GPU, so the GPU waits (the benchmark's profile).
    A replay launches them all at once. What changes: nothing numerically; the inputs are
    copied into fixed buffers, the noise and timesteps are drawn outside (same generator, same
    order), and the LoRA gradients land in fixed tensors that the optimizer reads. The finite
    check, clipping, loss scaling's bookkeeping and the optimizer step stay outside the graph.
    """

    def __init__(self, run: Callable[..., torch.Tensor], params: list[torch.nn.Parameter]):
        self.run = run  # (*inputs) -> loss, after its backward
        self.params = params
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.loss: torch.Tensor | None = None
        self.grads: list[torch.Tensor] = []
        self.summed: list[torch.Tensor] | None = None
        self.failed = False

    def __call__(self, *inputs: torch.Tensor, micro_batch: int = 0, micro_batches: int = 1) -> torch.Tensor:
        if self.failed:  # the same forward and backward, eagerly
            return self.run(*inputs)
        if self.graph is None:
            try:
                self._capture(inputs)
            except RuntimeError as err:  # e.g. an op that syncs with the host: go on eagerly, say so
                log.warning("CUDA graph capture failed, training goes on without graphs: %s", err)
                self.failed = True
                for p in self.params:
                    p.grad = None
                torch.cuda.synchronize()
                return self.run(*inputs)
        else:
            for buffer, x in zip(self.inputs, inputs):
                buffer.copy_(x)
        self.graph.replay()
        # The optimizer reads p.grad; zero_grad(set_to_none) between steps drops the attribute,
        # not the graph's tensors, so point it back. The next replay overwrites those tensors:
        # with gradient accumulation the micro-batches are summed in tensors of their own.
        grads = self.grads
        if micro_batches > 1:
            if micro_batch == 0:
                self.summed = [g.clone() for g in self.grads]
            else:
                torch._foreach_add_(self.summed, self.grads)
            grads = self.summed
        for p, g in zip(self.params, grads):
            p.grad = g
        return self.loss

    def _capture(self, inputs) -> None:
        for p in self.params:
            p.grad = None  # the backward then writes fresh tensors of the graph's own pool
        self.inputs = [x.clone() for x in inputs]
        torch.cuda.synchronize()
        # The eager warm-up steps' cached blocks cannot serve the graph's private pool.
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        # Captured on the stream the loop runs on (see train): autograd's gradient accumulators
        # were made there in the warm-up steps, and one on another stream would sync (illegal
        # while capturing).
        with torch.cuda.graph(graph, stream=torch.cuda.current_stream()):  # replayed in __call__
            self.loss = self.run(*self.inputs)
        self.graph = graph
        self.grads = [p.grad for p in self.params]


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Runs the enclosed work on a fresh CUDA stream, ordered after and before the default one."""
    default, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(default)
    with torch.cuda.stream(side):
        yield
    default.wait_stream(side)


# Eager steps before the capture: compilation, cuBLAS/cuDNN set-up and the optimizer's state
# happen there, never inside the graph.
GRAPH_WARMUP_STEPS = 2


def graphs_usable(cfg: Config, device: torch.device) -> tuple[bool, str]:
    """Whether trainer.cuda_graphs applies to this variant, and why not."""
    t, lo = cfg.trainer, cfg.lora
    if not t.cuda_graphs:
        return False, "off"
    if device.type != "cuda":
        return False, "CUDA graphs need a CUDA device"
    if lo.text_encoder:
        return False, "text-encoder LoRA tokenizes and encodes prompts on the host inside the step"
    if lo.dropout > 0 and checkpointing_on(cfg, device):
        return False, "LoRA dropout with checkpointing must save and restore the RNG state per block"
    return True, "on"
