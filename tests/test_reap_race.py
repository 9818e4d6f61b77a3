"""Closing what a dead process left RUNNING, without closing what a live one just finished.

A search for RUNNING runs is a snapshot: a run (or a sweep's parent) can finish and its process
exit between that search and the check of its process. Both reapers re-read the run once they
know its process is gone, and leave a run that is no longer RUNNING alone."""

from __future__ import annotations

import socket
import subprocess
import sys
from types import SimpleNamespace

from sdxl_ablate.run import pickup, sweep


class StaleClient:
    """search_runs answers from before the run finished; get_run answers now."""

    def __init__(self, run_id: str, tags: dict[str, str], now: str):
        self.run = SimpleNamespace(info=SimpleNamespace(run_id=run_id, status="RUNNING", run_name="x"),
                                   data=SimpleNamespace(tags=tags))
        self.now, self.writes = now, []

    def search_runs(self, *args, **kwargs):
        return [self.run]

    def get_run(self, run_id):
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=self.now), data=self.run.data)

    def set_tag(self, *args):
        self.writes.append(("set_tag", *args))

    def set_terminated(self, *args, **kwargs):
        self.writes.append(("set_terminated", *args))

    def log_batch(self, *args, **kwargs):
        self.writes.append(("log_batch", *args))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_variant_run_that_finished_after_the_search_is_not_marked_killed(tmp_path):
    lock_dir = tmp_path / "ckpt"
    lock_dir.mkdir()
    (lock_dir / pickup.LOCK).touch()  # free: its process let go of it
    for now, expect_killed in (("FINISHED", False), ("RUNNING", True)):
        client = StaleClient("r1", {pickup.DIR_TAG: str(lock_dir)}, now)
        killed = pickup.reap_dead_runs(client, "0", None, "other", tmp_path / "mine")
        assert (killed == ["r1"]) is expect_killed
        assert bool(client.writes) is expect_killed, client.writes


def test_a_sweep_parent_closed_after_the_search_is_not_marked_killed(monkeypatch):
    tags = {"kind": "sweep", "host": socket.gethostname(), "pid": str(_dead_pid()), "sweep_id": "s", "n_jobs": "2"}
    client = StaleClient("p1", tags, "FINISHED")
    monkeypatch.setattr(sweep, "close_parent", lambda *a, **k: client.writes.append("close_parent"))
    monkeypatch.setattr(sweep, "tally", lambda *a, **k: {})
    assert sweep.close_dead_parents(client, "0", "other") == [] and client.writes == []
    client.now = "RUNNING"  # really left RUNNING by the dead process
    assert sweep.close_dead_parents(client, "0", "other") == ["p1"] and client.writes == ["close_parent"]
