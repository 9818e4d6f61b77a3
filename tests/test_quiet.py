"""The terminal's known noise is filtered by its own text, and nothing else is (track/quiet.py)."""

from __future__ import annotations

import logging
import subprocess
import sys

from sdxl_ablate.track.quiet import BITSANDBYTES_CPU_LOGGER, no_transformers_bars


def test_importing_the_trainer_prints_no_bitsandbytes_kernels_warning_but_other_warnings_pass(caplog):
    # A fresh interpreter: the warning comes once, when bitsandbytes is first imported.
    p = subprocess.run([sys.executable, "-c", "import sdxl_ablate.run.runner, bitsandbytes"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "pip install kernels" not in p.stdout + p.stderr
    import sdxl_ablate.track  # noqa: F401  (installs the filter)

    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BITSANDBYTES_CPU_LOGGER):
        logger.warning("Failed to load CPU gemm_4bit_forward: x. Please make sure you already `pip install kernels`")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_transformers_bars_are_off_only_inside_the_block():
    from transformers.utils import logging as tlog

    assert tlog.is_progress_bar_enabled()
    with no_transformers_bars():
        assert not tlog.is_progress_bar_enabled()
    assert tlog.is_progress_bar_enabled()


def test_a_variant_says_one_line_when_it_starts_and_one_when_it_ends(tmp_path, caplog):
    """What a sweep prints per variant at the default level: the start (pickup's decision, with the
    config hash) and the end (status, loss, peak memory); the routine steps in between (data
    counts, base model, latent cache, checkpoints) are DEBUG, and nothing warns."""
    from sdxl_ablate.config import to_typed
    from sdxl_ablate.run import runner

    from .conftest import compose_config, tiny_overrides

    cfg = to_typed(compose_config(tiny_overrides(tmp_path, "study=quiet", "trainer.checkpoint_every=1")))
    with caplog.at_level(logging.INFO, logger="sdxl_ablate"):
        assert runner.run(cfg, "attn", tmp_path / "out") is not None
    ours = [r for r in caplog.records if r.name.startswith("sdxl_ablate") and r.levelno >= logging.INFO]
    assert [r.levelno for r in ours] == [logging.INFO, logging.INFO], [r.getMessage() for r in ours]
    start, end = (r.getMessage() for r in ours)
    assert start.startswith("variant attn (config hash ") and "no earlier run" in start
    assert end.startswith("variant attn: ok, final loss ") and "GiB (CPU RSS)" in end and "{" not in end


def test_a_local_image_folder_draws_no_download_bar(tmp_path, capsys):
    """A folder with csv metadata goes through datasets' imagefolder, which would draw
    "Downloading data" and "Generating train split" bars for files already on disk."""
    from PIL import Image

    from datasets.utils import logging as dlog

    from sdxl_ablate.config import to_typed
    from sdxl_ablate.data.datasets import load_data

    from .conftest import compose_config

    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = ["file_name,text"]
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,caption {i}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    cfg = to_typed(compose_config(["model=tiny", "data=folder", f"data.path={folder}", "data.heldout=1",
                                   "data.resolution=64", f"trainer.cache_dir={tmp_path}/cache"]))
    assert dlog.is_progress_bar_enabled()
    data = load_data(cfg.data)
    assert len(data.train) == 2 and len(data.heldout) == 1
    err = capsys.readouterr().err
    assert "Downloading" not in err and "Generating" not in err, err
    assert dlog.is_progress_bar_enabled()  # given back as it was
