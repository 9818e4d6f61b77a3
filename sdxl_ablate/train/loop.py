"""The training loop shared by every variant: SDXL's LoRA objective, nothing variant-specific.

Read `train` top to bottom: setup (setup.py: precision, adapters, the speed and memory
switches; the optimizer), inputs (inputs.py: cached or live), then the loop, whose micro-step
is objective.py's forward and backward, run eagerly or replayed as a CUDA graph (graphs.py).
A variant differs only through its config. The benchmark (`sdxl_ablate.perf.bench`) drives this
same function, so what it measures is what users run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sdxl_ablate.config import Config
from sdxl_ablate.data.datasets import LoadedData
from sdxl_ablate.model.compile import uncompile_blocks
from sdxl_ablate.model.lora import lora_modules
from sdxl_ablate.train.checkpoint import Checkpointer
from sdxl_ablate.train.graphs import GRAPH_WARMUP_STEPS, side_stream
from sdxl_ablate.train.inputs import MicroBatches
from sdxl_ablate.train.objective import draw_noise
from sdxl_ablate.train.setup import Setup, lora_input_casting, setup

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    status: str  # ok | nan (`judge`)
    error: str = ""  # why the status is not ok
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # unweighted, per optimizer step; nan where skipped
    # The backpropagated objective per step where it differs from `losses` (min-SNR weighting).
    objective_losses: list[float] = field(default_factory=list)
    nonfinite_steps: int = 0
    step_times: list[float] = field(default_factory=list)
    images_per_step: int = 1
    cuda_graphs: bool = False  # whether the steps after the warm-up replayed a CUDA graph
    timings: dict[str, float] = field(default_factory=dict)  # prepare_s, inputs_s (phases.py)

    @property
    def final_loss(self) -> float:
        """Mean of the last (up to) 10 finite step losses: less noisy than the last step."""
        finite = [x for x in self.losses if math.isfinite(x)][-10:]
        return sum(finite) / len(finite) if finite else float("nan")

    @property
    def final_objective(self) -> float:
        """`final_loss` of the weighted objective (nan when the objective is unweighted)."""
        finite = [x for x in self.objective_losses if math.isfinite(x)][-10:]
        return sum(finite) / len(finite) if finite else float("nan")

    @property
    def step_time(self) -> float:
        """Median seconds per optimizer step, the first step (warm-up) left out."""
        times = self.step_times[1:] or self.step_times
        return statistics.median(times) if times else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.images_per_step / self.step_time


@dataclass
class Hooks:
    """Where an observer (the benchmark) may look in without a copy of the loop: `loop_start`
    runs once the model and inputs are ready, just before the first step; `step(i)` is a
    context manager around optimizer step i (e.g. a profiler); `after_step(n)` runs after the
    n-th finished optimizer step, once it is logged (e.g. sample images, sdxl_ablate.evaluate.samples).
    `label` names the variant on the progress bar (e.g. `[5/6] attn_dropout05`)."""

    loop_start: Callable[[], None] = lambda: None
    step: Callable[[int], ContextManager] = lambda i: contextlib.nullcontext()
    after_step: Callable[[int], None] = lambda n: None
    label: str = ""


def total_steps(cfg: Config, n_images: int) -> int:
    t = cfg.trainer
    if t.epochs is None:
        return t.max_steps
    return t.epochs * math.ceil(n_images / (t.batch_size * t.grad_accum))


class StepTimer:
    """Seconds per optimizer step without an extra wait for the GPU at every step: on CUDA each
    step is bracketed by events, read once the GPU has passed them (the next step's loss read
    has waited for that already; `settle` waits at a checkpoint and at the end). `sync` waits
    for the GPU after every step instead (the benchmark's per-step times, trainer.sync_every_step)."""

    def __init__(self, device: torch.device, sync: bool, result: TrainResult):
        self.device, self.result = device, result
        self.events = device.type == "cuda" and not sync
        self.sync = device.type == "cuda" and sync
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self):
        if not self.events:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started) -> None:
        """Times the step begun at `started`."""
        if not self.events:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self.result.step_times.append(time.perf_counter() - started)
            return
        self.settle()  # the earlier steps': the GPU is past them, this step's loss was read
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((started, end))

    def settle(self) -> None:
        for started, end in self.pending:
            end.synchronize()
            self.result.step_times.append(started.elapsed_time(end) / 1000)
        self.pending.clear()


class DataOrder:
    """Endless shuffled epochs of indices, cut into batches; resumable (`state_dict`).

    The shuffles draw from the loop's shared `rng` (also used for crops, flips and caption
    dropout), whose state the checkpoint keeps; this holds the rest of the current epoch."""

    def __init__(self, n: int, batch_size: int, rng: random.Random):
        self.n, self.batch_size, self.rng = n, batch_size, rng
        self.pending: list[int] = []

    def __iter__(self) -> "DataOrder":
        return self

    def __next__(self) -> list[int]:
        while len(self.pending) < self.batch_size:
            epoch = list(range(self.n))
            self.rng.shuffle(epoch)
            self.pending += epoch
        batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
        return batch

    def state_dict(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        if (state["n"], state["batch_size"]) != (self.n, self.batch_size):
            raise ValueError(f"data order of {state['n']} images in batches of {state['batch_size']} cannot "
                             f"continue with {self.n} images in batches of {self.batch_size}")
        self.pending = list(state["pending"])


def batches(n: int, batch_size: int, rng: random.Random) -> DataOrder:
    """Endless shuffled epochs of indices, cut into batches."""
    return DataOrder(n, batch_size, rng)


@dataclass
class TrainState:
    """Everything the loop carries from one step to the next: what a checkpoint saves."""

    named_params: dict[str, torch.nn.Parameter]  # the LoRA weights, by component-qualified name
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # noise, timesteps and latent samples
    rng: random.Random  # data order, crops, flips, caption dropout
    order: DataOrder
    result: TrainResult
    timer: StepTimer
    step: int = 0  # optimizer steps done (counting skipped non-finite ones)
    weighted: bool = False  # the objective is min-SNR weighted: it is kept and logged apart
    nonfinite_in_row: int = 0




def micro_batches(s: Setup, inputs: MicroBatches, state: TrainState, cfg: Config, replay: bool) -> torch.Tensor:
    """Forward and backward of the step's micro-batches (replayed as a CUDA graph when `replay`);
    returns the step's [objective, unweighted] losses on the device, not yet read: float64, so
    that they add up exactly as the Python floats of `loss.item()` would."""
    t = cfg.trainer
    n_timesteps = inputs.c.noise_scheduler.config.num_train_timesteps
    step_loss = torch.zeros(2, dtype=torch.float64, device=inputs.device)
    for micro in range(t.grad_accum):
        latents, embeds, pooled, time_ids = inputs(next(state.order))
        noise, timesteps = draw_noise(latents, n_timesteps, t.noise_offset, state.generator)
        batch = (latents, noise, timesteps, embeds, pooled, time_ids)
        if s.ddp is not None:  # every rank drew the global batch's randomness; each trains its slice
            batch = s.ddp.shard(*batch)
        if replay:
            loss = s.graphed(*batch, micro_batch=micro, micro_batches=t.grad_accum)
        else:
            loss = s.forward_backward(*batch)
        if s.ddp is not None:  # the same finite check on every rank
            loss = s.ddp.mean(loss)
        step_loss += loss.double() / t.grad_accum
    return step_loss


def optimizer_step(s: Setup, cfg: Config) -> None:
    """The update from the accumulated gradients (loss scaling and clipping see their inf/NaN)."""
    if s.ddp is not None:
        s.ddp.average_grads(s.params)
    if cfg.trainer.max_grad_norm is not None:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.params, cfg.trainer.max_grad_norm)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.lr_schedule.step()


def skip(state: TrainState, step: int, max_in_row: int) -> bool:
    """Counts a non-finite step (no update was made from it); True when the run must end."""
    state.result.nonfinite_steps += 1
    state.nonfinite_in_row += 1
    state.result.losses.append(float("nan"))
    if state.weighted:
        state.result.objective_losses.append(float("nan"))
    log.warning("step %d: non-finite loss, step skipped (%d in a row)", step, state.nonfinite_in_row)
    return state.nonfinite_in_row >= max_in_row


def judge(state: TrainState, max_in_row: int) -> None:
    """Ok only means ok: the run ends `nan`, with why, when its last steps were non-finite (their
    streak reached `max_in_row`, or the run ended inside one: the weights they left behind never
    gave a finite loss, e.g. after one huge update) or when the LoRA weights are not finite."""
    r, in_row = state.result, state.nonfinite_in_row
    if in_row:
        r.error = (f"{r.nonfinite_steps} of {len(r.losses)} steps non-finite, the last {in_row} in a row "
                   + ("(trainer.max_nonfinite_in_row)" if in_row >= max_in_row else "(the run ended in them)"))
    elif not all(bool(torch.isfinite(p).all()) for p in state.named_params.values()):
        r.error = "final LoRA has non-finite weights"
    if r.error:
        r.status = "nan"


def train(components, data: LoadedData, cfg: Config, device: torch.device,
          log_metrics: Callable[[dict[str, float], int], None] = lambda m, s: None,
          memory_stats: Callable[[], dict[str, float]] = dict,
          hooks: Hooks | None = None, checkpointer: Checkpointer | None = None) -> TrainResult:
    t, c = cfg.trainer, components
    hooks = hooks or Hooks()
    torch.manual_seed(t.seed)
    rng = random.Random(t.seed)
    generator = torch.Generator(device).manual_seed(t.seed)
    steps = total_steps(cfg, len(data.train))
    s = setup(c, cfg, device, steps)
    log_metrics({"params/trainable": sum(p.numel() for p in s.params),
                 "params/unet_total": sum(p.numel() for p in c.unet.parameters())}, 0)
    began = time.perf_counter()
    inputs = MicroBatches(c, data, cfg, device, rng, generator)
    result = TrainResult(status="ok", images_per_step=t.batch_size * t.grad_accum,
                         timings={"prepare_s": s.prepare_s, "inputs_s": time.perf_counter() - began})
    named = {f"{comp}.{n}": p for comp, m in lora_modules(c).items() for n, p in m.named_parameters() if p.requires_grad}
    state = TrainState(named, s.optimizer, s.lr_schedule, s.scaler, generator, rng,
                       batches(len(data.train), t.batch_size, rng), result, StepTimer(device, t.sync_every_step, result),
                       weighted=t.snr_gamma is not None)
    # A resumed run continues exactly where the checkpoint left off (weights, optimizer, every RNG).
    start = checkpointer.restore(state, len(data.train)) if checkpointer is not None else 0
    hooks.loop_start()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"{hooks.label or cfg.lora.targets.value} train",
               unit="step", dynamic_ncols=True)
    # A graph is captured off the default stream, and the warm-up steps whose backward made the
    # gradient accumulators must have run there too: with graphs the loop runs on a side stream.
    # Log lines (a checkpoint written, a step skipped) go through tqdm, above the bar, not into it.
    with side_stream(device) if s.graphed is not None else contextlib.nullcontext(), logging_redirect_tqdm():
        for step in bar:
            with hooks.step(step):
                began = state.timer.start()
                replay = s.graphed is not None and step >= start + GRAPH_WARMUP_STEPS
                # The step's one wait; the objective decides the update, `train/loss` is the unweighted mean.
                objective_loss, step_loss = micro_batches(s, inputs, state, cfg, replay).tolist()
                finite = math.isfinite(objective_loss) and math.isfinite(step_loss)
                if finite:
                    optimizer_step(s, cfg)
                # Also after a skipped step: no update from a batch whose loss is NaN or inf.
                s.optimizer.zero_grad(set_to_none=True)
                if finite:
                    state.timer.stop(began)
            state.step = step + 1
            if not finite:
                if skip(state, step, t.max_nonfinite_in_row):
                    break
            else:
                state.nonfinite_in_row = 0
                result.losses.append(step_loss)
                weighted = {"train/weighted_loss": objective_loss} if state.weighted else {}
                if state.weighted:
                    result.objective_losses.append(objective_loss)
                result.steps = step + 1
                if step % t.log_every == 0 or step == steps - 1:
                    log_metrics({"train/loss": step_loss, **weighted, "train/lr": s.lr_schedule.get_last_lr()[0],
                                 **memory_stats()}, step)
                    bar.set_postfix(loss=f"{step_loss:.4f}")
                hooks.after_step(result.steps)  # e.g. sample images (samples.py); leaves training untouched
            if checkpointer is not None:
                checkpointer.after_step(state, steps, len(data.train))
    bar.close()
    state.timer.settle()
    result.steps = len(result.losses)
    judge(state, t.max_nonfinite_in_row)
    result.cuda_graphs = s.graphed is not None and s.graphed.graph is not None and not s.graphed.failed
    uncompile_blocks(c.unet)
    lora_input_casting(c, enabled=True)
    return result
