"""Training data: load captioned images (hub, local folder, or a generated sample) and turn
them into SDXL training tensors.

Every source goes through `datasets`; images are decoded here rather than by `datasets`,
so one unreadable file is skipped and reported instead of aborting a run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.exceptions import DatasetsError
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from sdxl_ablate.config import Crop, DataConfig, DataSource, cache_root
from sdxl_ablate.track.quiet import no_datasets_bars

log = logging.getLogger(__name__)

_OFFLINE_HINT = (
    "offline, use a local copy instead: data=folder data.path=<folder with images and "
    "metadata.jsonl>, or data=sample for the generated sample dataset"
)


class DataError(ValueError):
    """Data that cannot be loaded; the message names the bad value and what is accepted."""


@dataclass
class Example:
    image: Image.Image  # RGB, decoded
    caption: str


@dataclass
class LoadedData:
    train: list[Example]
    heldout: list[Example]  # the last `heldout` readable images; never trained on
    skipped: list[str]  # one line per unreadable image: which one and why
    source: str  # "sample:/path", "folder:/path" or "hub:<dataset id>"


# Reference images when nothing is held out (data.heldout=0, as the write-ups train on every image).
TRAINED_REFERENCE_IMAGES = 4


def reference_set(data: LoadedData, heldout: int) -> tuple[list[Example], bool]:
    """The images the evaluation's held-out loss and style score use, and whether they were
    trained on. With data.heldout=0 these are the last few training images, with a warning: the
    numbers then measure fit to the training set, not generalisation."""
    if data.heldout:
        return data.heldout, False
    if heldout > 0 or not data.train:  # a hold-out was asked for but none is readable: no reference
        log.warning("no held-out images (data.heldout=%d): no held-out loss, no clip_style", heldout)
        return [], False
    reference = data.train[-TRAINED_REFERENCE_IMAGES:]
    log.warning("data.heldout=%d: nothing is held out, so the held-out loss and clip_style use the last %d "
                "TRAINING images (tag eval.reference=train): they measure fit, not generalisation",
                heldout, len(reference))
    return reference, True


# --------------------------------------------------------------------------- sample data

# Bump when the drawing changes, so cached sample folders of the old look are not reused.
_SAMPLE_VERSION = 1
_MARKER = ".sample.json"  # hidden: imagefolder ignores dot-files

# A fixed palette is part of the "style" the LoRA should pick up.
_HAIR = {"orange": (245, 140, 30), "blonde": (250, 215, 80), "black": (45, 45, 70),
         "pink": (240, 130, 175), "silver": (200, 205, 220), "red": (205, 45, 45)}
_EYES = {"blue": (40, 110, 230), "green": (40, 170, 90), "red": (210, 30, 40), "purple": (130, 70, 190)}
_OUTFIT = {"orange": (240, 120, 20), "black": (40, 40, 50), "green": (70, 120, 60), "blue": (50, 80, 160)}
_BACKGROUND = {"blue sky": (150, 200, 245), "forest": (120, 185, 100),
               "sunset": (250, 170, 110), "night sky": (35, 45, 95)}
_SKIN, _SKIN_SHADE = (250, 220, 180), (225, 180, 140)
_INK, _WHITE = (0, 0, 0), (255, 255, 255)
_EXPRESSIONS = ("smiling", "serious", "shouting")


def _draw_character(size: int, rng: random.Random) -> tuple[Image.Image, str]:
    """One cel-shaded character portrait (flat colours, thick black outlines) and its caption.

    All geometry is drawn in units of the image size, and the rng draws do not depend on
    `size`, so one seed gives the same content at every resolution.
    """
    hair, eyes, outfit, bg = (rng.choice(list(d)) for d in (_HAIR, _EYES, _OUTFIT, _BACKGROUND))
    expression = rng.choice(_EXPRESSIONS)
    headband, whiskers = rng.random() < 0.5, rng.random() < 0.4
    cx, cy, r = rng.uniform(0.4, 0.6), rng.uniform(0.48, 0.58), rng.uniform(0.2, 0.27)
    scenery = [(rng.uniform(0.0, 1.0), rng.uniform(0.05, 0.35), rng.uniform(0.04, 0.09)) for _ in range(3)]

    img = Image.new("RGB", (size, size), _BACKGROUND[bg])
    d = ImageDraw.Draw(img)
    w = max(1, round(size * 0.02))  # outline width: the thick ink line is part of the style

    def px(v: float) -> float:
        return v * size

    def disc(x: float, y: float, rad: float, fill: tuple[int, int, int], outline: bool = True) -> None:
        d.ellipse([px(x - rad), px(y - rad), px(x + rad), px(y + rad)], fill=fill,
                  outline=_INK if outline else None, width=w)

    # Scenery: clouds, trees or stars, plus a sun or moon.
    for x, y, s in scenery:
        if bg == "forest":
            d.polygon([(px(x), px(y - s)), (px(x - s), px(y + 2 * s)), (px(x + s), px(y + 2 * s))],
                      fill=(40, 110, 50), outline=_INK, width=w)
        elif bg == "night sky":
            disc(x, y, s / 6, (255, 250, 200), outline=False)
        else:
            disc(x, y, s, _WHITE)
    if bg in ("sunset", "night sky"):
        disc(0.82, 0.18, 0.09, (255, 230, 90) if bg == "sunset" else (240, 240, 210))

    # Shoulders, then spiky hair behind the head.
    d.polygon([(px(cx - 2 * r), px(1.02)), (px(cx - 1.1 * r), px(cy + 0.9 * r)),
               (px(cx + 1.1 * r), px(cy + 0.9 * r)), (px(cx + 2 * r), px(1.02))],
              fill=_OUTFIT[outfit], outline=_INK, width=w)
    spikes = []
    for k in range(15):  # alternate inner and outer radius over the upper ~2/3 of the head
        a = math.pi * (0.85 + 1.3 * k / 14)
        rad = r * (1.55 if k % 2 else 1.0)
        spikes.append((px(cx + rad * math.cos(a)), px(cy + rad * math.sin(a))))
    d.polygon(spikes, fill=_HAIR[hair], outline=_INK, width=w)

    # Face with a hard-edged shadow on its right side (cel shading), outline on top.
    box = [px(cx - r), px(cy - r), px(cx + r), px(cy + r)]
    d.ellipse(box, fill=_SKIN)
    d.chord(box, -70, 70, fill=_SKIN_SHADE)
    d.ellipse(box, outline=_INK, width=w)

    # Fringe over the forehead, then optionally a headband across it.
    d.chord(box, 190, 350, fill=_HAIR[hair], outline=_INK, width=w)
    if headband:
        top, bottom = cy - 0.62 * r, cy - 0.42 * r
        d.rectangle([px(cx - 0.97 * r), px(top), px(cx + 0.97 * r), px(bottom)],
                    fill=(40, 60, 140), outline=_INK, width=w)
        d.rectangle([px(cx - 0.3 * r), px(top - 0.03 * r), px(cx + 0.3 * r), px(bottom + 0.03 * r)],
                    fill=(190, 195, 205), outline=_INK, width=w)

    # Eyes: white, coloured iris, pupil and a highlight.
    for side in (-1, 1):
        ex, ey = cx + side * 0.38 * r, cy - 0.05 * r
        d.ellipse([px(ex - 0.2 * r), px(ey - 0.17 * r), px(ex + 0.2 * r), px(ey + 0.17 * r)],
                  fill=_WHITE, outline=_INK, width=w)
        disc(ex, ey, 0.12 * r, _EYES[eyes], outline=False)
        disc(ex, ey, 0.05 * r, _INK, outline=False)
        disc(ex - 0.05 * r, ey - 0.05 * r, 0.03 * r, _WHITE, outline=False)
        if whiskers:
            for k in (-1, 0, 1):
                y = cy + (0.3 + 0.1 * k) * r
                x0, x1 = px(cx + side * 0.55 * r), px(cx + side * 0.85 * r)
                d.line([x0, px(y), x1, px(y + 0.04 * k * r)], fill=_INK, width=w)

    mouth = [px(cx - 0.25 * r), px(cy + 0.35 * r), px(cx + 0.25 * r), px(cy + 0.7 * r)]
    if expression == "smiling":
        d.arc(mouth, 20, 160, fill=_INK, width=w)
    elif expression == "serious":
        y = px(cy + 0.55 * r)
        d.line([px(cx - 0.18 * r), y, px(cx + 0.18 * r), y], fill=_INK, width=w)
    else:
        d.ellipse(mouth, fill=(150, 30, 40), outline=_INK, width=w)

    parts = [f"a {expression} {hair}-haired character with {eyes} eyes and {outfit} clothes"]
    if headband:
        parts.append("wearing a headband")
    if whiskers:
        parts.append("with whisker marks on the cheeks")
    parts.append(f"in front of a {bg}")
    return img, ", ".join(parts)


def make_sample_dataset(root: Path, n: int = 16, size: int = 128, seed: int = 0) -> Path:
    """Writes `n` synthetic style images as a `datasets` imagefolder (PNGs + metadata.jsonl).

    Deterministic (same bytes for the same n/size/seed) and idempotent: a folder whose marker
    says it already holds exactly this dataset is reused as is.
    """
    root = Path(root)
    spec = {"n": n, "size": size, "seed": seed, "version": _SAMPLE_VERSION}
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("sample_*.png"):  # only our own names: never touch foreign files
        stale.unlink()
    # One rng for the whole set: the first k images are the same for every n >= k.
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        img, caption = _draw_character(size, rng)
        name = f"sample_{i:04d}.png"
        img.save(root / name)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    marker.write_text(json.dumps(spec))  # last: an interrupted write is regenerated next time
    return root


def sample_dataset_dir(cfg: DataConfig) -> Path:
    """Where the sample dataset for `cfg` lives. Its images are drawn at the training
    resolution, so they are never upscaled (a blurry sample would teach blur)."""
    return cache_root() / f"sample_n{cfg.sample_size}_{cfg.resolution}px_seed0_v{_SAMPLE_VERSION}"


# --------------------------------------------------------------------------- loading


def _env_offline() -> bool:
    return any(
        os.environ.get(var, "").upper() in datasets.config.ENV_VARS_TRUE_VALUES
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def _load_hub(cfg: DataConfig) -> datasets.Dataset:
    # `datasets` reads the offline variables once, at import; re-read them per call so that
    # offline mode set later in the process (a test's monkeypatch, a notebook) still holds.
    was_offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = was_offline or _env_offline()
    try:
        return datasets.load_dataset(cfg.name, split=cfg.split)
    except (ConnectionError, FileNotFoundError, ValueError, DatasetsError) as e:
        raise DataError(
            f"data.name={cfg.name!r} (split {cfg.split!r}): cannot load this hub dataset "
            f"({type(e).__name__}: {e}); {_OFFLINE_HINT}"
        ) from e
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline


def check_folder(path: Path) -> None:
    """Raises DataError naming the path unless it is a folder of images with a metadata file."""
    metadata = " or ".join(ImageFolder.METADATA_FILENAMES)
    needs = f"data=folder needs a folder of images with a metadata file ({metadata}; file_name, text)"
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DataError(f"data.path={str(path)!r} {what}; {needs}")
    files = [p for p in path.rglob("*") if p.is_file()]
    if not any(p.suffix.lower() in ImageFolder.EXTENSIONS for p in files):
        raise DataError(f"data.path={str(path)!r} holds no images (.png, .jpg, .webp, ...); {needs}")
    if not any(p.name in ImageFolder.METADATA_FILENAMES for p in files):
        raise DataError(f"data.path={str(path)!r} has no metadata file with the captions; {needs}")


def _load_folder(path: Path, split: str, skipped: list[str]) -> datasets.Dataset:
    """Checks the folder first, so a typo gives a message naming the path, not a `datasets` trace.

    A top-level metadata.jsonl is read here, row by row, so one bad row is skipped and listed
    in `skipped` (`datasets` would fail the whole folder, or hand on a row without an image);
    other layouts (csv/parquet metadata, split subfolders) go to `datasets`' imagefolder.
    """
    check_folder(path)
    if split == "train" and (path / "metadata.jsonl").is_file():
        return _read_jsonl_folder(path, skipped)
    try:
        with no_datasets_bars():  # a local folder: nothing is downloaded, whatever the bar says
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    except (FileNotFoundError, ValueError, DatasetsError) as e:
        raise DataError(f"data.path={str(path)!r} (split {split!r}): {type(e).__name__}: {e}") from e


_METADATA_ROW = '{"file_name": "<image, relative to data.path>", "text": "<caption>"}'


def _read_jsonl_folder(path: Path, skipped: list[str]) -> datasets.Dataset:
    """The rows of `path`/metadata.jsonl whose file_name names an existing file, as a dataset
    with an undecoded "image" column; each other row is skipped and listed by its line number."""
    metadata = path / "metadata.jsonl"
    rows: list[dict[str, Any]] = []
    for number, text in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        problem = None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            problem = f"not JSON ({e})"
        else:
            if not isinstance(row, dict):
                problem = "not a JSON object"
            elif "file_name" not in row:
                problem = "no file_name"
            elif not isinstance(name := row["file_name"], str):
                problem = f"file_name {name!r} is not a string"
            elif not (path / name).is_file():
                problem = f"file_name {name!r}: no such file {str(path / name)!r}"
        if problem is not None:
            line = f"{metadata} line {number} ({text.strip()[:80]}): {problem}; each line is {_METADATA_ROW}"
            log.warning("skipping metadata row %s", line)
            skipped.append(line)
            continue
        rows.append({"image": {"path": str((path / row.pop("file_name")).resolve()), "bytes": None}, **row})
    if not rows:
        raise DataError(f"{metadata}: no usable rows ({len(skipped)} skipped: {skipped[:3]}); each line is {_METADATA_ROW}")

    listed = {r["image"]["path"] for r in rows}
    unlisted = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                      if p.is_file() and p.suffix.lower() in ImageFolder.EXTENSIONS
                      and not any(part.startswith(".") for part in p.relative_to(path).parts)
                      and str(p.resolve()) not in listed)
    if unlisted:  # often a forgotten metadata line: say so, once, rather than train on less unnoticed
        log.warning("%s: %d images are not listed in metadata.jsonl and are not used, e.g. %s",
                    path, len(unlisted), ", ".join(unlisted[:5]))

    columns = list(dict.fromkeys(k for r in rows for k in r))  # every column, in first-seen order
    try:
        return datasets.Dataset.from_dict({c: [r.get(c) for r in rows] for c in columns})
    except (TypeError, ValueError, pa.ArrowException) as e:
        raise DataError(f"{metadata}: a column holds values of mixed types ({type(e).__name__}: {e})") from e


# 16-bit greyscale modes as PIL opens them (older PILs open a 16-bit PNG as "I"; "I" from a
# 32-bit TIFF is scaled the same way, its values above 65535 clipped).
_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I")


def _open_image(value: dict[str, Any] | None) -> Image.Image:
    """An undecoded `datasets.Image` value ({"bytes", "path"}) -> RGB image."""
    if not isinstance(value, dict):
        raise ValueError(f"no image in this row (got {value!r})")
    raw = value.get("bytes")
    with Image.open(io.BytesIO(raw) if raw is not None else value["path"]) as im:
        if im.mode in _MODES_16BIT:
            # PIL's convert("RGB") clips these to 255, turning a 16-bit image near-white:
            # scale 0..65535 onto 0..255 instead.
            grey = np.asarray(im, dtype=np.float64) * (255 / 65535)
            return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
        return im.convert("RGB")  # also forces the full decode inside the `with`


def load_data(cfg: DataConfig) -> LoadedData:
    """Loads the dataset `cfg` names, decodes its images and splits off the held-out images.

    Only the images that end up in `train` or `heldout` are decoded: with `limit`, the images
    between the first `limit` and the held-out tail are never read (and so never reported).
    """
    skipped: list[str] = []  # bad metadata rows (from the folder reader), then unreadable images
    if cfg.class_prompt is not None:
        log.warning("data.class_prompt=%r is recorded only: prior preservation (class images, a prior loss "
                    "term) is not implemented, so it does not change training", cfg.class_prompt)
    if cfg.source == DataSource.hub:
        ds, source = _load_hub(cfg), f"hub:{cfg.name}"
    elif cfg.source == DataSource.folder:
        if not cfg.path:
            raise DataError("data.source=folder needs data.path (a folder with images and metadata.jsonl)")
        path = Path(cfg.path).expanduser().resolve()
        ds, source = _load_folder(path, cfg.split, skipped), f"folder:{path}"
    else:
        path = make_sample_dataset(sample_dataset_dir(cfg), n=cfg.sample_size, size=cfg.resolution)
        ds, source = _load_folder(path, "train", skipped), f"sample:{path}"

    needed = {"data.image_column": cfg.image_column}
    if cfg.instance_prompt is None:
        needed["data.caption_column"] = cfg.caption_column
    for key, column in needed.items():
        if column not in ds.column_names:
            raise DataError(f"{key}={column!r} is not a column of {source}; its columns are {ds.column_names}")
    ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))

    def example(i: int) -> Optional[Example]:
        row = ds[i]
        value = row[cfg.image_column]
        try:
            image = _open_image(value)
        except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, ...) for bad files
            where = (value.get("path") or "embedded bytes") if isinstance(value, dict) else "no image"
            line = f"row {i} ({where}): {type(e).__name__}: {e}"
            log.warning("skipping unreadable image %s", line)
            skipped.append(line)
            return None
        caption = cfg.instance_prompt if cfg.instance_prompt is not None else row[cfg.caption_column]
        return Example(image, caption or "")

    # Held-out images first, from the end; then training images from the start up to them.
    heldout: list[Example] = []
    end = len(ds)
    while len(heldout) < cfg.heldout and end > 0:
        end -= 1
        if (ex := example(end)) is not None:
            heldout.insert(0, ex)
    train: list[Example] = []
    for i in range(end):
        if cfg.limit is not None and len(train) >= cfg.limit:
            break
        if (ex := example(i)) is not None:
            train.append(ex)

    if not train:
        raise DataError(
            f"{source}: no training images left: {len(ds)} rows, {len(skipped)} unreadable, "
            f"{len(heldout)} held out (data.heldout={cfg.heldout}); lower data.heldout or add images"
        )
    log.debug("%s: %d train, %d held out, %d skipped", source, len(train), len(heldout), len(skipped))
    return LoadedData(train=train, heldout=heldout, skipped=skipped, source=source)


# --------------------------------------------------------------------------- transforms


class ImageTransform:
    """PIL RGB image -> SDXL training pixels plus the micro-conditioning SDXL needs
    (original size and crop top-left), following diffusers' SDXL training scripts."""

    def __init__(self, resolution: int, crop: Crop, flip: bool, scale: float = 1.0):
        self.resolution = resolution
        self.crop = crop
        self.flip = flip
        # data.crop_scale: the shorter side is resized to resolution * scale, so a random crop of a
        # square image has room to move (at 1.0 it is the whole image, wherever it "starts").
        self.scale = scale

    def __call__(
        self, image: Image.Image, rng: random.Random
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """-> (pixels (3, res, res) float32 in [-1, 1], original (h, w), crop (top, left))."""
        res = self.resolution
        original_size = (image.height, image.width)
        x = TF.pil_to_tensor(image)
        x = TF.resize(x, [max(res, round(res * self.scale))], interpolation=InterpolationMode.BILINEAR, antialias=True)
        h, w = x.shape[-2:]
        if self.crop == Crop.random:
            top, left = rng.randint(0, h - res), rng.randint(0, w - res)
        else:  # same rounding as torchvision's center_crop
            top, left = int(round((h - res) / 2.0)), int(round((w - res) / 2.0))
        x = TF.crop(x, top, left, res, res)
        if self.flip and rng.random() < 0.5:
            x = TF.horizontal_flip(x)
            left = w - left - res  # SDXL convention: the crop as measured on the flipped image
        pixels = TF.to_dtype(x, torch.float32, scale=True) * 2.0 - 1.0
        return pixels, original_size, (top, left)


def pick_caption(caption: str, caption_dropout: float, rng: random.Random) -> str:
    """The caption, or "" with probability `caption_dropout` (keeps the unconditional
    prediction trained, which classifier-free guidance relies on)."""
    return "" if rng.random() < caption_dropout else caption
