"""Issue 18: a sweep's parent run always ends, whatever stops the sweep, and the exit code says
how. Real sweep processes, stopped by real signals (Ctrl-C, SIGTERM, SIGKILL) or by a store that
fails when the sweep records its end (tests/kill_driver.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sdxl_ablate.run.sweep import Tally

from .conftest import ROOT, tiny_overrides


def sweep(tmp_path: Path, *overrides: str, kill_at: str = "") -> subprocess.Popen:
    """`python -m sdxl_ablate -m <overrides>` in tmp_path (default output dirs), through kill_driver."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KILL_AT": kill_at}
    return subprocess.Popen([sys.executable, "-m", "tests.kill_driver", "-m",
                             *tiny_overrides(tmp_path, "study=life"), *overrides],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    end = time.time() + timeout
    while time.time() < end:
        found = sorted(root.glob(path_glob))
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{path_glob} did not appear in {timeout}s")


def parents(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("life").experiment_id], "tags.kind = 'sweep'")
    return sorted(runs, key=lambda r: r.info.start_time)


# Three variants; stopped while the second trains (the first's phases.json is written when it ends).
THREE = ("trainer.max_steps=40", "lora.rank=2,4,8")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,how", [(signal.SIGINT, 130, "Ctrl-C (SIGINT)"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_closes_the_parent_as_killed_with_one_line_and_the_summary_so_far(tmp_path, sig, code, how):
    proc = sweep(tmp_path, *THREE)
    wait_for("multirun/life/*/0/phases.json", tmp_path, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (parent,) = parents(tmp_path)
    sweep_id = parent.data.tags["sweep_id"]
    assert f"sweep {sweep_id}: interrupted by {how}; its parent run {parent.info.run_id} is closed as KILLED" in err
    summary = [line for line in err.splitlines() if line.startswith(f"sweep {sweep_id}: 3 variants: 1 ok, ")]
    assert len(summary) == 1 and summary[0].endswith(f"; exit code {code}"), err[-2000:]
    assert parent.info.status == "KILLED" and parent.data.tags["status"] == "killed"
    assert how in parent.data.tags["error"]
    assert parent.data.tags["n_ok"] == "1" and parent.data.tags["n_failed"] == "2"
    assert parent.data.tags["host"] and parent.data.tags["pid"] == str(proc.pid)
    # The variant it stopped (if its run was open by then) is closed too, with the signal as why.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    children = client.search_runs([parent.info.experiment_id], f"tags.sweep_id = '{sweep_id}' and tags.kind = 'variant'")
    assert sorted(r.data.tags["status"] for r in children)[-1] == "ok" and all(r.info.status != "RUNNING" for r in children)
    assert all(how in r.data.tags["error"] for r in children if r.data.tags["status"] != "ok")


@pytest.mark.slow
def test_a_store_failure_at_the_end_fails_the_sweep_loudly_and_closes_the_parent(tmp_path):
    proc = sweep(tmp_path, "trainer.max_steps=2", "lora.rank=2,4", kill_at="sweep_end")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 102, err[-3000:]  # never 0: Hydra alone would only have warned
    assert "Traceback" not in err
    (parent,) = parents(tmp_path)
    assert (f"sweep {parent.data.tags['sweep_id']}: could not record its end in MLflow (OperationalError: "
            f"database is locked); its parent run {parent.info.run_id} is closed as FAILED") in err
    assert parent.info.status == "FAILED" and parent.data.tags["status"] == "failed"
    assert "database is locked" in parent.data.tags["error"]


@pytest.mark.slow
def test_a_parent_left_running_by_a_killed_sweep_is_closed_by_the_next_sweep_of_its_study(tmp_path):
    first = sweep(tmp_path, *THREE)
    wait_for("multirun/life/*/0/phases.json", tmp_path, first)
    first.kill()  # SIGKILL: nothing in the process can close its parent run
    first.communicate(timeout=60)
    (left,) = parents(tmp_path)
    assert left.info.status == "RUNNING"  # what a SIGKILL leaves

    second = sweep(tmp_path, "trainer.max_steps=2", "lora.rank=16")
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    old, new = parents(tmp_path)
    assert old.info.run_id == left.info.run_id and old.info.status == "KILLED"
    assert old.data.tags["status"] == "killed" and f"pid {first.pid}" in old.data.tags["error"]
    assert new.data.tags["sweep_id"] in old.data.tags["error"]
    assert old.data.tags["n_ok"] == "1" and old.data.tags["n_failed"] == "2"  # its counts at the kill
    assert new.info.status == "FINISHED" and new.data.tags["n_ok"] == "1"


# --- the summary line and the exit code ----------------------------------------------------------


def test_the_summary_counts_each_variant_once():
    assert Tally(6, {}, reused=6).line() == "6 variants: 6 ok (all reused)"
    assert Tally(6, {"ok": 2, "failed": 1, "nan": 1}, reused=2).line() == "6 variants: 4 ok (2 reused), 1 failed, 1 nan"
    assert Tally(4, {"ok": 2, "failed": 2}).line() == "4 variants: 2 ok, 2 failed"
    assert Tally(1, {"failed": 1}).line() == "1 variant: 1 failed"
    t = Tally(3, {"ok": 1})
    assert t.line("not run") == "3 variants: 1 ok, 2 not run" and (t.n_ok, t.not_ok) == (1, 2)
    # More runs than jobs (never this sweep's own): the counts never go negative.
    extra = Tally(2, {"ok": 3}, reused=1)
    assert extra.not_ok == 0 and extra.missing == 0


def test_the_exit_code_is_never_negative_and_never_0_after_a_callback_failure(monkeypatch):
    import sdxl_ablate.__main__ as cli
    from sdxl_ablate.run import sweep as sw

    monkeypatch.setattr(sw, "last_failed", -2)
    assert cli.exit_code() == 0
    monkeypatch.setattr(sw, "last_failed", 250)
    assert cli.exit_code() == 100
    monkeypatch.setattr(sw, "callback_error", "OperationalError: database is locked")
    assert cli.exit_code() == sw.CALLBACK_EXIT == 102
