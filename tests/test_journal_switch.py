"""Issue 18: after the first failed call to the tracking store, a run never asks it again."""

from __future__ import annotations

from PIL import Image

from sdxl_ablate.config import TrackingConfig
from sdxl_ablate.track import journal


class DeadStore:
    """A Tracker whose store died after the run was opened: every call fails, and is counted."""

    calls = 0

    def __init__(self, *args, **kwargs):
        self.run_id = "0" * 32

    def __enter__(self):
        return self

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            DeadStore.calls += 1
            raise ConnectionError("the tracking server is gone")
        return fail


def test_one_failure_switches_the_run_to_the_journal_for_good(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "Tracker", DeadStore)
    with journal.JournalingTracker(TrackingConfig(uri="http://127.0.0.1:9"), "e", "r", tmp_path) as t:
        t.log_metrics({"train/loss": 1.0}, step=0)
        assert DeadStore.calls == 1 and t.failure
        for step in range(1, 5):
            t.log_metrics({"train/loss": 1.0}, step=step)
        t.log_params({"lora.rank": 4})
        t.set_tags({"a": "b"})
        t.log_text("x", "x.txt")
        t.log_image(Image.new("RGB", (4, 4)), "sample", 0)
        (tmp_path / "f.txt").write_text("f")
        t.log_artifact(tmp_path / "f.txt")
        t.set_status("ok")
    assert DeadStore.calls == 1  # not once more per later call, nor at the close
    ops = [line.split('"op": "')[1].split('"')[0] for line in journal.journal_path(tmp_path).read_text().splitlines()]
    assert ops.count("open") == 1 and ops.count("log_metrics") == 5 and ops[-1] == "close", ops
