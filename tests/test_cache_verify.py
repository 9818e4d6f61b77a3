"""Issue 18: a bad latent-cache file is named, moved aside, rebuilt, and the run goes on."""

from __future__ import annotations

import json
import logging
import struct

import pytest
import torch
from PIL import Image

from sdxl_ablate.config import to_typed
from sdxl_ablate.data import precompute
from sdxl_ablate.data.datasets import Example
from sdxl_ablate.data.precompute import build_cache
from sdxl_ablate.model.sdxl import build_tiny

from .conftest import compose_config, tiny_overrides


def _examples(n: int = 3) -> list[Example]:
    return [Example(Image.new("RGB", (64, 64), (40 * i, 90, 200 - 40 * i)), f"caption {i}") for i in range(n)]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_nan(path):
    """NaN bytes over the first float of one posterior, in place: the file still parses."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start = 8 + n + header["item.1.0.mean"]["data_offsets"][0]
    assert header["item.1.0.mean"]["dtype"] == "F32"
    data[start : start + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,reason", [(_truncate, "unreadable"), (_write_nan, "item.1.0.mean: non-finite")])
def test_a_bad_cache_file_is_moved_aside_and_rebuilt(tmp_path, caplog, damage, reason):
    cfg = to_typed(compose_config(tiny_overrides(tmp_path)))
    components = build_tiny()
    build = lambda d: build_cache(cfg, components, _examples(), True, torch.float32, cache_dir=d, batch_size=8)

    precompute._MEMORY.clear()
    fresh = build(tmp_path / "fresh")
    precompute._MEMORY.clear()
    build(tmp_path / "c")
    (path,) = (tmp_path / "c").glob("*.safetensors")
    damage(path)
    original_bad = path.read_bytes()

    precompute._MEMORY.clear()  # a later run: a new process reads the disk
    with caplog.at_level(logging.WARNING, logger="sdxl_ablate.data.precompute"):
        repaired = build(tmp_path / "c")

    # Named in one warning, kept for inspection under <file>.bad-<timestamp>, and rebuilt.
    (aside,) = (tmp_path / "c").glob(f"{path.name}.bad-*")
    assert aside.read_bytes() == original_bad
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(path) in warning and reason in warning and str(aside) in warning
    assert path.is_file() and precompute.cache_problem(precompute.load_cache(path), cfg, _examples(), True) is None

    # Training sees exactly the latents of a fresh build, from memory and from the rebuilt file.
    precompute._MEMORY.clear()
    reread = build(tmp_path / "c")
    for cache in (repaired, reread):
        assert len(cache.items) == len(fresh.items)
        for a, b in zip(cache.items, fresh.items):
            assert torch.equal(a[0].mean, b[0].mean) and torch.equal(a[0].std, b[0].std)
        assert cache.prompt_embeds.keys() == fresh.prompt_embeds.keys()
        for k, (e, p) in fresh.prompt_embeds.items():
            assert torch.equal(cache.prompt_embeds[k][0], e) and torch.equal(cache.prompt_embeds[k][1], p)
    assert len(list((tmp_path / "c").glob("*.bad-*"))) == 1  # the good rebuilt file is not moved again


def test_a_cache_for_other_examples_is_not_used(tmp_path):
    """A cache whose image count does not match the examples (e.g. a file copied over by hand) is unfit."""
    cfg = to_typed(compose_config(tiny_overrides(tmp_path)))
    components = build_tiny()
    precompute._MEMORY.clear()
    small = build_cache(cfg, components, _examples(2), False, torch.float32, cache_dir=tmp_path / "a")
    assert precompute.cache_problem(small, cfg, _examples(3), False) == "2 images, expected 3"
