"""Random crops that really change: the study caches several random crops per image and every
step picks one, so the same image is seen in different crops from epoch to epoch."""

from __future__ import annotations

import random

import pytest
import torch

from sdxl_ablate.config import to_typed
from sdxl_ablate.data.datasets import ImageTransform, load_data, reference_set
from sdxl_ablate.config import Crop
from sdxl_ablate.model.sdxl import build_tiny
from sdxl_ablate.train.inputs import MicroBatches

from .conftest import compose_config


def crops_over_epochs(tmp_path, *overrides: str, epochs: int = 12) -> list[tuple[int, int]]:
    """(crop top, left) of training image 0 at each of `epochs` epochs, as the trainer's inputs give it."""
    cfg = to_typed(compose_config(["model=tiny", "data=sample", "device=cpu", "trainer.precision=fp32",
                                   f"trainer.cache_dir={tmp_path}", "data.sample_size=4", "data.heldout=0", *overrides]))
    data = load_data(cfg.data)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    inputs = MicroBatches(build_tiny(0), data, cfg, torch.device("cpu"), rng, gen)
    crops = []
    for _ in range(epochs):  # one step on image 0 per epoch
        *_, time_ids = inputs([0])
        crops.append(tuple(int(v) for v in time_ids[0, 2:4]))
    return crops


def test_the_study_s_cached_crops_differ_between_epochs(tmp_path):
    crops = crops_over_epochs(tmp_path, "data.crop=random", "data.crop_scale=1.125", "data.crops_per_image=4")
    # The sample images are square: at 64 px x 1.125 the crop can start anywhere in 0..8.
    assert len(set(crops)) > 1, crops
    assert all(0 <= top <= 8 and 0 <= left <= 8 for top, left in crops)
    assert 2 <= len(set(crops)) <= 4  # drawn from the 4 crops cached for this image


@pytest.mark.parametrize("overrides", [
    ("data.crop=random", "data.crops_per_image=1", "data.crop_scale=1.125"),  # one cached crop per image
    ("data.crop=random", "data.crops_per_image=4"),  # crop_scale 1.0: a square image is never cropped
])
def test_one_cached_crop_or_no_room_means_the_same_crop_every_epoch(tmp_path, overrides):
    assert len(set(crops_over_epochs(tmp_path, *overrides))) == 1


def test_crop_scale_gives_a_square_image_room_to_move():
    from PIL import Image

    image = Image.new("RGB", (100, 100))
    t = ImageTransform(64, Crop.random, flip=False, scale=1.25)
    starts = {t(image, random.Random(i))[2] for i in range(20)}
    assert len(starts) > 1 and all(0 <= top <= 16 and 0 <= left <= 16 for top, left in starts)
    assert {ImageTransform(64, Crop.random, flip=False)(image, random.Random(i))[2] for i in range(5)} == {(0, 0)}


def test_nothing_held_out_uses_training_images_and_says_so(tmp_path, caplog):
    cfg = to_typed(compose_config(["model=tiny", "data=sample", "data.sample_size=6", "data.heldout=0"]))
    data = load_data(cfg.data)
    assert data.heldout == [] and len(data.train) == 6
    with caplog.at_level("WARNING"):
        reference, trained_on = reference_set(data, cfg.data.heldout)
    assert trained_on and reference == data.train[-4:]
    assert "TRAINING images" in caplog.text and "eval.reference=train" in caplog.text
    held = load_data(to_typed(compose_config(["model=tiny", "data=sample", "data.sample_size=6"])).data)
    assert reference_set(held, 4) == (held.heldout, False)


def test_fp32_base_weights_keep_the_frozen_unet_in_fp32_under_a_half_precision():
    """Seed 000's "UNet: FP32 loaded, mixed precision handled by Accelerator"."""
    from sdxl_ablate.model.precision import unet_dtype
    from sdxl_ablate.train.setup import place_components

    for weights, want in (("fp32", torch.float32), ("compute", torch.bfloat16)):
        cfg = to_typed(compose_config(["model=tiny", "trainer.precision=bf16", f"trainer.base_weights={weights}"]))
        c = build_tiny(0)
        place_components(c, cfg, torch.device("cpu"))
        assert unet_dtype(cfg) == want
        assert {p.dtype for p in c.unet.parameters()} == {want}
        assert {p.dtype for p in c.text_encoder.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in c.vae.parameters()} == {torch.float32}
