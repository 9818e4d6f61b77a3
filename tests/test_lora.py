"""The saved LoRA of every variant reloads with diffusers' load_lora_weights, exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl_ablate.config import LoraConfig, Targets
from sdxl_ablate.model.lora import (
    LORA_FILE,
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    LoraLoadError,
    add_adapters,
    count_trainable,
    load_lora,
    remove_adapters,
    save_lora,
)
from sdxl_ablate.model.sdxl import build_tiny

SEED = 0


def trained_like(cfg: LoraConfig):
    """Tiny SDXL with the variant's adapters, its LoRA weights set to random values (as after
    training: an untrained adapter has B = 0 and would hide a dropped key)."""
    c = build_tiny(SEED)
    params = add_adapters(c, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.ndim == 1 else 0.0))
    return c


def unet_inputs():
    gen = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    embeds = torch.randn(2, 77, 64, generator=gen)
    pooled = torch.randn(2, 32, generator=gen)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    return sample, torch.tensor([10, 500]), embeds, {"text_embeds": pooled, "time_ids": time_ids}


def outputs(unet, text_encoder, text_encoder_2):
    sample, t, embeds, added = unet_inputs()
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return (
            unet(sample, t, embeds, added_cond_kwargs=added).sample,
            text_encoder(ids, output_hidden_states=True).hidden_states[-2],
            text_encoder_2(ids).text_embeds,
        )


VARIANTS = [
    LoraConfig(targets=Targets.attn),
    LoraConfig(targets=Targets.all),
    LoraConfig(targets=Targets.attn, text_encoder=True),
    LoraConfig(targets=Targets.all, text_encoder=True),
    LoraConfig(targets=Targets.attn, use_dora=True),
    LoraConfig(targets=Targets.all, use_dora=True, text_encoder=True),
    LoraConfig(targets=Targets.attn, dropout=0.5),
    LoraConfig(targets=Targets.attn, dropout=0.1, rank=8, alpha=4.0),
]


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: f"{c.targets.value}-te{int(c.text_encoder)}-dora{int(c.use_dora)}"
                         f"-drop{c.dropout}-r{c.rank}a{c.alpha:g}")
def test_round_trip_is_exact(cfg, tmp_path):
    trained = trained_like(cfg)
    for m in (trained.unet, trained.text_encoder, trained.text_encoder_2):
        m.eval()
    expected = outputs(trained.unet, trained.text_encoder, trained.text_encoder_2)
    path = save_lora(trained, tmp_path)
    assert path.name == LORA_FILE

    pipe = build_tiny(SEED).pipeline()
    base = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    load_lora(pipe, path)
    got = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    again = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)

    assert torch.equal(got[0], expected[0]), "UNet output differs after reload"
    assert torch.equal(got[0], again[0]), "dropout still active at inference"
    assert not torch.allclose(got[0], base[0]), "the LoRA had no effect"
    for i in (1, 2):
        assert torch.equal(got[i], expected[i])
        assert torch.equal(got[i], base[i]) != cfg.text_encoder  # changed only when trained
    loaded = pipe.unet.peft_config["variant"]
    # Dropout is a training setting: the saved adapter config has none, so a plain
    # load_lora_weights gives the same image twice.
    assert (loaded.r, loaded.lora_alpha, loaded.use_dora, loaded.lora_dropout) == (
        cfg.rank, cfg.alpha, cfg.use_dora, 0.0)


def test_target_table_matches_modules_exactly():
    c = build_tiny(SEED)
    add_adapters(c, LoraConfig(targets=Targets.all, text_encoder=True))
    wrapped = {n.rsplit(".base_layer", 1)[0] for n, _ in c.unet.named_modules() if n.endswith(".base_layer")}
    suffixes = {next(t for t in UNET_TARGETS[Targets.all] if n == t or n.endswith("." + t)) for n in wrapped}
    assert suffixes == set(UNET_TARGETS[Targets.all])  # every listed name matches something
    te = {n.rsplit(".", 2)[-2] for n, _ in c.text_encoder.named_modules() if n.endswith(".base_layer")}
    assert te == set(TEXT_ENCODER_TARGETS)


def test_trainable_count_is_rank_times_dims():
    c = build_tiny(SEED)
    cfg = LoraConfig(targets=Targets.attn, rank=4)
    params = add_adapters(c, cfg)
    expected = 0
    for name, module in c.unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and hasattr(module, "base_layer"):
            expected += cfg.rank * (module.base_layer.in_features + module.base_layer.out_features)
    assert count_trainable(c) == sum(p.numel() for p in params) == expected > 0
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in c.unet.named_parameters() if "lora" not in n)


def test_remove_adapters_restores_base_exactly():
    c = build_tiny(SEED)
    before = outputs(c.unet, c.text_encoder, c.text_encoder_2)
    cfg = LoraConfig(targets=Targets.all, text_encoder=True)
    add_adapters(c, cfg)
    with torch.no_grad():
        for p in c.unet.parameters():
            if p.requires_grad:
                p.add_(0.1)
    remove_adapters(c)
    after = outputs(c.unet, c.text_encoder, c.text_encoder_2)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not any("lora" in n for n, _ in c.unet.named_parameters())


def test_dropped_key_is_an_error(tmp_path):
    trained = trained_like(LoraConfig(targets=Targets.all))
    path = save_lora(trained, tmp_path)
    state = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    dropped = next(k for k in state if "to_q.lora_B" in k)
    del state[dropped]
    save_file(state, path, metadata=metadata)
    pipe = build_tiny(SEED).pipeline()
    with pytest.raises(LoraLoadError, match="did not load completely"):
        load_lora(pipe, path)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(LoraLoadError, match="does not exist"):
        load_lora(build_tiny(SEED).pipeline(), tmp_path / "nope.safetensors")


def _wrapped(targets: Targets, rank: int = 4) -> tuple[set[str], int]:
    c = build_tiny(SEED)
    params = add_adapters(c, LoraConfig(targets=targets, rank=rank))
    names = {n.rsplit(".base_layer", 1)[0] for n, _ in c.unet.named_modules() if n.endswith(".base_layer")}
    return names, sum(p.numel() for p in params)


def test_self_and_cross_attention_split_attn_exactly():
    """self_attn (attn1) and cross_attn (attn2) are disjoint and together are attn, module by
    module and parameter by parameter (the full-size split is in tests/test_plan.py)."""
    attn, n_attn = _wrapped(Targets.attn)
    self_, n_self = _wrapped(Targets.self_attn)
    cross, n_cross = _wrapped(Targets.cross_attn)
    assert self_ and cross and not self_ & cross
    assert self_ | cross == attn
    assert all(".attn1." in n for n in self_) and all(".attn2." in n for n in cross)
    assert len(self_) == len(cross) == len(attn) // 2
    assert n_self + n_cross == n_attn > 0
