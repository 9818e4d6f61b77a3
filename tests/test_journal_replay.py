"""Issue 18: the journal holds the whole run, so a store that dies mid-run loses nothing.

The store dies for real: the sqlite file's header is overwritten in place (every later call
fails at once with "file is not a database"), and written back to bring the store back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sdxl_ablate.config import TrackingConfig, to_typed, to_yaml
from sdxl_ablate.evaluate.headline import PREFIX, summary_metrics
from sdxl_ablate.run import runner
from sdxl_ablate.track import replay as replay_mod
from sdxl_ablate.track import tracker as tracker_mod
from sdxl_ablate.track.journal import JournalingTracker, journal_path, unsent_records
from sdxl_ablate.track.replay import replay
from sdxl_ablate.track.tracker import Tracker

from .conftest import compose_config, tiny_overrides

STEPS = 8
DIES_AT = 4  # the step whose train/loss is the first call that finds the store dead


class BrokenStore:
    """A sqlite store whose file header is zeroed while it is broken (restored on `mend`)."""

    def __init__(self, db: Path):
        self.db, self.header = db, None

    def kill(self) -> None:
        with open(self.db, "r+b") as f:
            self.header = f.read(100)
            f.seek(0)
            f.write(b"\0" * 100)

    def mend(self) -> None:
        with open(self.db, "r+b") as f:
            f.write(self.header)


def _cfg(d: Path):
    return to_typed(compose_config(tiny_overrides(d, "study=unit", f"trainer.max_steps={STEPS}")))


def _only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _losses(client, run) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))


def _ablation(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if k.startswith(PREFIX)}


def _params(run, d: Path) -> dict[str, str]:
    return {k: v.replace(str(d), "<DIR>") for k, v in run.data.params.items()}


def _replayed_whole(out: Path, d: Path, cfg, tmp_path: Path, normal, normal_dir: Path, normal_losses):
    """Replays `out`'s journal into a fresh store and checks it is the whole run, as the same run
    without failure logged it: its params, config.yaml, every train/loss step once with the very
    values, status ok and FINISHED. -> (client, the replayed run)."""
    fresh = f"sqlite:///{tmp_path}/fresh.db"
    replay(out, fresh)
    client, whole = _only_run(fresh)
    assert _params(whole, d) == _params(normal, normal_dir)
    config = client.download_artifacts(whole.info.run_id, "config.yaml", str(tmp_path / "dl"))
    assert Path(config).read_text() == to_yaml(cfg)
    assert _losses(client, whole) == normal_losses  # every step once, the very values
    assert whole.data.tags["status"] == "ok" and whole.info.status == "FINISHED"
    return client, whole


@pytest.mark.slow
def test_a_store_that_dies_mid_run_replays_whole_into_a_fresh_store_and_without_duplicates_into_its_own(
        tmp_path, monkeypatch):
    # The reference: the same variant, same seed, with a store that works.
    normal_dir = tmp_path / "normal"
    normal_result = runner.run(_cfg(normal_dir), "variant", normal_dir / "out")
    n_client, normal = _only_run(f"sqlite:///{normal_dir}/mlflow.db")
    normal_losses = _losses(n_client, normal)
    assert len(normal_losses) == STEPS

    dies_dir = tmp_path / "dies"
    cfg = _cfg(dies_dir)
    store = BrokenStore(dies_dir / "mlflow.db")
    real = Tracker.log_metrics

    def dies_mid_run(self, metrics, step=0, **kw):
        if "train/loss" in metrics and step == DIES_AT and store.header is None:
            store.kill()
        return real(self, metrics, step, **kw)

    monkeypatch.setattr(tracker_mod.Tracker, "log_metrics", dies_mid_run)
    result = runner.run(cfg, "variant", dies_dir / "out")
    assert result == normal_result  # training went on, the same
    monkeypatch.undo()
    store.mend()
    records = [json.loads(x) for x in journal_path(dies_dir / "out").read_text().splitlines()]
    failures = [r for r in records if r["op"] == "failure"]
    assert len(failures) == 1 and "log_metrics" in failures[0]["reason"]  # one failure, mid-run
    d_client, own = _only_run(f"sqlite:///{dies_dir}/mlflow.db")
    assert _losses(d_client, own) == normal_losses[:DIES_AT]  # what the store got before it died
    assert own.info.status == "RUNNING" and not _ablation(own)
    assert unsent_records(dies_dir / "out") > 0

    # (1) Into a fresh store: the whole run, from its params to its close.
    f_client, whole = _replayed_whole(dies_dir / "out", dies_dir, cfg, tmp_path, normal, normal_dir, normal_losses)
    assert whole.data.tags["tracking.replayed"] == "true"
    assert {"lora"} <= {a.path for a in f_client.list_artifacts(whole.info.run_id)}
    # ablation/*, computed while the store was dead, as a run without failure computes them:
    # the same names, the deterministic values equal, and each equal to its source in this run.
    summary = _ablation(whole)
    assert summary.keys() == _ablation(normal).keys() and len(summary) >= 4
    for name in ("final_loss", "trainable_params"):
        assert summary[PREFIX + name] == _ablation(normal)[PREFIX + name], name
    assert summary == summary_metrics(whole.data.metrics)

    # (2) Into its own store (mended): only what it lacked; no metric point twice.
    lacked = unsent_records(dies_dir / "out")
    applied = []
    real_apply = replay_mod._apply
    monkeypatch.setattr(replay_mod, "_apply", lambda *a: applied.append(a[2]["op"]) or real_apply(*a))
    assert replay(dies_dir / "out") == own.info.run_id
    assert len(applied) == lacked and "log_params" not in applied  # the params went in before the failure
    monkeypatch.undo()
    replay(dies_dir / "out")  # a second replay adds nothing
    own = d_client.get_run(own.info.run_id)
    assert _losses(d_client, own) == normal_losses  # each step once
    for key in own.data.metrics:
        history = d_client.get_metric_history(own.info.run_id, key)
        assert len(history) == len({(m.step, m.timestamp, m.value) for m in history}), key
    assert len(d_client.get_metric_history(own.info.run_id, "train/final_loss")) == 1
    assert own.info.status == "FINISHED" and own.data.tags["status"] == "ok"
    assert _ablation(own) == summary


def test_ablation_metrics_from_remembered_values_equal_mlflow_read_back_on_a_normal_run(tmp_path):
    runner.run(_cfg(tmp_path), "variant", tmp_path / "out")
    client, run = _only_run(f"sqlite:///{tmp_path}/mlflow.db")
    logged = _ablation(run)
    assert len(logged) >= 4 and logged == summary_metrics(run.data.metrics)  # what the read-back gave
    records = [json.loads(x) for x in journal_path(tmp_path / "out").read_text().splitlines()]
    assert unsent_records(tmp_path / "out") == 0 and not [r for r in records if r["op"] == "failure"]


@pytest.mark.parametrize("cls", [Tracker, JournalingTracker])
def test_latest_metrics_follow_mlflows_rule(cls, tmp_path):
    """By step, then timestamp, then value; points at a lower step or time do not replace."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = TrackingConfig(uri=uri, artifact_root=str(tmp_path / "art"))
    extra = {"output_dir": tmp_path / "out"} if cls is JournalingTracker else {}
    with cls(cfg, "e", "r", **extra) as t:
        log = (lambda m, step, ts: t.log_metrics(m, step, timestamp_ms=ts)) if cls is Tracker else \
            (lambda m, step, ts: t.log_metrics(m, step))
        log({"a": 1.0, "b": 5.0, "c": 2.0}, 3, 1000)
        log({"a": 0.5, "b": 7.0}, 1, 2000)  # a lower step, later: not the latest
        log({"b": 6.0, "c": float("nan")}, 3, 3000)  # the same step, later: the latest; nan is not logged
        log({"d": 2.0}, 0, 4000)
        log({"d": 1.0}, 0, 4000)  # same step and time: the larger value stays
        log({"e": 1.0}, 2, 5000)
        log({"e": 3.0}, 2, 4000)  # an earlier timestamp at the same step: not the latest
        t.set_status("ok")
    read_back = MlflowClient(uri).get_run(t.run_id).data.metrics
    assert t.latest_metrics() == read_back
    if cls is Tracker:  # explicit timestamps: the rule itself, checked against the numbers
        assert read_back == {"a": 1.0, "b": 6.0, "c": 2.0, "d": 2.0, "e": 1.0}

    # A reopened run remembers what the store holds for it before this process logged anything.
    again = cls(cfg, "e", "r", run_id=t.run_id, **extra)
    assert again.latest_metrics() == read_back


def test_an_artifact_failure_then_a_metadata_failure(tmp_path):
    """A full artifact disk first: metadata keep going to MLflow; then the store dies: the run
    switches to the journal for good (a mended store is not asked again). Replay into the own
    store puts in the artifact and the rest, and no metric point twice."""
    blocked = tmp_path / "art"
    blocked.write_text("a file where the artifact directory should be")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = TrackingConfig(uri=uri, artifact_root=str(blocked))
    store = BrokenStore(tmp_path / "mlflow.db")
    out = tmp_path / "out"
    with JournalingTracker(cfg, "e", "r", out) as t:
        t.log_params({"p": 1})
        t.log_text("hello", "notes.txt")  # the artifact store fails
        assert t.artifact_failures and t.failure is None
        t.log_metrics({"m": 1.0}, step=0)  # still MLflow
        store.kill()
        t.log_metrics({"m": 2.0}, step=1)  # the store is dead: the journal from now on
        assert t.failure is not None
        store.mend()
        t.log_metrics({"m": 3.0}, step=2)  # not sent to the (mended) store: the switch is for good
        t.set_status("ok")
    client = MlflowClient(uri)
    run = client.get_run(t.run_id)
    assert [m.value for m in client.get_metric_history(t.run_id, "m")] == [1.0]
    assert run.info.status == "RUNNING" and run.data.params == {"p": "1"}

    blocked.unlink()  # the artifact disk has room again
    replay(out)
    run = client.get_run(t.run_id)
    assert sorted((m.step, m.value) for m in client.get_metric_history(t.run_id, "m")) == [
        (0, 1.0), (1, 2.0), (2, 3.0)]
    assert [a.path for a in client.list_artifacts(t.run_id)] == ["notes.txt"]
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok"


def test_an_unwritable_journal_leaves_the_run_to_mlflow(tmp_path, caplog):
    """The output disk refuses the journal: logged loudly, and MLflow still gets the whole run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "tracking_journal").write_text("a file where the journal's folder should be")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with JournalingTracker(TrackingConfig(uri=uri, artifact_root=str(tmp_path / "art")), "e", "r", out) as t:
        t.log_params({"p": 1})
        t.log_metrics({"m": 1.0}, step=0)
        t.log_text("hello", "notes.txt")
        t.set_status("ok")
    assert t.journal.error is not None and "cannot be written" in caplog.text
    client = MlflowClient(uri)
    run = client.get_run(t.run_id)
    assert run.data.params == {"p": "1"} and run.data.metrics["m"] == 1.0 and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(t.run_id)] == ["notes.txt"]


@pytest.mark.slow
def test_a_resumed_runs_journal_holds_the_whole_run_so_a_fresh_store_gets_it_complete(tmp_path):
    """Attempt 1 (a real process): the store dies at step 2, the process is SIGKILLed after step 5
    (last checkpoint: step 4). Attempt 2, in a new output directory with the store back, resumes
    and finishes. Its journal alone, replayed into a fresh store, is the whole run."""
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    steps = ("trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=1")
    normal_dir = tmp_path / "normal"
    runner.run(to_typed(compose_config(tiny_overrides(normal_dir, "study=unit", *steps))), "variant",
               normal_dir / "out")
    n_client, normal = _only_run(f"sqlite:///{normal_dir}/mlflow.db")
    normal_losses = _losses(n_client, normal)
    assert len(normal_losses) == 6

    d = tmp_path / "dies"
    d.mkdir()
    db = d / "mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KILL_AT": "after_step:5",
           "STORE_DIES_AT": f"2:{db}"}
    first = subprocess.run([sys.executable, "-m", "tests.kill_driver", *tiny_overrides(d, "study=unit", *steps),
                            f"hydra.run.dir={d}/attempt1"], cwd=d, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == -9, first.stderr[-3000:]  # SIGKILLed, with the store dead since step 2
    assert (db.parent / "mlflow.db.header").is_file()
    with open(db, "r+b") as f:  # the store is back
        f.write((db.parent / "mlflow.db.header").read_bytes())
    client, own = _only_run(f"sqlite:///{db}")
    assert _losses(client, own) == normal_losses[:2]  # what the store got before it died

    cfg = to_typed(compose_config(tiny_overrides(d, "study=unit", *steps)))
    runner.run(cfg, "variant", d / "attempt2")  # resumes from step-4, into the same run
    own = client.get_run(own.info.run_id)
    assert own.data.tags["resumed_from"].endswith("step-00000004")
    assert _losses(client, own) == normal_losses[:2] + normal_losses[4:]  # attempt 1's journal-only steps lack

    f_client, whole = _replayed_whole(d / "attempt2", d, cfg, tmp_path, normal, normal_dir, normal_losses)
    assert _ablation(whole).keys() == _ablation(normal).keys() and len(_ablation(whole)) >= 4

    # Into its own store: only what it lacks (attempt 1's steps 2 and 3): then it is whole too.
    replay(d / "attempt2")
    own = client.get_run(own.info.run_id)
    assert _losses(client, own) == normal_losses


def test_carry_over_copies_the_run_so_far_and_chains(tmp_path):
    """What a resume's journal starts with: records up to the cut with their acks and files, not
    the earlier attempt's close nor its metric points past the cut; a third attempt gets both."""
    from sdxl_ablate.track.journal import Journal, carry_over

    def write(out, ops):
        j = Journal(out)
        for op, fields, acked in ops:
            if op == "log_text":
                fields = {"file": j.keep_text(fields["text"], "notes.txt"), "artifact_file": "notes.txt"}
            seq = j.append(op, **fields)
            if acked:
                j.ack(seq)
        j.close()

    def read(out):
        return [json.loads(x) for x in journal_path(out).read_text().splitlines()]

    write(tmp_path / "a1", [("open", {"run_id": "r"}, False), ("log_params", {"params": {"p": "1"}}, True),
                            ("log_text", {"text": "cfg"}, True), ("log_metrics", {"metrics": {"m": 0.0}, "step": 0}, True),
                            ("log_metrics", {"metrics": {"m": 1.0}, "step": 1}, False),
                            ("log_metrics", {"metrics": {"m": 2.0}, "step": 2}, False),
                            ("set_tags", {"tags": {"status": "failed"}}, False), ("close", {"status": "FAILED"}, False)])
    assert carry_over(tmp_path / "a1", tmp_path / "a2", 1) == 6
    a2 = read(tmp_path / "a2")
    assert [(r["op"], r["seq"]) for r in a2] == [("open", 0), ("log_params", 1), ("ack", 1), ("log_text", 2), ("ack", 2),
                                                 ("log_metrics", 3), ("ack", 3), ("log_metrics", 4), ("set_tags", 6)]
    assert (journal_path(tmp_path / "a2").parent / a2[3]["file"]).read_text() == "cfg"
    assert unsent_records(tmp_path / "a2") == 2  # the step-1 point and the tag: the own store lacks them
    write(tmp_path / "a2", [("log_metrics", {"metrics": {"m": 2.5}, "step": 2}, True)])  # numbers go on
    assert read(tmp_path / "a2")[-2]["seq"] == 7
    assert carry_over(tmp_path / "a2", tmp_path / "a2", 5) == 0  # the same directory: already there
    assert carry_over(tmp_path / "a2", tmp_path / "a3", 5) == 7  # the chain: attempt 1's part, then 2's
    assert [r["metrics"]["m"] for r in read(tmp_path / "a3") if r["op"] == "log_metrics"] == [0.0, 1.0, 2.5]
    assert carry_over(tmp_path / "a1", tmp_path / "a3", 1) == 0  # never into a journal with records of its own
