"""Issue 12: the latent cache when workers start together, and keyed by the model's weights."""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import torch
from PIL import Image

from sdxl_ablate.data import precompute
from sdxl_ablate.config import to_typed
from sdxl_ablate.data.datasets import Example
from sdxl_ablate.model.sdxl import build_tiny
from sdxl_ablate.data.precompute import build_cache, cache_key

from .conftest import compose_config, tiny_overrides


def _examples(n: int = 3) -> list[Example]:
    return [Example(Image.new("RGB", (64, 64), (40 * i, 90, 200 - 40 * i)), f"caption {i}") for i in range(n)]


def test_two_workers_starting_together_encode_once(tmp_path, monkeypatch):
    cfg = to_typed(compose_config(tiny_overrides(tmp_path)))
    components = build_tiny()
    encode = components.vae.encode
    calls = []

    def slow_encode(x):  # long enough that the second worker arrives while the first encodes
        calls.append(threading.get_ident())
        time.sleep(0.5)
        return encode(x)

    components.vae.encode = slow_encode
    saved = []
    real_save = precompute.save_cache
    monkeypatch.setattr(precompute, "save_cache", lambda cache, f: (saved.append(str(f)), real_save(cache, f)))
    precompute._MEMORY.clear()
    barrier, results = threading.Barrier(2), []

    def worker():
        barrier.wait()
        results.append(build_cache(cfg, components, _examples(), False, torch.float32, cache_dir=tmp_path / "c",
                                   batch_size=8))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2 and len(calls) == 1  # 3 images, one batch, encoded by one worker only
    a, b = results
    for x, y in zip(a.items, b.items):
        assert torch.equal(x[0].mean, y[0].mean) and torch.equal(x[0].std, y[0].std)
    # One write, through a temp name unique across hosts: <file>.<host>.<pid>.<8 hex>.tmp
    assert len(saved) == 1
    name = os.path.basename(saved[0])
    assert re.fullmatch(rf"[0-9a-f]{{24}}\.safetensors\.{re.escape(socket.gethostname())}\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp",
                        name), name
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert [f for f in files if f.endswith(".safetensors")] and not [f for f in files if f.endswith(".tmp")]


def _local_model(root):
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text("{}")
    (root / "model_index.json").write_text("{}")
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"a" * 100)
    (root / "text_encoder" / "model.safetensors").write_bytes(b"t" * 100)
    return root


def test_cache_key_follows_the_weights_of_a_local_model_directory(tmp_path):
    model = _local_model(tmp_path / "model")
    cfg = to_typed(compose_config(tiny_overrides(tmp_path, "model=sdxl_base", f"model.pretrained={model}")))
    ex = _examples(2)
    key = lambda prompts: cache_key(cfg, ex, prompts, torch.float32)
    before, before_prompts = key(False), key(True)
    assert key(False) == before  # stable while nothing changes

    # A retrained text encoder: a new key only where the prompts are cached.
    (model / "text_encoder" / "model.safetensors").write_bytes(b"u" * 101)
    assert key(False) == before and key(True) != before_prompts

    # A changed VAE under the same path and same size: the mtime changes, so does the key.
    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    st = vae.stat()
    vae.write_bytes(b"b" * 100)
    os.utime(vae, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert key(False) != before
    # The UNet is not an input of the cache: changing it keeps the key.
    now = key(False)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 10)
    assert key(False) == now


def test_cache_key_of_a_hub_model_is_its_cached_commit(tmp_path, monkeypatch):
    cfg = to_typed(compose_config(tiny_overrides(tmp_path, "model=sdxl_base", "model.pretrained=org/sdxl")))
    commit = {"value": "a" * 40}
    seen = []

    def fake_cache_lookup(repo, filename, revision=None):
        seen.append((repo, filename, revision))
        return f"/hub/models--org--sdxl/snapshots/{commit['value']}/{filename}"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake_cache_lookup)
    first = cache_key(cfg, _examples(1), False, torch.float32)
    commit["value"] = "b" * 40  # the branch moved and the new snapshot was downloaded
    assert cache_key(cfg, _examples(1), False, torch.float32) != first
    assert seen[0] == ("org/sdxl", "model_index.json", None)
