"""Issue 12: many jobs against one fresh MLflow store, and artifacts through a tracking server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import json
import signal

import pytest
from mlflow.tracking import MlflowClient

from sdxl_ablate.track.tracker import artifact_location, get_or_create_experiment
from tests.conftest import tiny_overrides
from tests.e2e.ui_check import stop

ROOT = Path(__file__).resolve().parents[1]

# One job: open the store, find-or-create the study's experiment, log, close. A barrier (one
# ready file per job) makes every job hit the fresh store together, after all the imports.
JOB = textwrap.dedent("""
    import pathlib, sys, time
    from sdxl_ablate.config import TrackingConfig
    from sdxl_ablate.track.tracker import Tracker
    uri, root, n, i = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    (pathlib.Path("ready") / i).touch()
    deadline = time.time() + 300
    while len(list(pathlib.Path("ready").iterdir())) < n and time.time() < deadline:
        time.sleep(0.01)
    cfg = TrackingConfig(uri=uri, artifact_root=root or None)
    with Tracker(cfg, "race", f"job{i}", tags={"job": i}) as t:
        t.log_metrics({"train/loss": float(i)}, step=0)
        t.log_text(f"job {i}", "hello.txt")
        t.set_status("ok")
    print("done", i, t.run_id)
""")


def _run_jobs(uri: str, artifact_root: str, n: int, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    (tmp_path / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), uri, artifact_root, str(n), str(i)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _assert_all_runs(client: MlflowClient, n: int) -> list:
    exps = [e for e in client.search_experiments() if e.name == "race"]
    assert len(exps) == 1
    runs = client.search_runs([exps[0].experiment_id], max_results=100)
    assert sorted(r.data.tags["job"] for r in runs) == [str(i) for i in range(n)]  # none lost, none twice
    assert [r.info.status for r in runs] == ["FINISHED"] * n
    assert sorted(r.data.metrics["train/loss"] for r in runs) == [float(i) for i in range(n)]
    return runs


@pytest.mark.slow
def test_five_jobs_at_once_on_a_fresh_sqlite_store(tmp_path):
    n = 5
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    results = _run_jobs(uri, str(tmp_path / "artifacts"), n, tmp_path)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(uri)
    runs = _assert_all_runs(client, n)
    for r in runs:
        assert client.download_artifacts(r.info.run_id, "hello.txt", str(tmp_path / r.info.run_id))


def test_get_or_create_experiment_reads_the_winner_of_a_creation_race(tmp_path, monkeypatch):
    """A job that loses the race (another created the name between its lookup and its create)
    returns the existing id instead of failing."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    winner = client.create_experiment("study", artifact_location=(tmp_path / "a").as_uri())
    real = client.get_experiment_by_name
    calls = []

    def stale_first_lookup(name):  # the first lookup ran before the other job's create
        calls.append(name)
        return None if len(calls) == 1 else real(name)

    monkeypatch.setattr(client, "get_experiment_by_name", stale_first_lookup)
    assert get_or_create_experiment(client, "study", None) == winner
    assert calls == ["study", "study"]


def test_artifact_location_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = "http://127.0.0.1:5000"
    assert artifact_location(server, "s", None) is None  # the server's root applies
    assert artifact_location("https://mlflow.example.org", "s", None) is None
    assert artifact_location(server, "s", "mlflow-artifacts:/") == "mlflow-artifacts:/s"
    assert artifact_location(server, "s", "s3://bucket/runs/") == "s3://bucket/runs/s"
    assert artifact_location(server, "s", str(tmp_path / "art")) == (tmp_path / "art" / "s").as_uri()
    assert artifact_location(f"sqlite:///{tmp_path}/m.db", "s", None) == (tmp_path / "mlartifacts" / "s").as_uri()
    assert artifact_location(f"sqlite:///{tmp_path}/m.db", "s", "rel") == (tmp_path / "rel" / "s").as_uri()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    dest = tmp_path / "server_artifacts"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(dest), "--workers", "1"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # stopped with the workers it starts
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.5)
    else:
        stop(proc)
        pytest.fail("mlflow server did not start within 120 s")
    yield uri, dest, proc
    stop(proc)


@pytest.mark.slow
def test_jobs_against_a_tracking_server_send_artifacts_through_it(tmp_path, mlflow_server):
    """4 jobs at once against `mlflow server --artifacts-destination DEST`: every run FINISHED,
    and the artifact files land in DEST through the server (no local mlartifacts)."""
    uri, dest, _ = mlflow_server
    n = 4
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    results = _run_jobs(uri, "", n, jobs_dir)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(uri)
    runs = _assert_all_runs(client, n)
    exp = client.get_experiment(runs[0].info.experiment_id)
    assert exp.artifact_location.startswith("mlflow-artifacts:/"), exp.artifact_location
    for r in runs:
        files = list(dest.rglob(f"{r.info.run_id}/artifacts/hello.txt"))
        assert len(files) == 1 and files[0].read_text() == f"job {r.data.tags['job']}"
    assert not (jobs_dir / "mlartifacts").exists()


@pytest.mark.slow
def test_user_artifact_root_uri_stays_a_uri_on_a_server(tmp_path, mlflow_server):
    uri, dest, _ = mlflow_server
    results = _run_jobs(uri, "mlflow-artifacts:/team", 1, tmp_path)
    assert results[0].returncode == 0, results[0].stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("race")
    assert exp.artifact_location == "mlflow-artifacts:/team/race"
    run_id = client.search_runs([exp.experiment_id])[0].info.run_id
    assert (dest / "team" / "race" / run_id / "artifacts" / "hello.txt").read_text() == "job 0"
    assert not list(tmp_path.glob("mlflow-artifacts*"))


@pytest.mark.slow
def test_a_tracking_server_killed_mid_run_costs_seconds_and_the_journal_keeps_the_run(tmp_path, mlflow_server):
    """The server dies once the run is under way: the run ends within a bounded time (MLflow's
    HTTP retries bounded, no further call to the server after the first failure) and its
    journal holds the rest of it."""
    uri, _, server = mlflow_server
    args = [a for a in tiny_overrides(tmp_path, "trainer.max_steps=300", f"tracking.uri={uri}",
                                      f"hydra.run.dir={tmp_path}/out")
            if not a.startswith(("tracking.uri=sqlite", "tracking.artifact_root="))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        env.pop(name, None)  # the project's defaults, not this process's
    run = subprocess.Popen([sys.executable, "-m", "sdxl_ablate", *args], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        client = MlflowClient(uri)
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None:  # until the run has logged a loss
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if any("train/loss" in r.data.metrics for r in runs):
                break
            time.sleep(0.5)
        assert run.poll() is None, "the run ended before the server could be killed: raise trainer.max_steps"
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        try:
            out, _ = run.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the run did not finish within 60 s of the server's death (MLflow's HTTP retries unbounded?)")
    finally:
        stop(run)
    assert run.returncode == 0, out[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "tracking_journal" / "journal.jsonl").read_text().splitlines()]
    ops = [r["op"] for r in records]
    assert ops[0] == "open" and ops.count("open") == 1, ops  # one failure, one switch
    assert "log_metrics" in ops and ops[-1] == "close", ops
    assert any("train/loss" in r.get("metrics", {}) for r in records)
    # The journal holds the whole run, from before the server died: a fresh store gets all of it.
    from sdxl_ablate.track.replay import replay

    fresh = f"sqlite:///{tmp_path}/fresh.db"
    fresh_client = MlflowClient(fresh)
    run_id = replay(tmp_path / "out", fresh)
    whole = fresh_client.get_run(run_id)
    steps = sorted(m.step for m in fresh_client.get_metric_history(run_id, "train/loss"))
    assert steps == sorted(r["step"] for r in records if "train/loss" in r.get("metrics", {}))
    assert steps[0] == 0 and len(steps) == len(set(steps)) and whole.data.params
    assert whole.data.tags["status"] == "ok" and whole.info.status == "FINISHED"
    assert "config.yaml" in {a.path for a in fresh_client.list_artifacts(run_id)}
    assert any(k.startswith("ablation/") for k in whole.data.metrics)
