"""sdxl_ablate.model.sdxl: the offline tokenizer, the built models' exact sizes, loading, the pipeline.

The full-size SDXL is only ever built on the meta device here; everything else is the tiny model.
"""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from sdxl_ablate.model import sdxl as models
from sdxl_ablate.config import ModelConfig, ModelKind
from sdxl_ablate.model.sdxl import (
    SDXL_SCHEDULER_CONFIG,
    ModelLoadError,
    build_sdxl_random,
    build_tiny,
    build_unet,
    clip_tokenizer,
    load_components,
    load_pretrained,
)

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids for "a photo of a cat"


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def modules(c: models.SDXLComponents) -> dict[str, torch.nn.Module]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {name: getattr(c, name) for name in names}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def tiny() -> models.SDXLComponents:
    return build_tiny()


# --- tokenizer -------------------------------------------------------------------------------


def test_clip_tokenizer_ids_padding_and_cache():
    tok, tok2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    assert len(tok) == 49408 and tok.model_max_length == 77
    for t, pad_id in ((tok, 49407), (tok2, 0)):  # "!" is token 0
        ids = t("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == CAT_IDS + [pad_id] * (77 - len(CAT_IDS))
    assert tok.pad_token == "<|endoftext|>" and tok2.pad_token == "!"

    folder = Path(os.environ["SDXL_ABLATE_CACHE"]) / "clip_tokenizer"  # tmp: see conftest.py
    # Exactly the two files: no temporary file is left behind.
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    # A second call reuses the cached files.
    mtime = (folder / "vocab.json").stat().st_mtime_ns
    clip_tokenizer()
    assert (folder / "vocab.json").stat().st_mtime_ns == mtime


def test_clip_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    reference, tok = SimpleTokenizer(), clip_tokenizer()
    texts = ["Naruto Uzumaki eating ramen", "Bill Gates in Naruto-style!!", " A boy, 3 dogs & café "]
    for text in texts:
        assert tok(text).input_ids == [49406, *reference.encode(text), 49407], text


# --- built in code ----------------------------------------------------------------------------


def test_sdxl_unet_exact_size_on_meta():
    unet = build_unet("sdxl", device="meta")
    assert n_params(unet) == 2_567_463_684
    assert {p.device.type for p in unet.parameters()} == {"meta"}
    with pytest.raises(ValueError, match="'huge'"):
        build_unet("huge", device="meta")


def test_sdxl_random_on_meta_sizes_dims_and_dtype():
    c = build_sdxl_random(device="meta", dtype=torch.bfloat16)
    sizes = {k: n_params(m) for k, m in modules(c).items()}
    assert sizes == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,  # CLIP ViT-L/14 text tower
        "text_encoder_2": 694_659_840,  # OpenCLIP bigG text tower + projection
    }
    for m in modules(c).values():
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in m.parameters()} == {"meta"}
    assert torch.get_default_dtype() == torch.float32  # restored after the build
    te1, te2, u = c.text_encoder.config, c.text_encoder_2.config, c.unet.config
    assert u.cross_attention_dim == te1.hidden_size + te2.hidden_size == 2048
    # 6 micro-conditioning values (original size, crop, target size) + the pooled text embedding
    add_dim = 6 * u.addition_time_embed_dim + te2.projection_dim
    assert u.projection_class_embeddings_input_dim == add_dim == 2816
    assert c.vae.config.scaling_factor == 0.13025 and c.vae.config.force_upcast

    bare = build_sdxl_random(device="meta", with_text_encoders=False, with_vae=False)
    assert bare.vae is None and bare.text_encoder is None and bare.text_encoder_2 is None


def test_tiny_dims_frozen_fp32(tiny):
    te1, te2, u = tiny.text_encoder.config, tiny.text_encoder_2.config, tiny.unet.config
    assert u.cross_attention_dim == te1.hidden_size + te2.hidden_size == 64
    add_dim = 6 * u.addition_time_embed_dim + te2.projection_dim
    assert u.projection_class_embeddings_input_dim == add_dim == 80
    assert te1.vocab_size == te2.vocab_size == len(tiny.tokenizer) == 49408
    for m in modules(tiny).values():
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())
        assert {(p.dtype, p.device.type) for p in m.parameters()} == {(torch.float32, "cpu")}
    assert n_params(tiny.unet) == 1_976_516
    assert isinstance(tiny.noise_scheduler, DDPMScheduler)
    assert tiny.noise_scheduler.config.num_train_timesteps == 1000


def test_tiny_forward_shapes(tiny):
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        latents = tiny.vae.encode(image).latent_dist.sample(generator)
        assert latents.shape == (2, 4, 8, 8)  # 1/8 of the image side, as in SDXL
        text = torch.randn(2, 77, 64, generator=generator)
        cond = {
            "text_embeds": torch.randn(2, 32, generator=generator),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
        timesteps = torch.tensor([10, 500])
        noise_pred = tiny.unet(latents, timesteps, text, added_cond_kwargs=cond).sample
        assert noise_pred.shape == (2, 4, 8, 8)
        assert tiny.vae.decode(latents).sample.shape == (2, 3, 64, 64)


def test_build_tiny_deterministic_and_leaves_global_rng_alone(tiny):
    state = torch.random.get_rng_state()
    again = build_tiny(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, module in modules(tiny).items():
        assert_same_weights(module, modules(again)[name])
    other = build_tiny(seed=1)
    assert not torch.equal(other.unet.conv_in.weight, tiny.unet.conv_in.weight)


def test_load_components_dispatch(monkeypatch):
    tiny = load_components(ModelConfig(kind=ModelKind.tiny))
    assert tiny.unet.config.block_out_channels == (32, 64)
    monkeypatch.setattr(models, "build_sdxl_random", lambda: "sdxl_random")
    monkeypatch.setattr(models, "load_pretrained", lambda cfg: ("pretrained", cfg.pretrained))
    assert load_components(ModelConfig(kind=ModelKind.sdxl_random)) == "sdxl_random"
    cfg = ModelConfig(kind=ModelKind.pretrained, pretrained="x/y")
    assert load_components(cfg) == ("pretrained", "x/y")


# --- pipeline ---------------------------------------------------------------------------------


def test_pipeline_generates_deterministically(tiny):
    pipe = tiny.pipeline()
    pipe.set_progress_bar_config(disable=True)
    # The same modules, not copies: what the trainer changes is what the pipeline runs.
    assert pipe.unet is tiny.unet and pipe.text_encoder_2 is tiny.text_encoder_2
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.vae_scale_factor == 8
    assert torch.equal(pipe.scheduler.betas, tiny.noise_scheduler.betas)

    def generate(seed: int) -> np.ndarray:
        out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64,
                   generator=torch.Generator().manual_seed(seed), output_type="np")
        return out.images

    first = generate(0)
    assert first.shape == (1, 64, 64, 3) and first.dtype == np.float32
    assert np.isfinite(first).all() and 0.0 <= first.min() and first.max() <= 1.0
    np.testing.assert_array_equal(generate(0), first)
    assert not np.array_equal(generate(1), first)

    ddpm = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    assert isinstance(tiny.pipeline(ddpm).scheduler, DDPMScheduler)


# --- load_pretrained --------------------------------------------------------------------------


def test_round_trip_through_a_diffusers_directory(tiny, tmp_path):
    tiny.pipeline().save_pretrained(tmp_path)
    loaded = load_components(ModelConfig(kind=ModelKind.pretrained, pretrained=str(tmp_path)))
    for name, module in modules(loaded).items():
        assert_same_weights(module, modules(tiny)[name])
        assert not module.training
        assert {(p.dtype, p.requires_grad) for p in module.parameters()} == {(torch.float32, False)}
    assert loaded.tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert (loaded.tokenizer.pad_token, loaded.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    # Saved as the pipeline's Euler config, read back as the training scheduler.
    assert isinstance(loaded.noise_scheduler, DDPMScheduler)
    assert torch.equal(loaded.noise_scheduler.betas, tiny.noise_scheduler.betas)


def test_vae_override_from_a_directory(tiny, tmp_path):
    tiny.pipeline().save_pretrained(tmp_path / "model")
    other = build_tiny(seed=1).vae
    other.save_pretrained(tmp_path / "vae")
    cfg = ModelConfig(
        kind=ModelKind.pretrained, pretrained=str(tmp_path / "model"), vae=str(tmp_path / "vae")
    )
    loaded = load_pretrained(cfg)
    assert_same_weights(loaded.vae, other)
    assert_same_weights(loaded.unet, tiny.unet)


def test_missing_directory_raises(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError) as err:
        load_pretrained(ModelConfig(kind=ModelKind.pretrained, pretrained=missing))
    message = str(err.value)
    assert missing in message and "treated as a local directory" in message
    assert "text_encoder_2/" in message and "model=tiny" in message


def test_incomplete_directory_names_missing_subfolders(tmp_path):
    for sub in ("unet", "vae", "scheduler"):
        (tmp_path / sub).mkdir()
    missing = "lacks text_encoder, text_encoder_2, tokenizer, tokenizer_2[.]"
    with pytest.raises(ModelLoadError, match=missing):
        load_pretrained(ModelConfig(kind=ModelKind.pretrained, pretrained=str(tmp_path)))


def test_unreachable_hub_id_offline_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("load_pretrained went to the network while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    hub_id = "sdxl-ablate-test/no-such-model"
    with pytest.raises(ModelLoadError) as err:
        load_pretrained(ModelConfig(kind=ModelKind.pretrained, pretrained=hub_id))
    message = str(err.value)
    assert hub_id in message and "treated as a hub id" in message and "HF_HUB_OFFLINE" in message
