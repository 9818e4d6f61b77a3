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
