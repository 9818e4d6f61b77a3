"""Files that survive a crash: written and fsynced, or replaced whole (write, then rename).

Checkpoints (train/checkpoint.py), the run and result records a sweep picks up from
(run/pickup.py) and the replay's progress (track/replay.py) are all read back after a kill;
each goes through here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durably(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, sort_keys=True)  # floats round-trip exactly (repr); nan/inf allowed
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename: readers see the old file or the new one, never half of one, and two
    processes writing the same file at once cannot clash (each writes its own temporary file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, sort_keys=True))  # floats round-trip exactly (repr)
