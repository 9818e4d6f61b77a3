"""What the terminal need not show: three library messages that are noise here, each silenced by
name and nothing else (no logger or library is muted as a whole).

- bitsandbytes' CPU backend warns on import, on every command, that it could not fetch an
  optional faster 4-bit kernel ("pip install kernels"): nothing here uses 4-bit CPU kernels
  (8-bit Adam runs on CUDA). Only records carrying that text are dropped.
- datasets draws "Downloading data" and "Generating split" bars while it indexes a local image
  folder, where nothing is downloaded: `no_datasets_bars` turns them off around that call only.
- transformers draws a "Loading weights" bar when a LoRA is loaded into the text encoders at
  evaluation: a third bar beside training's and evaluation's own. `no_transformers_bars` turns
  transformers' bars off for the enclosed block only, and back to what they were.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class DropMessage(logging.Filter):
    """Drops the records whose message contains `text`; lets every other record through."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_known_noise() -> None:
    """Installs the message filters (idempotent); call before the libraries are imported."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, DropMessage) for f in logger.filters):
        logger.addFilter(DropMessage("pip install kernels"))


@contextlib.contextmanager
def no_transformers_bars() -> Iterator[None]:
    from transformers.utils import logging as tlog

    was_enabled = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            tlog.enable_progress_bar()


@contextlib.contextmanager
def no_datasets_bars() -> Iterator[None]:
    """datasets' bars ("Downloading data", "Generating train split") off for the enclosed block:
    used around a local image folder, where nothing is downloaded and indexing takes a moment
    (a hub download keeps its bar: there it is real progress)."""
    from datasets.utils import logging as dlog

    was_enabled = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            dlog.enable_progress_bar()
