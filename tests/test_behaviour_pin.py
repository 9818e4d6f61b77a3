"""The restructure (issue 16) must not change what a variant trains: two tiny variants' final
LoRA bits and per-step losses, pinned before the move and checked after it.

The variants go through `runner.run`, the path `python -m sdxl_ablate` takes, and between them
exercise most switches of the loop: both LoRA target sets, text-encoder LoRA, LoRA dropout,
DoRA, gradient accumulation, caption dropout, noise offset, min-SNR weighting, Prodigy and
AdamW, cached and live inputs. fp32 on the CPU with one thread: bitwise repeatable on a machine.
If a change is *meant* to alter training, this test says so loudly; update the pins then, in
the same commit, saying why.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from sdxl_ablate.run import runner
from sdxl_ablate.config import to_typed

from .conftest import compose_config, tiny_overrides

VARIANTS = {
    "rich": ["trainer.max_steps=4", "lora.targets=all", "lora.text_encoder=true", "lora.dropout=0.5",
             "trainer.grad_accum=2", "trainer.batch_size=2", "data.caption_dropout=0.5",
             "trainer.noise_offset=0.05", "trainer.snr_gamma=5.0", "data.crop=random", "data.flip=true",
             "trainer.cache_latents=false"],
    "dora": ["trainer.max_steps=4", "lora.use_dora=true", "trainer.optimizer=prodigy", "trainer.lr=1.0"],
}

# sha256 over the sorted LoRA tensors' names, dtypes, shapes and raw bytes; and the per-step losses.
PINNED = {
    "rich": ("ff14df4a1aa9a2392fb13295355c29fe5f0b619284b739b364ddab037607f57d",
             [1.1682693362236023, 0.8440339863300323, 1.0732662677764893, 1.2157905101776123]),
    "dora": ("f5cbda6548cf4c55b6a117f79675b7a09e13a3f071892f976cda268729a3a473",
             [1.3213468790054321, 1.1973589658737183, 1.1501412391662598, 1.1135001182556152]),
}


def lora_digest(path) -> str:
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_tiny_variant_trains_the_same_bits_as_before_the_restructure(tmp_path, variant):
    cfg = to_typed(compose_config(tiny_overrides(tmp_path, "study=pin", *VARIANTS[variant])))
    runner.run(cfg, variant, tmp_path / "out")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("pin")
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{variant}'")
    assert run.data.tags["status"] == "ok"
    def history(metric):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]

    # The pinned losses are the backpropagated objective: min-SNR weighted for "rich", which since
    # issue 19 logs it as train/weighted_loss and the unweighted mean as train/loss.
    weighted = "trainer.snr_gamma=5.0" in VARIANTS[variant]
    losses = history("train/weighted_loss" if weighted else "train/loss")
    digest = lora_digest(tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors")
    print(variant, repr(digest), losses)
    assert (digest, losses) == PINNED[variant]
    if weighted:  # the unweighted loss of the same samples; min-SNR weights are <= 1 (1 below gamma)
        plain = history("train/loss")
        assert len(plain) == len(losses) and all(p >= w for p, w in zip(plain, losses))
        assert any(p > w for p, w in zip(plain, losses))
        assert run.data.metrics["train/final_weighted_loss"] == pytest.approx(sum(losses) / len(losses))
    else:
        assert not history("train/weighted_loss") and "train/final_weighted_loss" not in run.data.metrics
