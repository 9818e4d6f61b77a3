"""Tests of sdxl_ablate.data.datasets: sources, skipping of bad images, splits, transforms, caption dropout."""

import json
import logging
import os
import random
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from sdxl_ablate.config import Crop, DataConfig, DataSource
from sdxl_ablate.data.datasets import (
    DataError,
    ImageTransform,
    load_data,
    make_sample_dataset,
    pick_caption,
    sample_dataset_dir,
)


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """Offline, with both our cache and the `datasets` cache under tmp_path."""
    monkeypatch.setenv("SDXL_ABLATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # `datasets` reads its cache location at import; an empty cache also means a hub
    # dataset cached on this machine cannot make the offline test pass by accident.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def sample_cfg(**kw) -> DataConfig:
    return DataConfig(source=DataSource.sample, resolution=64, **{"sample_size": 8, "heldout": 2, **kw})


def write_folder(root: Path, files: dict[str, bytes | Image.Image], metadata: bool = True) -> Path:
    """An imagefolder: `files` in order, with captions "caption <name>" in metadata.jsonl."""
    root.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, Image.Image):
            content.save(root / name)
        else:
            (root / name).write_bytes(content)
    if metadata:
        rows = [json.dumps({"file_name": name, "text": f"caption {name}"}) for name in files]
        (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def solid(color: str, size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def folder_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(source=DataSource.folder, path=str(path), **{"heldout": 0, **kw})


def metadata_captions(root: Path) -> list[str]:
    return [json.loads(line)["text"] for line in (root / "metadata.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- sample dataset


def test_sample_dataset_is_deterministic_and_idempotent(tmp_path):
    a = make_sample_dataset(tmp_path / "a", n=6, size=96, seed=3)
    b = make_sample_dataset(tmp_path / "b", n=6, size=96, seed=3)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert len([f for f in files if f.endswith(".png")]) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)

    other = make_sample_dataset(tmp_path / "c", n=6, size=96, seed=4)
    assert (other / "sample_0000.png").read_bytes() != (a / "sample_0000.png").read_bytes()

    # Reused as is: nothing is rewritten.
    stamps = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    make_sample_dataset(a, n=6, size=96, seed=3)
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == stamps

    # A different spec in the same folder replaces it, leaving no stale images behind.
    make_sample_dataset(a, n=3, size=96, seed=3)
    assert sorted(p.name for p in a.glob("*.png")) == [f"sample_{i:04d}.png" for i in range(3)]
    assert metadata_captions(a) == metadata_captions(b)[:3]


def test_sample_images_share_a_style_and_captions_describe_them(tmp_path):
    root = make_sample_dataset(tmp_path / "s", n=8, size=64)
    captions = metadata_captions(root)
    assert len(set(captions)) == 8  # content varies per image
    assert all("-haired character with" in c and " eyes" in c for c in captions)
    for p in root.glob("*.png"):
        img = Image.open(p)
        assert img.mode == "RGB" and img.size == (64, 64)
        assert (0, 0, 0) in {c for _, c in img.getcolors(64 * 64)}  # the black outlines


def test_sample_source_loads_with_counts_and_captions():
    cfg = sample_cfg()
    data = load_data(cfg)
    root = sample_dataset_dir(cfg)
    assert data.source == f"sample:{root}"
    assert root.parent == Path(os.environ["SDXL_ABLATE_CACHE"])
    captions = metadata_captions(root)
    assert [e.caption for e in data.train] == captions[:6]
    assert [e.caption for e in data.heldout] == captions[6:]
    assert data.skipped == []
    assert all(e.image.mode == "RGB" and e.image.size == (64, 64) for e in data.train + data.heldout)


# --------------------------------------------------------------------------- folder source


def test_folder_skips_a_corrupt_image(tmp_path):
    files = {"good.png": solid("red"), "bad.png": os.urandom(300), "also.png": solid("blue")}
    root = write_folder(tmp_path / "f", files)
    data = load_data(folder_cfg(root))
    assert data.source == f"folder:{root.resolve()}"
    assert [e.caption for e in data.train] == ["caption good.png", "caption also.png"]
    assert data.train[0].image.getpixel((0, 0)) == (255, 0, 0)
    assert data.heldout == []
    assert len(data.skipped) == 1 and "bad.png" in data.skipped[0]


def test_folder_heldout_skips_corrupt_images_too(tmp_path):
    files = {"a.png": solid("red"), "b.png": solid("green"), "c.png": solid("blue"), "d.png": b"not an image"}
    data = load_data(folder_cfg(write_folder(tmp_path / "f", files), heldout=1))
    assert [e.caption for e in data.heldout] == ["caption c.png"]  # last *readable* image
    assert [e.caption for e in data.train] == ["caption a.png", "caption b.png"]
    assert len(data.skipped) == 1 and "d.png" in data.skipped[0]


def test_bad_metadata_rows_are_skipped_and_listed_by_line_and_file(tmp_path):
    root = write_folder(tmp_path / "f", {"a.png": solid("red"), "b.png": solid("blue")})
    rows = [{"file_name": "a.png", "text": "A"}, {"text": "no file"}, {"file_name": 7, "text": "number"},
            {"file_name": "gone.png", "text": "missing"}, {"file_name": "b.png", "text": "B"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_data(folder_cfg(root))
    assert [e.caption for e in data.train] == ["A", "B"]
    assert len(data.skipped) == 3
    no_name, not_str, missing = data.skipped
    assert "metadata.jsonl line 2" in no_name and "no file_name" in no_name
    assert "metadata.jsonl line 3" in not_str and "file_name 7 is not a string" in not_str
    assert "metadata.jsonl line 4" in missing and "gone.png" in missing and "no such file" in missing


def test_images_the_metadata_does_not_list_are_counted_in_one_warning(tmp_path, caplog):
    files = {"a.png": solid("red"), "b.png": solid("blue"), "c.png": solid("green"), "d.png": solid("white")}
    root = write_folder(tmp_path / "f", files)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "B"}) + "\n")
    with caplog.at_level("WARNING", logger="sdxl_ablate.data.datasets"):
        data = load_data(folder_cfg(root))
    assert [e.caption for e in data.train] == ["B"] and data.skipped == []
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "3 images are not listed in metadata.jsonl" in warning and "a.png, c.png, d.png" in warning


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_a_16_bit_grey_image_is_scaled_not_clipped(tmp_path, mode):
    grey = Image.new(mode, (40, 30), 32768)  # mid-grey of 0..65535
    name = "g.png" if mode == "I;16" else "g.tif"  # PNG reopens as I;16 only; TIFF keeps the mode
    root = tmp_path / "f"
    root.mkdir()
    grey.save(root / name)
    assert Image.open(root / name).mode == mode
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "grey"}) + "\n")
    data = load_data(folder_cfg(root))
    assert data.train[0].image.getpixel((0, 0)) == (128, 128, 128)
    pixels, _, _ = ImageTransform(32, Crop.center, flip=False)(data.train[0].image, random.Random(0))
    assert torch.allclose(pixels, torch.full_like(pixels, 128 / 255 * 2 - 1), atol=1e-6)  # mid-grey in [-1, 1]


@pytest.mark.parametrize("case", ["missing", "file", "no_metadata", "no_images"])
def test_folder_problems_name_the_path(tmp_path, case):
    path = tmp_path / "data"
    if case == "file":
        path.write_text("x")
    elif case == "no_metadata":
        write_folder(path, {"a.png": solid("red")}, metadata=False)
    elif case == "no_images":
        write_folder(path, {"notes.txt": b"hello"})
    with pytest.raises(DataError) as err:
        load_data(folder_cfg(path))
    msg = str(err.value)
    assert str(path) in msg and "metadata.jsonl" in msg
    if case == "no_metadata":
        assert "no metadata" in msg


def test_folder_source_without_a_path_is_an_error():
    with pytest.raises(DataError, match="needs data.path"):
        load_data(DataConfig(source=DataSource.folder))


def test_wrong_caption_column_lists_the_columns(tmp_path):
    root = write_folder(tmp_path / "f", {"a.png": solid("red")})
    with pytest.raises(DataError, match=r"'caption'.*\['image', 'text'\]"):
        load_data(folder_cfg(root, caption_column="caption"))
    with pytest.raises(DataError, match=r"'img'.*\['image', 'text'\]"):
        load_data(folder_cfg(root, image_column="img"))
    # An instance prompt needs no caption column.
    data = load_data(folder_cfg(root, caption_column="caption", instance_prompt="sks style"))
    assert [e.caption for e in data.train] == ["sks style"]


def test_hub_offline_names_the_dataset_and_the_offline_options():
    with pytest.raises(DataError) as err:
        load_data(DataConfig(source=DataSource.hub))
    msg = str(err.value)
    assert "lambdalabs/naruto-blip-captions" in msg
    assert "data=folder" in msg and "data=sample" in msg


# --------------------------------------------------------------------------- splits


def test_limit_heldout_and_instance_prompt_give_exact_counts():
    cfg = sample_cfg(sample_size=10, heldout=3, limit=4)
    captions = metadata_captions(make_sample_dataset(sample_dataset_dir(cfg), n=10, size=64))
    data = load_data(cfg)
    assert [e.caption for e in data.train] == captions[:4]
    assert [e.caption for e in data.heldout] == captions[7:]

    data = load_data(sample_cfg(sample_size=10, heldout=0, limit=20, instance_prompt="naruto style"))
    assert len(data.train) == 10 and data.heldout == []
    assert {e.caption for e in data.train} == {"naruto style"}

    data = load_data(sample_cfg(sample_size=5, heldout=2, instance_prompt="naruto style"))
    assert len(data.train) == 3 and [e.caption for e in data.heldout] == ["naruto style"] * 2


def test_limit_leaves_images_past_it_unread(tmp_path):
    files = {"a.png": solid("red"), "b.png": b"corrupt", "c.png": solid("blue")}
    data = load_data(folder_cfg(write_folder(tmp_path / "f", files), limit=1, heldout=1))
    assert [e.caption for e in data.train] == ["caption a.png"]
    assert [e.caption for e in data.heldout] == ["caption c.png"]
    assert data.skipped == []


def test_no_training_images_left_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"4 rows, 0 unreadable, 4 held out"):
        load_data(sample_cfg(sample_size=4, heldout=4))
    root = write_folder(tmp_path / "f", {"a.png": b"junk", "b.png": b"junk"})
    with pytest.raises(DataError, match=r"2 rows, 2 unreadable, 0 held out"):
        load_data(folder_cfg(root))


# --------------------------------------------------------------------------- transforms


def test_transform_shape_range_and_center_crop_coordinates():
    # Left half black, right half white: the output must reach both ends of [-1, 1].
    img = Image.new("RGB", (200, 100), "black")
    img.paste((255, 255, 255), (100, 0, 200, 100))
    pixels, original, top_left = ImageTransform(64, Crop.center, flip=False)(img, random.Random(0))
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    assert original == (100, 200)
    assert top_left == (0, 32)  # resized to 64 x 128 (h x w), centre column window

    tall = solid("gray", (100, 300))
    _, original, top_left = ImageTransform(64, Crop.center, flip=False)(tall, random.Random(0))
    assert original == (300, 100) and top_left == (64, 0)  # resized to 192 x 64


def gradient(w: int, h: int) -> Image.Image:
    """Every column a different colour, so crops and flips are distinguishable."""
    x = (torch.arange(w) % 256).to(torch.uint8)
    chw = torch.stack([x.expand(h, w), x.flip(0).expand(h, w), torch.full((h, w), 128, dtype=torch.uint8)])
    return TF.to_pil_image(chw)


def resized_reference(img: Image.Image, res: int) -> torch.Tensor:
    """The whole image resized as the transform does, before cropping, in [-1, 1]."""
    x = TF.resize(TF.pil_to_tensor(img), [res], antialias=True)
    return TF.to_dtype(x, torch.float32, scale=True) * 2 - 1


def test_random_crop_is_reproducible_and_matches_its_coordinates():
    img = gradient(240, 80)
    t = ImageTransform(32, Crop.random, flip=False)
    a = t(img, random.Random(7))
    b = t(img, random.Random(7))
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    lefts = {t(img, random.Random(seed))[2][1] for seed in range(20)}
    assert len(lefts) > 1 and all(0 <= left <= 96 - 32 for left in lefts)

    resized = resized_reference(img, 32)
    pixels, _, (top, left) = a
    assert top == 0
    assert torch.equal(pixels, resized[:, top : top + 32, left : left + 32])


def test_flip_mirrors_pixels_and_measures_the_crop_on_the_flipped_image():
    img = gradient(240, 80)
    resized = resized_reference(img, 32)
    flipped_resized = torch.flip(resized, dims=[-1])
    plain, flip = ImageTransform(32, Crop.random, flip=False), ImageTransform(32, Crop.random, flip=True)
    seen = set()
    for seed in range(20):
        ref, _, (_, ref_left) = plain(img, random.Random(seed))
        out, _, (top, left) = flip(img, random.Random(seed))
        mirrored = not torch.equal(out, ref)
        seen.add(mirrored)
        if mirrored:
            assert torch.equal(out, torch.flip(ref, dims=[-1]))
            assert left == 96 - ref_left - 32
            assert torch.equal(out, flipped_resized[:, top : top + 32, left : left + 32])
        else:
            assert left == ref_left
    assert seen == {True, False}  # both outcomes of the coin occur over 20 seeds


# --------------------------------------------------------------------------- captions


def test_caption_dropout_frequency():
    rng = random.Random(0)
    assert all(pick_caption("a cat", 0.0, rng) == "a cat" for _ in range(1000))
    assert all(pick_caption("a cat", 1.0, rng) == "" for _ in range(1000))
    rng = random.Random(1)
    dropped = sum(pick_caption("a cat", 0.5, rng) == "" for _ in range(1000))
    assert 450 <= dropped <= 550
