"""Checkpoints, resume, sweeps that pick up, and training that survives a lost tracking store
(issue 10), in-process on the tiny model. The real SIGKILL tests are in test_resume_kill.py."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from sdxl_ablate.train import checkpoint as ck
from sdxl_ablate.run import runner
from sdxl_ablate.train import loop as train_mod
from sdxl_ablate.config import config_hash, hashed_items, to_typed
from sdxl_ablate.data.datasets import load_data
from sdxl_ablate.model.sdxl import build_tiny
from sdxl_ablate.run.pickup import LOCK, variant_dir
from sdxl_ablate.track.replay import main as replay_main

from .conftest import compose_config, tiny_overrides

# Everything random in the loop is on: LoRA dropout (torch RNG), flips and caption dropout
# (python RNG), noise and latent samples (the generator), a data order over several epochs.
RANDOM_ALL = ("data.resolution=64", "lora.dropout=0.1", "data.flip=true", "data.caption_dropout=0.3",
              "trainer.lr_scheduler=cosine", "trainer.warmup_steps=2", "lora.rank=4")


def typed(tmp_path, *extra):
    return to_typed(compose_config(tiny_overrides(tmp_path, "study=unit", *RANDOM_ALL, *extra)))


def lora_of(c) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in c.unet.named_parameters() if "lora" in n}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class Interrupt(BaseException):
    """Stands in for a kill inside the loop (a BaseException: no `except Exception` catches it)."""


def interrupt_after(monkeypatch, step: int) -> None:
    real = ck.Checkpointer.after_step

    def after_step(self, ts, total, n_train):
        out = real(self, ts, total, n_train)
        if ts.step == step:
            raise Interrupt(f"interrupted after step {step}")
        return out

    monkeypatch.setattr(ck.Checkpointer, "after_step", after_step)


# --------------------------------------------------------------------------- serialisation
def test_pack_unpack_round_trips_every_kind_of_state_exactly():
    state = {"step": 7, "lr": 1e-4 / 3, "nan": float("nan"), "none": None, "flag": True,
             "betas": (0.9, 0.999), "by_index": {0: {"exp_avg": torch.randn(3, 2)}, 12: {"step": torch.tensor(5.0)}},
             "bf16": torch.randn(4, dtype=torch.bfloat16), "rng": torch.get_rng_state(),
             "python": (3, tuple(range(625)), None), "list": [1, "a", [2.5]]}
    tensors: dict[str, torch.Tensor] = {}
    meta = json.loads(json.dumps(ck.pack(state, tensors)))
    back = ck.unpack(meta, tensors)
    assert back.keys() == state.keys()
    assert back["betas"] == (0.9, 0.999) and isinstance(back["betas"], tuple)
    assert back["lr"] == 1e-4 / 3 and math.isnan(back["nan"]) and back["none"] is None and back["flag"] is True
    assert set(back["by_index"]) == {0, 12}
    assert torch.equal(back["by_index"][0]["exp_avg"], state["by_index"][0]["exp_avg"])
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], state["bf16"])
    assert torch.equal(back["rng"], state["rng"]) and back["python"] == state["python"]
    assert back["list"] == [1, "a", [2.5]]
    with pytest.raises(TypeError, match="without pickle"):
        ck.pack({"obj": object()}, {})


def test_data_order_resumes_mid_epoch():
    import random

    rng = random.Random(3)
    order = train_mod.DataOrder(5, 2, rng)
    first = [next(order) for _ in range(3)]  # 6 indices: one epoch and one into the next
    saved, rng_state = order.state_dict(), rng.getstate()
    expected = [next(order) for _ in range(4)]
    rng2 = random.Random(0)
    rng2.setstate(rng_state)
    again = train_mod.DataOrder(5, 2, rng2)
    again.load_state_dict(json.loads(json.dumps(saved)))
    assert [next(again) for _ in range(4)] == expected
    assert sorted(first[0] + first[1] + first[2][:1]) == [0, 1, 2, 3, 4]  # an epoch is a permutation
    with pytest.raises(ValueError, match="cannot continue with 6 images"):
        train_mod.DataOrder(6, 2, rng).load_state_dict(saved)


# --------------------------------------------------------------------------- train-level resume
def test_resume_after_an_interruption_is_bitwise_equal_and_keeps_the_last_k(tmp_path, monkeypatch):
    cfg = typed(tmp_path, "trainer.max_steps=5")
    data = load_data(cfg.data)
    c = build_tiny(0)
    reference = train_mod.train(c, data, cfg, torch.device("cpu"))
    want = lora_of(c)

    directory = tmp_path / "ck"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(Interrupt):
        train_mod.train(build_tiny(0), data, cfg, torch.device("cpu"),
                        checkpointer=ck.Checkpointer(directory, 2, 2, hashed_items(cfg)))
    assert [p.name for p in ck.list_checkpoints(directory)] == ["step-00000002"]
    monkeypatch.undo()

    c = build_tiny(0)  # a fresh process's model: the trained state must all come from the checkpoint
    resumed = train_mod.train(c, data, cfg, torch.device("cpu"), checkpointer=ck.Checkpointer(
        directory, 2, 2, hashed_items(cfg), resume_from=directory / "step-00000002"))
    assert_bitwise_equal(lora_of(c), want)
    assert resumed.losses == reference.losses and resumed.steps == 5
    # Steps 4 and 5 (the end) written, step 2 pruned: the last two kept.
    assert [p.name for p in ck.list_checkpoints(directory)] == ["step-00000004", "step-00000005"]
    state = ck.read_checkpoint(directory / "step-00000005")
    assert state["train"]["step"] == 5 and state["n_train"] == len(data.train)
    assert state["train"]["result"]["losses"] == reference.losses
    assert_bitwise_equal({k.removeprefix("unet."): v for k, v in state["train"]["lora"].items()}, want)


@pytest.mark.parametrize("optimizer,lr,precision", [("prodigy", "1.0", "fp32"), ("adamw8bit", "1e-3", "fp32"),
                                                    ("adamw", "1e-3", "fp16"), ("adamw", "1e-3", "bf16")])
def test_every_optimizer_and_loss_scaler_resumes_bitwise(tmp_path, monkeypatch, optimizer, lr, precision):
    cfg = typed(tmp_path, "trainer.max_steps=3", f"trainer.optimizer={optimizer}", f"trainer.lr={lr}",
                f"trainer.precision={precision}")
    data = load_data(cfg.data)
    c = build_tiny(0)
    reference = train_mod.train(c, data, cfg, torch.device("cpu"))
    want = lora_of(c)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupt):
        train_mod.train(build_tiny(0), data, cfg, torch.device("cpu"),
                        checkpointer=ck.Checkpointer(tmp_path / "ck", 1, 1, hashed_items(cfg)))
    monkeypatch.undo()
    state = ck.read_checkpoint(tmp_path / "ck" / "step-00000002")["train"]
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0  # the loss scaler's state is in the checkpoint
    c = build_tiny(0)
    resumed = train_mod.train(c, data, cfg, torch.device("cpu"), checkpointer=ck.Checkpointer(
        tmp_path / "ck", 1, 1, hashed_items(cfg), resume_from=tmp_path / "ck" / "step-00000002"))
    assert resumed.losses == reference.losses
    assert_bitwise_equal(lora_of(c), want)


def test_a_failed_checkpoint_write_keeps_training_and_says_so(tmp_path, monkeypatch):
    cfg = typed(tmp_path, "trainer.max_steps=2")
    data = load_data(cfg.data)

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "write_checkpoint", disk_full)
    checkpointer = ck.Checkpointer(tmp_path / "ck", 1, 2, hashed_items(cfg))
    result = train_mod.train(build_tiny(0), data, cfg, torch.device("cpu"), checkpointer=checkpointer)
    assert result.status == "ok" and result.steps == 2
    assert len(checkpointer.failures) == 2 and "No space left on device" in checkpointer.failures[0]


# --------------------------------------------------------------------------- bad checkpoints
def write_two(tmp_path) -> Path:
    directory = tmp_path / "ck"
    for step in (2, 4):
        ck.write_checkpoint(directory, step, {"config": {"a": 1}, "x": torch.full((3,), float(step))}, keep=5)
    return directory


def test_a_corrupt_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    directory = write_two(tmp_path)
    f = directory / "step-00000004" / ck.TENSORS
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last tensor byte: same size, wrong checksum
    f.write_bytes(bytes(data))
    path, skipped = ck.latest_valid(directory)
    assert path == directory / "step-00000002"
    assert len(skipped) == 1 and "step-00000004" in skipped[0] and "sha256" in skipped[0]
    with pytest.raises(ck.CheckpointError, match="sha256"):
        ck.read_checkpoint(directory / "step-00000004")
    assert torch.equal(ck.read_checkpoint(path)["x"], torch.full((3,), 2.0))


def test_a_write_killed_halfway_leaves_the_last_good_checkpoint(tmp_path):
    directory = write_two(tmp_path)
    # What a kill during the write of step 6 leaves: a hidden temporary directory, half written.
    tmp = directory / ".step-00000006.tmp-99999"
    tmp.mkdir()
    (tmp / ck.TENSORS).write_bytes(b"\0" * 10)
    # ... and a checkpoint whose manifest never got written (e.g. copied by hand, interrupted).
    shutil.copytree(directory / "step-00000004", directory / "step-00000008")
    (directory / "step-00000008" / ck.MANIFEST).unlink()
    assert [p.name for p in ck.list_checkpoints(directory)] == ["step-00000002", "step-00000004", "step-00000008"]
    path, skipped = ck.latest_valid(directory)
    assert path.name == "step-00000004" and "no manifest.json" in skipped[0]
    ck.write_checkpoint(directory, 10, {"x": torch.zeros(1)}, keep=2)  # the next write cleans up
    assert not tmp.exists()
    assert [p.name for p in ck.list_checkpoints(directory)] == ["step-00000008", "step-00000010"]


def test_resuming_with_another_config_refuses_and_names_the_keys(tmp_path):
    cfg = typed(tmp_path, "trainer.max_steps=2")
    data = load_data(cfg.data)
    train_mod.train(build_tiny(0), data, cfg, torch.device("cpu"),
                    checkpointer=ck.Checkpointer(tmp_path / "ck", 0, 1, hashed_items(cfg)))
    saved = tmp_path / "ck" / "step-00000002"
    other = typed(tmp_path, "trainer.max_steps=2", "lora.rank=8", "trainer.lr=3e-4", f"trainer.resume={saved}")
    with pytest.raises(ck.ConfigMismatch) as err:
        runner.run(other, "variant", tmp_path / "out")
    msg = str(err.value)
    assert "lora.rank: 4 -> 8" in msg and "trainer.lr: 0.0001 -> 0.0003" in msg and str(saved) in msg
    assert err.value.differences == ["lora.rank: 4 -> 8", "trainer.lr: 0.0001 -> 0.0003"]
    # The same check guards the checkpointer itself (e.g. a hash collision, or a hand-made path).
    with pytest.raises(ck.ConfigMismatch, match="lora.rank: 4 -> 8"):
        ck.Checkpointer(tmp_path / "ck", 0, 1, hashed_items(other), resume_from=saved).restore(None, len(data.train))


# --------------------------------------------------------------------------- config hash
def test_config_hash_is_stable_and_ignores_only_what_does_not_change_training(tmp_path):
    base = config_hash(typed(tmp_path))
    assert len(base) == 16 and int(base, 16) >= 0
    assert config_hash(typed(tmp_path)) == base
    for same in ("eval=tiny", "tracking.experiment=other", "study=other", "trainer.checkpoint_every=3",
                 "trainer.keep_checkpoints=5", "trainer.force=true", "trainer.log_every=5", "memory=unlimited",
                 "trainer.cuda_graphs=false"):
        assert config_hash(typed(tmp_path, same)) == base, same
    for other in ("lora.rank=8", "trainer.seed=1", "trainer.max_steps=4", "data.resolution=128", "device=cuda"):
        assert config_hash(typed(tmp_path, other)) != base, other


def test_bad_checkpoint_settings_are_rejected_naming_the_value(tmp_path):
    from sdxl_ablate.config import ConfigError

    with pytest.raises(ConfigError) as err:
        typed(tmp_path, "trainer.checkpoint_every=-1", "trainer.keep_checkpoints=0")
    assert "trainer.checkpoint_every=-1" in str(err.value) and "trainer.keep_checkpoints=0" in str(err.value)


# --------------------------------------------------------------------------- sweeps that pick up
def runs_of(tmp_path, experiment="unit"):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, list(client.search_runs([exp.experiment_id]))


def test_a_finished_variant_is_skipped_and_force_trains_it_again(tmp_path, caplog):
    cfg = typed(tmp_path, "trainer.max_steps=2")
    first = runner.run(cfg, "variant", tmp_path / "out1")
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].data.tags["config_hash"] == config_hash(cfg)
    caplog.set_level("INFO")
    again = runner.run(cfg, "variant", tmp_path / "out2")
    assert again == first
    assert len(runs_of(tmp_path)[1]) == 1  # no duplicate run
    assert "already finished with status ok" in caplog.text and "skipped" in caplog.text
    assert not (tmp_path / "out2" / "lora").exists()  # nothing trained

    forced = runner.run(typed(tmp_path, "trainer.max_steps=2", "trainer.force=true"), "variant", tmp_path / "out3")
    assert forced == first  # trained again, the same numbers on a CPU
    runs = runs_of(tmp_path)[1]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    a, b = (load_file(tmp_path / f"out{i}/lora/pytorch_lora_weights.safetensors") for i in (1, 3))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_variant_missing_from_a_fresh_store_is_trained_again(tmp_path, caplog):
    """`make clean` removes mlflow.db and multirun/ but a result.json may outlive them: a store
    that answers without the run, and no journal to replay, means train it again, not a
    'reused' run id nobody can read."""
    cfg = typed(tmp_path, "trainer.max_steps=2")
    first = runner.run(cfg, "variant", tmp_path / "out1")
    assert len(list((tmp_path / "checkpoints").rglob("result.json"))) == 1
    # A new store (deleting the file would not do: MLflow keeps its engine open in-process);
    # tracking.* is outside the config hash, so this is the same training.
    fresh = typed(tmp_path, "trainer.max_steps=2", f"tracking.uri=sqlite:///{tmp_path}/fresh.db")
    assert config_hash(fresh) == config_hash(cfg)
    caplog.set_level("INFO")
    again = runner.run(fresh, "variant", tmp_path / "out2")
    assert again == first
    assert "does not hold and no journal can replay: trained again from the start" in caplog.text
    assert "resuming" not in caplog.text
    assert (tmp_path / "out2" / "lora").is_dir()  # trained
    client = MlflowClient(f"sqlite:///{tmp_path}/fresh.db")
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["status"] == "ok"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == 2  # its whole curve


def test_an_interrupted_variant_resumes_into_the_same_run_bitwise(tmp_path, monkeypatch):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    runner.run(typed(ref_dir, "trainer.max_steps=5"), "variant", ref_dir / "out")
    want = load_file(ref_dir / "out/lora/pytorch_lora_weights.safetensors")

    cfg = typed(tmp_path, "trainer.max_steps=5", "trainer.checkpoint_every=2")
    interrupt_after(monkeypatch, 3)
    with pytest.raises(Interrupt):
        runner.run(cfg, "variant", tmp_path / "out1")
    monkeypatch.undo()
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    run_id = runs[0].info.run_id

    result = runner.run(cfg, "variant", tmp_path / "out2")
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.run_id == run_id  # the same run, continued
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok"
    assert run.data.tags["resumed_from"].endswith("step-00000002")
    assert "error" not in run.data.tags and "Interrupt" in run.data.tags["resume.previous_error"]
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]  # every step once
    got = load_file(tmp_path / "out2/lora/pytorch_lora_weights.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert result == pytest.approx(run.data.metrics["train/final_loss"])


def test_a_corrupt_last_checkpoint_resumes_from_the_one_before(tmp_path, monkeypatch):
    cfg = typed(tmp_path, "trainer.max_steps=5", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3")
    interrupt_after(monkeypatch, 4)
    with pytest.raises(Interrupt):
        runner.run(cfg, "variant", tmp_path / "out1")
    monkeypatch.undo()
    directory = variant_dir(cfg)
    (directory / "step-00000004" / ck.META).write_text("{}")  # truncated by a bad disk
    runner.run(cfg, "variant", tmp_path / "out2")
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags["resumed_from"].endswith("step-00000002") and "step-00000004" in tags["resume.skipped_corrupt"]
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == [0, 1, 2, 3, 4]


def test_runs_left_running_by_dead_processes_are_marked_killed_live_ones_are_not(tmp_path):
    cfg = typed(tmp_path, "trainer.max_steps=1")
    runner.run(cfg, "first", tmp_path / "out0")  # creates the experiment
    client, runs = runs_of(tmp_path)
    exp_id = runs[0].info.experiment_id
    dead_dir, live_dir = tmp_path / "dead", tmp_path / "live"
    for d in (dead_dir, live_dir):
        d.mkdir()
        (d / LOCK).touch()
    dead = client.create_run(exp_id, run_name="dead", tags={"checkpoint_dir": str(dead_dir)}).info.run_id
    live = client.create_run(exp_id, run_name="live", tags={"checkpoint_dir": str(live_dir)}).info.run_id
    with open(live_dir / LOCK) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live process training that variant
        runner.run(typed(tmp_path, "trainer.max_steps=1", "lora.rank=2"), "second", tmp_path / "out1")
    dead_run, live_run = client.get_run(dead), client.get_run(live)
    assert dead_run.info.status == "KILLED" and dead_run.data.tags["status"] == "killed"
    assert "ended without closing it" in dead_run.data.tags["error"]
    assert live_run.info.status == "RUNNING"


# --------------------------------------------------------------------------- tracking store failures
def test_an_unwritable_tracking_store_does_not_stop_training_and_replay_restores_it(tmp_path, capsys):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the store's directory should be")
    cfg = typed(tmp_path, "trainer.max_steps=3", f"tracking.uri=sqlite:///{blocker}/mlflow.db")
    out = tmp_path / "out"
    result = runner.run(cfg, "variant", out)
    assert result is not None and math.isfinite(result)  # trained, whatever the store did
    assert (out / "lora/pytorch_lora_weights.safetensors").is_file()
    records = [json.loads(x) for x in (out / "tracking_journal/journal.jsonl").read_text().splitlines()]
    assert records[0]["op"] == "open" and records[1]["op"] == "failure"
    assert "connecting to the tracking store" in records[1]["reason"]
    assert not [r for r in records if r["op"] == "ack"]  # MLflow took nothing
    losses = [r for r in records if r["op"] == "log_metrics" and "train/loss" in r["metrics"]]
    assert [r["step"] for r in losses] == [0, 1, 2]
    assert records[-1] == {**records[-1], "op": "close", "status": "FINISHED"}

    good = f"sqlite:///{tmp_path}/replayed.db"
    assert replay_main([str(out), "--tracking-uri", good]) == 0
    assert replay_main([str(out), "--tracking-uri", good]) == 0  # a second replay adds nothing
    client = MlflowClient(good)
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok"
    assert run.data.tags["config_hash"] == config_hash(cfg) and run.data.params["lora.rank"] == "4"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [r["metrics"]["train/loss"] for r in losses]
    assert run.data.metrics["train/final_loss"] == pytest.approx(result)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "lora"}

    # Into a second store as well: a replay of its own, not the first store's run id.
    other = f"sqlite:///{tmp_path}/other.db"
    assert replay_main([str(out), "--tracking-uri", other]) == 0
    client2 = MlflowClient(other)
    again = client2.search_runs([client2.get_experiment_by_name("unit").experiment_id])
    assert len(again) == 1 and again[0].info.run_id != run.info.run_id
    assert sorted(m.step for m in client2.get_metric_history(again[0].info.run_id, "train/loss")) == [0, 1, 2]
    assert replay_main([str(out), "--tracking-uri", good]) == 0  # the first store: still nothing new
    assert len(client.search_runs([client.get_experiment_by_name("unit").experiment_id])) == 1


def test_a_full_artifact_disk_keeps_the_run_and_journals_only_the_artifacts(tmp_path, monkeypatch):
    from sdxl_ablate.track.tracker import Tracker

    def disk_full(self, path, artifact_path=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Tracker, "log_artifact", disk_full)
    out = tmp_path / "out"
    result = runner.run(typed(tmp_path, "trainer.max_steps=2"), "variant", out)
    assert result is not None
    client, runs = runs_of(tmp_path)
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok"  # metadata still went to MLflow
    assert run.data.tags["tracking.journal"] == str(out / "tracking_journal/journal.jsonl")
    assert "lora" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    records = [json.loads(x) for x in (out / "tracking_journal/journal.jsonl").read_text().splitlines()]
    acked = {r["seq"] for r in records if r["op"] == "ack"}
    unsent = [r for r in records if r["op"] not in ("open", "ack") and r["seq"] not in acked]
    assert [r["op"] for r in unsent] == ["log_artifact", "log_artifact"]  # the diffusers and kohya files
    assert unsent[0]["path"] == str((out / "lora/pytorch_lora_weights.safetensors").resolve())
    assert unsent[1]["path"] == str((out / "lora/variant_kohya.safetensors").resolve())
    history = len(client.get_metric_history(run.info.run_id, "train/loss"))
    monkeypatch.undo()  # the disk has room again
    assert replay_main([str(out)]) == 0
    run = client.get_run(run.info.run_id)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "lora")) == [
        "lora/pytorch_lora_weights.safetensors", "lora/variant_kohya.safetensors"]
    assert "tracking.journal" not in run.data.tags and run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == history == 2  # nothing twice


# --------------------------------------------------------------------------- latent cache
def test_the_latent_cache_round_trips_through_safetensors_exactly(tmp_path):
    from sdxl_ablate.data import precompute

    cfg = typed(tmp_path)
    data = load_data(cfg.data)
    c = build_tiny(0)
    built = precompute.build_cache(cfg, c, data.train[:3], with_prompts=True, embed_dtype=torch.float32,
                                   cache_dir=tmp_path / "lat")
    files = [f for f in (tmp_path / "lat").iterdir() if f.suffix != ".lock"]  # the workers' lock (issue 12)
    assert [f.suffix for f in files] == [".safetensors"]
    import zipfile

    from safetensors import safe_open

    assert not zipfile.is_zipfile(files[0])  # not torch.save's pickle archive
    with safe_open(str(files[0]), framework="pt") as f:
        assert "cache" in f.metadata() and len(list(f.keys())) == 3 * 2 * 2 + 2 * len(built.prompt_embeds)
    loaded = precompute.load_cache(files[0])
    assert len(loaded.items) == 3 and [len(v) for v in loaded.items] == [2, 2, 2]  # flipped copies
    for a_list, b_list in zip(built.items, loaded.items):
        for a, b in zip(a_list, b_list):
            assert a.caption == b.caption and a.time_ids == b.time_ids
            assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    assert built.prompt_embeds.keys() == loaded.prompt_embeds.keys() and "" in loaded.prompt_embeds
    for k in built.prompt_embeds:
        assert all(torch.equal(x, y) for x, y in zip(built.prompt_embeds[k], loaded.prompt_embeds[k]))


def test_a_config_being_trained_by_a_live_process_is_left_to_it(tmp_path, caplog):
    cfg = typed(tmp_path, "trainer.max_steps=1")
    directory = variant_dir(cfg)
    directory.mkdir(parents=True)
    with open(directory / LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        assert runner.run(cfg, "variant", tmp_path / "out") is None
    assert "being trained by another live process (pid 4242 on elsewhere)" in caplog.text
    assert not (tmp_path / "mlflow.db").exists() or not runs_of_or_none(tmp_path)
    assert not (tmp_path / "out" / "lora").exists()


def runs_of_or_none(tmp_path):
    exp = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("unit")
    return None if exp is None else runs_of(tmp_path)[1]


def test_a_finished_config_whose_run_is_nan_is_trained_again_not_skipped(tmp_path, caplog):
    cfg = typed(tmp_path, "trainer.max_steps=4", "trainer.lr=1e30")
    assert runner.run(cfg, "variant", tmp_path / "out1") is None
    client, runs = runs_of(tmp_path)
    assert [r.data.tags["status"] for r in runs] == ["nan"]
    caplog.set_level("INFO")
    assert runner.run(cfg, "variant", tmp_path / "out2") is None
    assert "already finished" not in caplog.text
    client, runs = runs_of(tmp_path)
    assert all(r.data.tags["status"] == "nan" for r in runs)

    # A record saying ok (as written before the nan verdict existed), whose run's tracking journal
    # is still there: the store's nan for that very run wins, and the variant trains from the start.
    directory = variant_dir(cfg)
    (directory / "result.json").write_text(json.dumps({"status": "ok", "run_id": runs[0].info.run_id,
                                                       "final_loss": 0.1, "output_dir": str(tmp_path / "out1")}))
    journal = tmp_path / "out1" / "tracking_journal" / "journal.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text("")
    caplog.clear()
    assert runner.run(cfg, "variant", tmp_path / "out3") is None
    assert "has status 'nan'" in caplog.text and "trained again from the start" in caplog.text
    assert "already finished" not in caplog.text and "resuming" not in caplog.text
    assert not (directory / "result.json").exists()
