"""The base loaded once per sweep process: restored bit for bit, and no variant depends on its
predecessors (issue 11). Tiny model, fp32, CPU, in-process runner unless marked slow."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sdxl_ablate.model import basecache
from sdxl_ablate.run import runner
from sdxl_ablate.config import to_typed
from sdxl_ablate.model.sdxl import build_tiny

from .conftest import ROOT, compose_config, tiny_overrides


def cfg_of(tmp_path, *extra):
    return to_typed(compose_config(tiny_overrides(tmp_path, "study=cache", *extra)))


def run_variant(tmp_path, name: str, *extra):
    out = tmp_path / name
    result = runner.run(cfg_of(tmp_path, *extra), name, out)
    assert result is not None, f"variant {name} failed"
    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors")), out


def state(c) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part in ("unet", "vae", "text_encoder", "text_encoder_2")
            for k, v in getattr(c, part).state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        # Bits, not values: -0.0 vs 0.0 or two NaN payloads would pass torch.equal.
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a[k].element_size()]
        assert torch.equal(a[k].contiguous().view(ints), b[k].contiguous().view(ints)), k


# Y: touches everything a variant can touch: all targets, DoRA, dropout (train mode, RNG inside the
# blocks), Prodigy, min-SNR, and evaluation (held-out loss, pipeline, VAE slicing, LoRA reloaded).
BUSY = ("lora.targets=all", "lora.use_dora=true", "lora.dropout=0.25", "trainer.optimizer=prodigy", "trainer.lr=1.0",
        "trainer.snr_gamma=5.0", "eval=tiny", "eval.steps=2", "eval.prompts=[a cat]", "data.heldout=2",
        "trainer.max_steps=2")


def test_base_is_bitwise_the_fresh_model_after_a_busy_variant(tmp_path):
    basecache.drop()
    run_variant(tmp_path, "busy", *BUSY)
    key = basecache.cached_key()
    assert key is not None and key.kind == "tiny" and key.dtype == "torch.float32"
    cached = basecache._CACHED.components
    fresh = build_tiny()
    assert_bitwise_equal(state(cached), state(fresh))
    # And the module tree: no adapters, hooks, checkpointing or compile left; all frozen, eval mode.
    assert not any("lora" in n for n, _ in cached.unet.named_modules())
    assert not any(m.training for part in (cached.unet, cached.vae, cached.text_encoder) for m in part.modules())
    assert not any(p.requires_grad for p in cached.unet.parameters())
    assert basecache.stats.differences == []
    assert basecache.compare(basecache._CACHED.fingerprint, basecache.fingerprint(cached)) == []


def test_a_variant_gives_the_same_lora_fresh_or_after_another_variant(tmp_path):
    basecache.drop()
    loads = basecache.stats.loads
    first, _ = run_variant(tmp_path, "x_fresh", "lora.targets=attn")
    assert basecache.stats.loads == loads + 1  # a freshly loaded base
    run_variant(tmp_path, "y", *BUSY)
    # Whatever consumed the global random streams before must not matter either.
    torch.rand(123)
    random.random()
    reuses = basecache.stats.reuses
    # force: the same config finished once already, and would otherwise be reused, not retrained
    second, _ = run_variant(tmp_path, "x_again", "lora.targets=attn", "trainer.force=true")
    assert basecache.stats.reuses == reuses + 1 and basecache.stats.loads == loads + 1  # the same base, reused
    assert_bitwise_equal(first, second)
    assert any(v.abs().sum() > 0 for k, v in first.items() if "lora_B" in k)  # it did train


def test_fingerprint_catches_one_changed_bit_and_the_base_is_then_reloaded(tmp_path):
    basecache.drop()
    cfg = cfg_of(tmp_path)
    c = basecache.acquire(cfg, "cpu")
    weight = c.unet.conv_in.weight
    original = weight.detach().clone()
    weight.data.view(torch.int32)[0, 0, 0, 0] ^= 1  # the lowest mantissa bit of one value
    basecache.release(c)
    assert basecache.cached_key() is None and basecache.stats.dropped_changed >= 1
    assert any("unet.conv_in.weight" in d for d in basecache.stats.differences)
    loads = basecache.stats.loads
    c2 = basecache.acquire(cfg, "cpu")
    assert basecache.stats.loads == loads + 1 and c2 is not c
    assert torch.equal(c2.unet.conv_in.weight, original)
    basecache.release(c2)
    assert basecache.cached_key() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int64])
def test_checksum_sees_a_flipped_bit_and_two_swapped_values(dtype):
    t = (torch.arange(1, 2001, dtype=torch.float32) / 7).to(dtype)
    base = basecache.tensor_checksum(t)
    assert torch.equal(base, basecache.tensor_checksum(t.clone()))
    flipped = t.clone()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    flipped.view(ints)[5] ^= 1
    swapped = t.clone()
    swapped[[3, 900]] = t[[900, 3]]
    assert not torch.equal(t, swapped)
    assert not torch.equal(base, basecache.tensor_checksum(flipped))
    assert not torch.equal(base, basecache.tensor_checksum(swapped))
    # -0.0 and 0.0 are equal values but different bits.
    if dtype.is_floating_point:
        z, minus_z = torch.zeros(4).to(dtype), (-torch.zeros(4)).to(dtype)
        assert not torch.equal(basecache.tensor_checksum(z), basecache.tensor_checksum(minus_z))


def test_what_is_shared_and_what_is_lent_for_good(tmp_path):
    assert basecache.why_not_shared(cfg_of(tmp_path)) == ""
    assert "fp8" in basecache.why_not_shared(cfg_of(tmp_path, "trainer.base_weights=fp8"))
    assert "fuse_lora" in basecache.why_not_shared(cfg_of(tmp_path, "eval=tiny", "eval.fuse_lora=true"))
    assert "keep_loaded" in basecache.why_not_shared(cfg_of(tmp_path, "model.keep_loaded=false"))
    basecache.drop()
    c = basecache.acquire(cfg_of(tmp_path, "trainer.base_weights=fp8"), "cpu")
    assert basecache.cached_key() is None  # the fp8 variant owns it: never given to another variant
    basecache.release(c)
    assert basecache.cached_key() is None


def test_the_cache_key_follows_what_changes_the_base(tmp_path):
    basecache.drop()
    a = basecache.acquire(cfg_of(tmp_path), "cpu")
    basecache.release(a)
    loads = basecache.stats.loads
    b = basecache.acquire(cfg_of(tmp_path, "lora.targets=all", "trainer.seed=3"), "cpu")  # the base is the same
    assert b is a and basecache.stats.loads == loads
    basecache.release(b)
    c = basecache.acquire(cfg_of(tmp_path, "trainer.precision=bf16"), "cpu")  # another dtype: another base
    assert c is not a and basecache.stats.loads == loads + 1
    assert c.unet.conv_in.weight.dtype == torch.bfloat16 and c.vae.encoder.conv_in.weight.dtype == torch.float32
    basecache.release(c)
    assert basecache.cached_key().dtype == "torch.bfloat16"


def test_the_random_full_size_model_is_born_in_its_dtypes_and_repeats_for_its_seed(monkeypatch):
    """build_random_base on a scaled-down config (the real one is 2.6 B parameters): built directly
    in bf16 (VAE fp32), the same weights from any global RNG state, the caller's RNG untouched."""
    from sdxl_ablate.model import sdxl as models

    monkeypatch.setattr(models, "SDXL_UNET_CONFIG", models._TINY_UNET_CONFIG)
    monkeypatch.setattr(models, "SDXL_VAE_CONFIG", models._TINY_VAE_CONFIG)
    monkeypatch.setattr(models, "SDXL_TEXT_ENCODER_CONFIG", models._TINY_TEXT_ENCODER_CONFIG)
    monkeypatch.setattr(models, "SDXL_TEXT_ENCODER_2_CONFIG", models._TINY_TEXT_ENCODER_CONFIG)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    a = basecache.build_random_base(torch.device("cpu"), torch.bfloat16, torch.float32)
    assert torch.equal(torch.rand(3), expected)  # the global stream goes on as if nothing was built
    torch.manual_seed(2)
    torch.rand(7)
    b = basecache.build_random_base(torch.device("cpu"), torch.bfloat16, torch.float32)
    assert_bitwise_equal(state(a), state(b))
    assert {p.dtype for p in a.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in a.text_encoder_2.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in a.vae.parameters()} == {torch.float32}


def test_phases_are_measured_and_add_up(tmp_path):
    from mlflow.tracking import MlflowClient

    _, out = run_variant(tmp_path, "timed", "trainer.max_steps=3")
    rec = json.loads((out / "phases.json").read_text())
    ph = rec["phases"]
    for name in ("data", "model_setup", "first_step", "training", "logging", "saving", "teardown"):
        assert ph[name] > 0, name
    assert ph["evaluation"] == 0.0  # eval=off
    assert sum(ph.values()) == pytest.approx(rec["wall_s"], abs=2e-3)  # "other" is the rest, never negative
    assert ph["other"] >= 0 and rec["steps"] == 3 and rec["status"] == "ok"
    assert 0 < rec["marks"]["loop_start"] < rec["wall_s"]
    assert rec["base"]["event"] in ("loaded", "reused")
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(rec["run_id"])
    assert run.data.metrics["time/training_s"] == pytest.approx(ph["training"], rel=1e-6)
    assert run.data.metrics["time/wall_s"] > 0


@pytest.mark.slow
def test_cli_variant_in_a_fresh_process_equals_it_after_another_in_a_sweep(tmp_path):
    """The real thing: `python -m sdxl_ablate X` alone vs `python -m sdxl_ablate -m variant=Y,X`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    common = [*tiny_overrides(tmp_path, "study=proc", "trainer.max_steps=2", "data.heldout=2")]

    def cli(*args, sweep=False):
        proc = subprocess.run([sys.executable, "-m", "sdxl_ablate", *(["-m"] if sweep else []), *common, *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]

    cli("variant=attn", "hydra.run.dir=alone")
    # `all` shares attn's base (dora_prodigy does not since it takes the fp16-fix VAE); retrain attn.
    cli("variant=all,attn", "hydra.sweep.dir=sweep", "trainer.force=true", sweep=True)
    alone = load_file(str(tmp_path / "alone" / "lora" / "pytorch_lora_weights.safetensors"))
    after = load_file(str(tmp_path / "sweep" / "1" / "lora" / "pytorch_lora_weights.safetensors"))
    assert_bitwise_equal(alone, after)
    second = json.loads((tmp_path / "sweep" / "1" / "phases.json").read_text())
    assert second["base"]["event"] == "reused" and second["base"]["changed"] == 0


@pytest.mark.slow
def test_compiled_blocks_are_reused_by_a_later_variant_with_the_same_block_structure(monkeypatch):
    """What basecache's docstring claims about dynamo within a process, checked with a counting
    backend (the trainer compiles only on CUDA; the guards are the same on the CPU)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from sdxl_ablate.config import LoraConfig, Targets
    from sdxl_ablate.model.lora import add_adapters, remove_adapters
    from sdxl_ablate.model.compile import compile_blocks, uncompile_blocks

    counter = CompileCounter()
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: real(self, *a, **{**k, "backend": counter}))
    torch._dynamo.reset()
    c = build_tiny()
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 64))
    cond = {"text_embeds": torch.randn(1, 32), "time_ids": torch.zeros(1, 6)}

    def variant(**lora) -> int:
        add_adapters(c, LoraConfig(**lora))
        compile_blocks(c.unet)
        c.unet(*inputs, added_cond_kwargs=cond)
        uncompile_blocks(c.unet)
        remove_adapters(c)
        return counter.frame_count

    try:
        first = variant(targets=Targets.attn)
        assert first > 0
        assert variant(targets=Targets.attn) == first  # same structure: nothing compiled again
        assert variant(targets=Targets.attn, rank=8) > first  # other shapes: compiled once more
    finally:
        torch._dynamo.reset()


def test_compile_caches_go_under_the_cache_root_unless_set(monkeypatch, tmp_path):
    import torch._inductor.config as inductor_config

    from sdxl_ablate.config import cache_root

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    dirs = basecache.enable_compile_caches()
    assert dirs == {"TORCHINDUCTOR_CACHE_DIR": str(cache_root() / "compile" / "inductor"),
                    "TRITON_CACHE_DIR": str(tmp_path / "mine")}  # a directory the user set wins
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == dirs["TORCHINDUCTOR_CACHE_DIR"]
    assert inductor_config.fx_graph_cache is True
