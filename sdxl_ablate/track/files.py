"""Files that survive a crash: written and fsynced, or replaced whole (write, then rename).

Checkpoints (train/checkpoint.py), the run and result records a sweep picks up from
(run/pickup.py) and the replay's progress (track/replay.py) are all read back after a kill;
each goes through here.
"""

from __future__ import annotations

import json
import os
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


def atomic_write_json(path: Path, data: Any) -> None:
    """Write-then-rename: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_json_durably(tmp, data)
    os.replace(tmp, path)
    fsync_path(path.parent)
