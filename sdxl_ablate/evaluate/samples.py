"""Sample images during training, into MLflow's image history (a step slider per prompt).

With `eval.every_n_steps=N` (and eval enabled) the trainer calls `TrainingSamples` through
its `Hooks`: once before the first step (step 0: the base model, adapters disabled), then
after every N-th optimizer step and after the last one. Each (prompt, seed) of
`eval.prompts` x `eval.seeds` is one image history, logged with
`MlflowClient.log_image(run_id, image, key=..., step=...)` under the key
`samples/<prompt slug>_seed<seed>`: the MLflow UI shows it with a step slider, and side by side
across runs in the compare view.

Generating mid-training leaves training bit-identical (tests/test_samples.py checks it):
no gradients, every random draw from the sample's own seeded CPU generator (and the global
RNG state forked and restored all the same), the modules' train/eval modes, placement and
LoRA input casting put back as they were. The generation code is evaluation's (`generate`).
The memory it needs counts in the variant's training peak: every variant pays the same.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Callable, Iterator

import torch
from PIL import Image

from sdxl_ablate.config import Config
from sdxl_ablate.evaluate.scores import eval_jobs, generate
from sdxl_ablate.train.loop import Hooks, total_steps
from sdxl_ablate.train.setup import lora_input_casting

log = logging.getLogger(__name__)

KEY_PREFIX = "samples/"


def sample_key(prompt: str, seed: int) -> str:
    """`samples/<prompt slug>_seed<seed>`: MLflow keys allow letters, digits, _ - . / and spaces."""
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:48] or "prompt"
    return f"{KEY_PREFIX}{slug}_seed{seed}"


def sample_steps(every: int, total: int) -> list[int]:
    """The optimizer steps after which samples are drawn: 0 (the base model), every `every`-th,
    and the last."""
    return sorted({0, *range(every, total + 1, every), total})


@contextlib.contextmanager
def inference_state(components, device: torch.device) -> Iterator[object]:
    """The components ready for generation on `device`, and put back exactly as they were after."""
    c = components
    modules = {"unet": c.unet, "vae": c.vae, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2}
    modes = [(m, m.training) for top in modules.values() for m in top.modules()]
    # The cached-input trainer parks the VAE and frozen text encoders on the CPU: moved back after.
    places = {name: next(m.parameters()).device for name, m in modules.items()}
    casting = [(m, m.cast_input_dtype_enabled) for top in modules.values() for m in top.modules()
               if hasattr(m, "cast_input_dtype_enabled")]
    devices = [device] if device.type == "cuda" else []
    stance = getattr(torch.compiler, "set_stance", None)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), \
                (stance("force_eager") if stance else contextlib.nullcontext()):
            for m in modules.values():
                m.to(device)  # device only: each keeps its dtype
                m.eval()  # no LoRA dropout while sampling
            # Inference runs without autocast: peft casts each LoRA input to the LoRA's fp32 and back.
            lora_input_casting(c, enabled=True)
            pipe = c.pipeline()
            pipe.set_progress_bar_config(disable=True)
            yield pipe
    finally:
        for m, enabled in casting:
            m.cast_input_dtype_enabled = enabled
        for name, m in modules.items():
            m.to(places[name])
        for m, training in modes:
            m.training = training
        if device.type == "cuda":
            torch.cuda.synchronize(device)


@contextlib.contextmanager
def adapters_disabled(components) -> Iterator[None]:
    """The base model: every LoRA layer bypassed (not merged, nothing changed), then back on
    with the trainable flags as they were."""
    from sdxl_ablate.model.lora import lora_modules

    modules = list(lora_modules(components).values())
    grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for m in modules:
        m.disable_adapters()
    try:
        yield
    finally:
        for m in modules:
            m.enable_adapters()
        for p, flag in grads:
            p.requires_grad_(flag)


class TrainingSamples:
    """Images for `eval.prompts` x `eval.seeds` at step 0 and every `eval.every_n_steps` steps.

    `log_image(image, key, step)` receives each image (the runner passes MLflow's log_image).
    """

    def __init__(self, components, cfg: Config, device: torch.device, n_train_images: int,
                 log_image: Callable[[Image.Image, str, int], None]):
        ev = cfg.eval
        if not ev.every_n_steps:
            raise ValueError("TrainingSamples needs eval.every_n_steps >= 1")
        self.components, self.cfg, self.device, self.log_image = components, cfg, device, log_image
        self.jobs = eval_jobs(ev)
        self.resolution = ev.resolution or cfg.data.resolution
        self.steps = set(sample_steps(ev.every_n_steps, total_steps(cfg, n_train_images)))
        self.logged: list[int] = []  # the steps sampled so far

    def sample(self, step: int) -> list[Image.Image]:
        with inference_state(self.components, self.device) as pipe:
            images = generate(pipe, self.jobs, self.cfg.eval, self.resolution)
        for (prompt, seed), image in zip(self.jobs, images):
            self.log_image(image, sample_key(prompt, seed), step)
        self.logged.append(step)
        return images

    def base(self) -> None:
        """Step 0: the base model's images (the adapters bypassed)."""
        with adapters_disabled(self.components):
            self.sample(0)

    def after_step(self, steps_done: int) -> None:
        if steps_done in self.steps and steps_done > 0:
            self.sample(steps_done)

    def hooks(self) -> Hooks:
        return Hooks(loop_start=self.base, after_step=self.after_step)


def training_hooks(components, cfg: Config, device: torch.device, n_train_images: int, tracker,
                   label: str = "") -> Hooks:
    """The trainer's hooks for one variant: its progress-bar label, and with `eval.every_n_steps`
    (eval enabled) the samples, logged into the tracker's run."""
    if not (cfg.eval.enabled and cfg.eval.every_n_steps):
        return Hooks(label=label)

    hooks = TrainingSamples(components, cfg, device, n_train_images, tracker.log_image).hooks()
    hooks.label = label
    return hooks
