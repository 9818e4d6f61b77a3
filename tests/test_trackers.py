"""The trackers keep one contract (track/protocol.py) and one cut of long values (track/limits.py)."""

from __future__ import annotations

import json
from typing import Generic, Protocol

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from sdxl_ablate.config import TrackingConfig
from sdxl_ablate.track.journal import JournalingTracker, journal_path
from sdxl_ablate.track.protocol import RunTracker
from sdxl_ablate.track.replay import replay
from sdxl_ablate.track.tracker import Tracker
from sdxl_ablate.train.distributed import NullTracker

MEMBERS = sorted({*RunTracker.__annotations__, *(m for m in vars(RunTracker) if not m.startswith("_")),
                  "__enter__", "__exit__"})


@pytest.mark.parametrize("cls", [Tracker, JournalingTracker, NullTracker])
def test_every_tracker_implements_the_protocol_itself(cls, tmp_path):
    assert RunTracker in cls.__bases__
    tracker = (NullTracker() if cls is NullTracker else
               cls(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"), "e", "r",
                   **({"output_dir": tmp_path} if cls is JournalingTracker else {})))
    own = [c for c in cls.__mro__ if c not in (RunTracker, Protocol, Generic, object)]
    defined = set(vars(tracker)).union(*(vars(c) for c in own))
    missing = [m for m in MEMBERS if m not in defined]
    assert not missing, f"{cls.__name__} leaves {missing} to the Protocol's stubs"


def test_a_misspelt_call_on_the_null_tracker_fails():
    with pytest.raises(AttributeError):
        NullTracker().log_metric({"a": 1.0})


def test_a_long_param_journaled_while_the_store_fails_replays(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the store's directory should be")
    long = "x" * (MAX_PARAM_VAL_LENGTH + 100)
    with JournalingTracker(TrackingConfig(uri=f"sqlite:///{blocker}/mlflow.db"), "e", "r", tmp_path / "out") as t:
        t.log_params({"long": long, "short": 1})
        t.set_tags({"error": "y" * (MAX_TAG_VAL_LENGTH + 100)})
        t.set_status("ok")
    assert t.failure is not None
    records = [json.loads(line) for line in journal_path(tmp_path / "out").read_text().splitlines()]
    assert {"long": long[:MAX_PARAM_VAL_LENGTH], "short": "1"} in [r.get("params") for r in records]

    good = f"sqlite:///{tmp_path}/replayed.db"
    run_id = replay(tmp_path / "out", good)
    run = MlflowClient(good).get_run(run_id)
    assert run.data.params["long"] == long[:MAX_PARAM_VAL_LENGTH]
    assert len(run.data.tags["error"]) == MAX_TAG_VAL_LENGTH and run.data.tags["status"] == "ok"


def test_the_study_experiment_opens_in_the_model_training_view(tmp_path):
    """MLflow 3's UI picks its view from the experiment tag `mlflow.experimentKind`
    ("custom_model_development" is its "Machine learning" kind); a kind set by a person stays."""
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "a"))
    with Tracker(cfg, "fresh", "r"):
        pass
    client = MlflowClient(cfg.uri)
    assert client.get_experiment_by_name("fresh").tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("old")  # made before the tag existed
    mine = client.create_experiment("mine", tags={"mlflow.experimentKind": "finetuning"})
    for name in ("old", "mine"):
        with Tracker(cfg, name, "r"):
            pass
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(mine).tags["mlflow.experimentKind"] == "finetuning"
