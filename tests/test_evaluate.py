"""Tests of sdxl_ablate.evaluate: the score definitions, the grid layout, and a whole
evaluation of a tiny LoRA-carrying model into a temporary MLflow store."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

import sdxl_ablate.evaluate.scores as evaluate_module
from sdxl_ablate.config import (Config, DataConfig, DataSource, EvalConfig, LoraConfig, ModelConfig, ModelKind, Precision,
                                TrackingConfig, TrainerConfig)
from sdxl_ablate.data.datasets import Example, LoadedData
from sdxl_ablate.evaluate.scores import (
    ClipLoadError,
    clip_scores,
    evaluate,
    generate,
    inference_pipeline,
    load_clip,
    style_score,
    text_score,
    tiny_clip,
)
from sdxl_ablate.evaluate.grid import grid_layout, make_grid, render_grid
from sdxl_ablate.model.lora import add_adapters, load_lora, remove_adapters, save_lora
from sdxl_ablate.train.memory import dequantize_base_weights, store_base_weights_fp8
from sdxl_ablate.model.sdxl import build_tiny
from sdxl_ablate.track.tracker import Tracker

METRICS = {
    "eval/heldout_loss", "eval/heldout_loss_base", "eval/heldout_loss_delta", "eval/heldout_loss_delta_se",
    "eval/clip_style", "eval/clip_text", "eval/clip_style_base", "eval/clip_text_base",
    "eval/clip_style_lift", "eval/clip_text_lift",
    # The noise of each (issue 19): per image for CLIP (paired for the lifts), per pair for the loss.
    "eval/heldout_loss_se", "eval/heldout_loss_base_se", "eval/clip_style_se", "eval/clip_text_se",
    "eval/clip_style_base_se", "eval/clip_text_base_se", "eval/clip_style_lift_se", "eval/clip_text_lift_se",
    "eval/clip_random",  # 1: eval=tiny's random CLIP
}


# --------------------------------------------------------------------------- scores


def basis(*indices: int, dim: int = 4) -> torch.Tensor:
    return torch.eye(dim)[list(indices)]


def test_an_image_compared_with_itself_scores_one():
    emb = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(text_score(emb, emb), torch.ones(3))
    assert torch.allclose(style_score(emb[:1], emb[:1]), torch.ones(1))
    # A reference set of copies of one image (at any scale): its centroid is that image.
    assert torch.allclose(style_score(emb[:1], torch.cat([emb[:1], 3 * emb[:1], 0.5 * emb[:1]])), torch.ones(1))


def test_orthogonal_embeddings_score_zero():
    assert torch.allclose(text_score(basis(0, 1), basis(1, 2)), torch.zeros(2))
    assert torch.allclose(style_score(basis(2), basis(0, 1)), torch.zeros(1))


def test_style_score_against_a_known_centroid():
    # References e0 and e1 -> c = (e0 + e1) / sqrt(2), whatever the references' norms.
    refs = torch.stack([3.0 * basis(0)[0], 0.5 * basis(1)[0]])
    images = torch.stack([basis(0)[0], basis(0)[0] + basis(1)[0], basis(2)[0], -2.0 * basis(1)[0]])
    expected = torch.tensor([1 / math.sqrt(2), 1.0, 0.0, -1 / math.sqrt(2)])
    assert torch.allclose(style_score(images, refs), expected)


def test_text_score_pairs_each_image_with_its_own_prompt():
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    texts = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    assert torch.allclose(text_score(images, texts), torch.tensor([1.0, 1 / math.sqrt(2)]))


# --------------------------------------------------------------------------- grid


def solid(color, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_grid_layout_is_exact():
    base = [solid(c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    lora = [solid(c) for c in ((255, 255, 0), (0, 255, 255), (255, 0, 255))]
    grid = make_grid(base, lora, ["a prompt", "a much longer prompt that has to wrap over lines", "x"])
    # 64 px tiles: font 10 px, lines 12 px, gap 5, label column 40 px, header 3 * 12 + 5 px.
    assert grid.size == (40 + 3 * (64 + 5), 41 + 2 * (64 + 5))
    layout = grid_layout((64, 64), 3)
    assert layout.size == grid.size
    for row, images in enumerate((base, lora)):
        for col, im in enumerate(images):
            x, y = 40 + col * 69, 41 + row * 69
            assert layout.tile_origin(row, col) == (x, y)
            color = im.getpixel((0, 0))
            for dx, dy in ((0, 0), (63, 0), (0, 63), (63, 63), (32, 32)):
                assert grid.getpixel((x + dx, y + dy)) == color
            assert grid.getpixel((x + 64, y)) == (255, 255, 255)  # the gap after the tile
            assert grid.getpixel((x, y + 64)) == (255, 255, 255)
    pixels = np.asarray(grid)
    assert (pixels[:41, 40:] < 128).any(), "no column label drawn"
    assert (pixels[41:, :40] < 128).any(), "no row label drawn"


def test_grid_needs_one_image_per_label_and_one_size():
    with pytest.raises(ValueError, match="as many"):
        make_grid([solid("red")], [solid("red")], ["a", "b"])
    with pytest.raises(ValueError, match="one size"):
        make_grid([solid("red")], [solid("red", (32, 32))], ["a"])


def test_the_report_grid_enlarges_small_tiles_and_places_captions_under_them():
    """The report's per-prompt grid goes through the same renderer: 3 rows of 2 columns, 32 px
    tiles shown 4x (128 px, nearest neighbour), a caption band under each tile, a 2-line title."""
    rows = [(f"variant {i}\nseed=0", [solid((40 * i, 0, 0), (32, 32)), solid((0, 40 * i, 0), (32, 32))])
            for i in range(3)]
    grid = render_grid(rows, ["seed 0", "seed 1"], captions=[["style 0.1", "style 0.2"]] * 3,
                       title=['"a prompt"', "columns: evaluation seed"], min_tile=128)
    layout = grid_layout((128, 128), 2, rows=3, captions=True, title_lines=2)
    assert grid.size[1] == layout.size[1] and grid.size[0] >= layout.size[0] - layout.label_w
    x0 = grid.size[0] - 2 * (128 + layout.gap)  # the label column is as wide as the widest row label
    for row, (_, images) in enumerate(rows):
        for col, im in enumerate(images):
            x, y = x0 + col * (128 + layout.gap), layout.title_h + layout.header_h + row * (128 + layout.caption_h + layout.gap)
            for dx, dy in ((0, 0), (127, 127), (64, 64)):
                assert grid.getpixel((x + dx, y + dy)) == im.getpixel((0, 0))
            band = np.asarray(grid)[y + 128 + 1: y + 128 + layout.caption_h, x: x + 128]
            assert (band < 200).any(), "no caption under the tile"
    with pytest.raises(ValueError, match="as many images in each row"):
        render_grid([("a", [solid("red")])], ["seed 0", "seed 1"])


# --------------------------------------------------------------------------- CLIP


def test_clip_style_of_identical_image_sets_is_one():
    im = Image.effect_noise((64, 64), 40).convert("RGB")
    jobs = [("a cat", 0), ("a dog", 0)]
    metrics, per_image = clip_scores(tiny_clip(), jobs, [im, im], [im, im], [im, im])
    assert metrics["eval/clip_style"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["eval/clip_style_base"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["eval/clip_style_lift"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval/clip_text_lift"] == pytest.approx(0.0, abs=1e-6)
    assert len(per_image["clip_text"]) == 2


def test_a_clip_that_cannot_load_names_it_and_the_offline_option():
    with pytest.raises(ClipLoadError, match=r"NoSuchClip.*eval=tiny"):
        load_clip(EvalConfig(clip_model="NoSuchClip", clip_pretrained="nope"), torch.device("cpu"))


# --------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow store for the module: creating a sqlite store takes a second or more."""
    return tmp_path_factory.mktemp("mlflow")


def eval_config(store: Path, **eval_kw) -> Config:
    # Small enough for a few seconds on 2 CPU cores; batch 2 is also the CFG batch of generation.
    ev = {"prompts": ["a red circle", "a blue square"], "seeds": [0, 1], "steps": 2, "resolution": 64,
          "clip_model": "tiny", "clip_pretrained": "tiny", "heldout_timesteps": [100, 500, 900], **eval_kw}
    return Config(
        model=ModelConfig(kind=ModelKind.tiny),
        data=DataConfig(source=DataSource.sample, resolution=64),
        lora=LoraConfig(rank=4),
        trainer=TrainerConfig(precision=Precision.fp32, batch_size=2),
        eval=EvalConfig(**ev),
        tracking=TrackingConfig(uri=f"sqlite:///{store}/mlflow.db", artifact_root=str(store / "artifacts")),
    )


def trained_tiny(cfg: Config, tmp_path: Path):
    """The tiny model with adapters whose lora_B is non-zero (as after training), saved."""
    components = build_tiny(0)
    add_adapters(components, cfg.lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in components.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return components, save_lora(components, tmp_path / "lora")


def heldout_data() -> LoadedData:
    images = [Image.effect_noise((80, 64), 30 + 20 * i).convert("RGB") for i in range(2)]
    return LoadedData(train=[], heldout=[Example(im, f"held-out {i}") for i, im in enumerate(images)],
                      skipped=[], source="test")


def test_evaluate_end_to_end(tmp_path, store):
    cfg = eval_config(store)
    components, lora_file = trained_tiny(cfg, tmp_path)
    out_dir = tmp_path / "eval"
    with Tracker(cfg.tracking, "study", "variant") as tracker:
        metrics = evaluate(components, lora_file, heldout_data(), cfg, torch.device("cpu"), tracker, out_dir)
        tracker.set_status("ok")

    assert set(metrics) == METRICS
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["eval/heldout_loss"] != metrics["eval/heldout_loss_base"]
    assert metrics["eval/clip_style_lift"] == pytest.approx(metrics["eval/clip_style"] - metrics["eval/clip_style_base"])
    assert metrics["eval/heldout_loss_delta"] == pytest.approx(metrics["eval/heldout_loss"] - metrics["eval/heldout_loss_base"], abs=1e-6)
    assert metrics["eval/heldout_loss_delta_se"] > 0
    assert metrics["eval/clip_text_lift"] == pytest.approx(metrics["eval/clip_text"] - metrics["eval/clip_text_base"])

    n = 4  # 2 prompts x 2 seeds
    base = [np.asarray(Image.open(out_dir / "images" / f"base_{i}.png")) for i in range(n)]
    lora = [np.asarray(Image.open(out_dir / "images" / f"lora_{i}.png")) for i in range(n)]
    assert all(b.shape == (64, 64, 3) for b in base)
    assert all((b != l).any() for b, l in zip(base, lora)), "the LoRA did not change the images"
    assert (base[0] != base[1]).any(), "two seeds gave the same image"
    # The base images are those of the untouched model: the adapters were stripped exactly.
    fresh = inference_pipeline(build_tiny(0), cfg, torch.device("cpu"))
    assert (np.asarray(generate(fresh, [("a red circle", 0)], cfg.eval, 64)[0]) == base[0]).all()

    scores = json.loads((out_dir / "scores.json").read_text())
    assert scores["metrics"] == pytest.approx(metrics)
    assert [(im["prompt"], im["seed"]) for im in scores["images"]] == [
        ("a red circle", 0), ("a red circle", 1), ("a blue square", 0), ("a blue square", 1)]
    assert np.mean([im["clip_style"] for im in scores["images"]]) == pytest.approx(metrics["eval/clip_style"])
    # Each SE is the per-image (paired for a lift) standard error of the mean it belongs to.
    style = np.array([im["clip_style"] for im in scores["images"]])
    lifts = style - np.array([im["clip_style_base"] for im in scores["images"]])
    assert metrics["eval/clip_style_se"] == pytest.approx(style.std(ddof=1) / np.sqrt(n))
    assert metrics["eval/clip_style_lift_se"] == pytest.approx(lifts.std(ddof=1) / np.sqrt(n))
    pairs = np.array(scores["heldout_losses"]["lora"])
    assert len(pairs) == 2 * 3 and pairs.mean() == pytest.approx(metrics["eval/heldout_loss"])
    assert metrics["eval/heldout_loss_se"] == pytest.approx(pairs.std(ddof=1) / np.sqrt(len(pairs)))
    assert scores["clip_scorer"] == "smoke test: random CLIP"

    client = MlflowClient(cfg.tracking.uri)
    assert {f.path for f in client.list_artifacts(tracker.run_id, "eval")} == {
        "eval/grid.png", "eval/images", "eval/scores.json"}
    assert {f.path for f in client.list_artifacts(tracker.run_id, "eval/images")} == {
        f"eval/images/{kind}_{i}.png" for kind in ("base", "lora") for i in range(n)}
    logged = client.get_run(tracker.run_id).data.metrics
    assert logged == pytest.approx(metrics)
    assert client.get_run(tracker.run_id).data.tags["clip_scorer"] == "smoke test: random CLIP"
    assert metrics["eval/clip_random"] == 1.0
    assert Image.open(out_dir / "grid.png").size == grid_layout((64, 64), n).size


def test_evaluate_without_heldout_images_skips_the_loss_and_style(tmp_path, store, caplog):
    cfg = eval_config(store, prompts=["a cat"], seeds=[0], steps=1)
    components, lora_file = trained_tiny(cfg, tmp_path)
    data = LoadedData(train=[], heldout=[], skipped=[], source="test")
    with caplog.at_level(logging.WARNING, logger="sdxl_ablate.evaluate"):
        with Tracker(cfg.tracking, "study", "variant") as tracker:
            metrics = evaluate(components, lora_file, data, cfg, torch.device("cpu"), tracker, tmp_path / "eval")
            tracker.set_status("ok")
    assert set(metrics) == {"eval/clip_text", "eval/clip_text_base", "eval/clip_text_lift", "eval/clip_text_se",
                            "eval/clip_text_base_se", "eval/clip_text_lift_se", "eval/clip_random"}
    assert "no held-out images" in caplog.text


# --------------------------------------------------------------------------- half precision
# What CUDA gets: the UNet and text encoders in the training precision, the VAE in fp32.
# Emulated on the CPU with bf16.


@pytest.fixture
def half_precision(monkeypatch):
    monkeypatch.setattr(evaluate_module, "inference_dtype", lambda cfg, device: torch.bfloat16)


def test_a_half_precision_pipeline_decodes_with_the_fp32_vae(tmp_path, half_precision):
    cfg = eval_config(tmp_path, prompts=["a cat"], seeds=[0], steps=1)  # tracks nothing
    pipe = inference_pipeline(build_tiny(0), cfg, torch.device("cpu"))
    assert (pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    (image,) = generate(pipe, [("a cat", 0)], cfg.eval, 64)
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_the_lora_loads_into_a_half_precision_pipeline(tmp_path, half_precision):
    cfg = eval_config(tmp_path)  # tracks nothing
    components, lora_file = trained_tiny(cfg, tmp_path)
    remove_adapters(components)
    load_lora(inference_pipeline(components, cfg, torch.device("cpu")), lora_file)


def test_fp8_base_weights_become_plain_layers_with_the_same_output():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 64, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 64))
    model.requires_grad_(False)
    assert store_base_weights_fp8(model, torch.float32, min_params=16) > 0
    x = torch.randn(2, 8, 4, 4)
    expected = model(x)
    dequantize_base_weights(model, torch.float32)
    assert [type(m) for m in model] == [torch.nn.Conv2d, torch.nn.Flatten, torch.nn.Linear]
    assert model[0].weight.dtype == torch.float32 and not hasattr(model[0], "weight_scale")
    assert torch.allclose(model(x), expected, atol=1e-5)
