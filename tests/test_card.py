"""Issue 17 (the card) and issue 20 (checkpointing=auto): precision=auto, the bf16 preflight,
card profiles for the memory guard and the dry run, gradient_checkpointing=auto.

No GPU here: CUDA is faked by monkeypatching torch.cuda's queries. What only a real card can
show is in the `gpu`-marked tests at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from sdxl_ablate.config import Config, ConfigError, Precision, config_hash, to_typed
from sdxl_ablate.model import precision as prec
from sdxl_ablate.run import preflight, runner
from sdxl_ablate.train import plan
from sdxl_ablate.train.memory import GIB, MemoryGuard

from .conftest import ROOT, compose_config, tiny_overrides

MIB = 1024**2
PROFILES = {"t4_16gb": ("Tesla T4", 15360, 1024, False), "l4_24gb": ("NVIDIA L4", 23034, 1024, True),
            "a10g_24gb": ("NVIDIA A10G", 23028, 1024, True), "a100_40gb": ("NVIDIA A100 40GB", 40960, 1024, True),
            "a100_80gb": ("NVIDIA A100 80GB", 81920, 1536, True)}


def fake_gpus(monkeypatch, *gpus: tuple[str, tuple[int, int]]):
    """torch.cuda answers as if these GPUs were visible. is_bf16_supported says True for every one
    of them, as it does on a T4 (emulated bf16): the rule must not rely on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    def index(i):
        return (i.index or 0) if isinstance(i, torch.device) else int(i or 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: gpus[index(i)][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: gpus[index(i)][1])


T4, A100, L4 = ("Tesla T4", (7, 5)), ("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA L4", (8, 9))


def typed(tmp_path, *extra, precision=None):
    return to_typed(compose_config(tiny_overrides(tmp_path, "study=card", *extra, precision=precision)))


# --- trainer.precision=auto ---------------------------------------------------------------------


def test_auto_is_the_default_precision(tmp_path):
    assert to_typed(compose_config([])).trainer.precision == Precision.auto


@pytest.mark.parametrize("gpus,want", [((T4,), "fp16"), ((A100,), "bf16"), ((L4,), "bf16"),
                                       ((A100, T4), "fp16")])  # a host with both: every GPU must run it
def test_auto_resolves_by_compute_capability_not_by_is_bf16_supported(tmp_path, monkeypatch, gpus, want):
    fake_gpus(monkeypatch, *gpus)
    cfg, choice = prec.resolve_precision(typed(tmp_path, "device=auto"))
    assert (cfg.trainer.precision.value, choice.requested, choice.resolved) == (want, "auto", want)
    assert choice.tags()["trainer.precision_resolved"] == want
    if want == "fp16":
        assert "Tesla T4 (cuda:" in choice.reason and "compute capability 7.5" in choice.reason


def test_auto_is_fp32_on_the_cpu_so_the_demo_and_the_pins_train_as_before(tmp_path, monkeypatch):
    fake_gpus(monkeypatch, A100)  # visible, but device=cpu asks for none of them
    cfg, choice = prec.resolve_precision(typed(tmp_path, "device=cpu"))
    assert (cfg.trainer.precision, choice.reason) == (Precision.fp32, "auto on the CPU: fp32")
    # The same config as an explicit fp32: one training, one hash.
    assert config_hash(cfg) == config_hash(typed(tmp_path, "device=cpu", precision="fp32"))


def test_cuda_n_resolves_by_that_gpu_only(tmp_path, monkeypatch):
    fake_gpus(monkeypatch, T4, A100)
    assert prec.resolve_precision(typed(tmp_path, "device=cuda:1"))[1].resolved == "bf16"
    assert prec.resolve_precision(typed(tmp_path, "device=cuda:0"))[1].resolved == "fp16"


def test_explicit_precisions_are_kept(tmp_path, monkeypatch):
    fake_gpus(monkeypatch, T4)
    for p in ("fp32", "fp16", "bf16"):
        cfg, choice = prec.resolve_precision(typed(tmp_path, "device=auto", precision=p))
        assert (cfg.trainer.precision.value, choice.reason) == (p, "set explicitly")


def test_the_hash_holds_the_resolved_precision(tmp_path, monkeypatch):
    cfg = typed(tmp_path, "device=auto")
    fake_gpus(monkeypatch, T4)
    on_t4 = prec.resolve_precision(cfg)[0]
    fake_gpus(monkeypatch, A100)
    on_a100 = prec.resolve_precision(cfg)[0]
    assert config_hash(on_t4) != config_hash(on_a100)  # two different trainings
    assert config_hash(on_t4) == config_hash(typed(tmp_path, "device=auto", precision="fp16"))


def test_an_unresolved_auto_has_no_dtype(tmp_path):
    with pytest.raises(ValueError, match="trainer.precision=auto names no dtype until it is resolved"):
        prec.compute_dtype(typed(tmp_path))


def test_explicit_bf16_on_a_t4_is_a_preflight_problem_naming_the_card_and_fp16(tmp_path, monkeypatch):
    fake_gpus(monkeypatch, T4)
    (problem,) = preflight.precision_problems(typed(tmp_path, "device=auto", precision="bf16"))
    assert problem.startswith("trainer.precision=bf16: Tesla T4 (cuda:0, compute capability 7.5) has no native bf16")
    assert "trainer.precision=fp16" in problem
    assert preflight.precision_problems(typed(tmp_path, "device=auto", precision="fp16")) == []
    assert preflight.precision_problems(typed(tmp_path, "device=auto")) == []  # auto picks fp16 itself
    assert preflight.precision_problems(typed(tmp_path, "device=cpu", precision="bf16")) == []
    fake_gpus(monkeypatch, A100)
    assert preflight.precision_problems(typed(tmp_path, "device=auto", precision="bf16")) == []


FAKE_T4_CLI = """
import sys, torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.is_bf16_supported = lambda *a, **k: True
torch.cuda.get_device_name = lambda i=0: "Tesla T4"
torch.cuda.get_device_capability = lambda i=0: (7, 5)
import runpy
sys.argv = ["sdxl_ablate", *sys.argv[1:]]
runpy.run_module("sdxl_ablate", run_name="__main__", alter_sys=True)
"""


def test_the_cli_stops_explicit_bf16_on_a_t4_with_the_preflight_exit_code(tmp_path):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    args = tiny_overrides(tmp_path, "study=bf16t4", "device=auto", precision="bf16")
    proc = subprocess.run([sys.executable, "-c", FAKE_T4_CLI, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 101, proc.stderr[-3000:]
    assert "preflight failed, nothing was trained" in proc.stderr
    assert "Tesla T4 (cuda:0, compute capability 7.5) has no native bf16" in proc.stderr
    assert "trainer.precision=fp16" in proc.stderr
    assert not (tmp_path / "checkpoints").exists() and not list(tmp_path.rglob("*.safetensors"))


def test_a_run_records_the_precision_and_checkpointing_that_ran(tmp_path):
    cfg = typed(tmp_path, "trainer.max_steps=1", "data.sample_size=6", "data.heldout=1")
    assert (cfg.trainer.precision, cfg.trainer.gradient_checkpointing) == (Precision.auto, "auto")
    runner.run(cfg, "auto", tmp_path / "out")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("card").experiment_id])
    tags, params = run.data.tags, run.data.params
    assert tags["status"] == "ok"
    assert (tags["trainer.precision_requested"], tags["trainer.precision_resolved"]) == ("auto", "fp32")
    assert params["trainer.precision"] == "fp32" and tags["trainer.precision"] == "fp32"  # what ran
    assert (tags["trainer.gradient_checkpointing_requested"], tags["trainer.gradient_checkpointing_resolved"]) == (
        "auto", "true")
    assert tags["trainer.gradient_checkpointing_reason"].startswith("auto without a memory prediction (cpu")
    logged = OmegaConf.create(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)) and
                              Path(tmp_path / "config.yaml").read_text())
    assert logged.trainer.precision == "fp32"  # the logged config does not say auto


# --- card profiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_each_card_profile_budgets_its_total_less_the_overhead_and_says_where_the_numbers_come_from(tmp_path, name):
    card, total, overhead, bf16 = PROFILES[name]
    m = typed(tmp_path, f"memory={name}").memory
    assert (m.card, m.card_total_mib, m.overhead_mib, m.bf16_native, m.budget_gib) == (card, total, overhead, bf16, None)
    assert m.budget() == (total - overhead) / 1024
    assert m.overhead_source.startswith("provisional (public reports, not measured here)")
    assert "python -m sdxl_ablate.perf.card_overhead" in m.overhead_source
    assert "not measured here" in m.total_source
    text = (ROOT / "conf" / "memory" / f"{name}.yaml").read_text()
    assert "PROVISIONAL, NOT A MEASUREMENT OF OURS" in text and "pytorch/pytorch#107667" in text.replace(
        "github.com/pytorch/pytorch/issues/107667", "pytorch/pytorch#107667")


def test_unlimited_is_a_plain_budget_without_a_card(tmp_path):
    m = typed(tmp_path, "memory=unlimited").memory
    assert (m.card, m.card_total_mib, m.budget(), m.overhead_gib(), m.enforce) == (None, None, 1024.0, 0.0, False)


@pytest.mark.parametrize("overrides,message", [
    (["memory.card_total_mib=0"], "memory.card_total_mib=0: must be > 0"),
    (["memory.overhead_mib=-1"], "memory.overhead_mib=-1: must be >= 0"),
    (["memory.overhead_mib=15360"], "memory.overhead_mib=15360: must be below memory.card_total_mib=15360"),
    (["memory.budget_gib=12"], "memory.budget_gib=12.0 with memory.card_total_mib=15360"),
    (["memory.card_total_mib=null"], "neither memory.card_total_mib"),
    (["memory=unlimited", "memory.budget_gib=0"], "memory.budget_gib=0.0: must be > 0"),
])
def test_bad_memory_values_are_named(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        typed(tmp_path, *overrides)


def fake_cuda_allocator(monkeypatch, total: int, reserved: int, allocated: int) -> list:
    fractions = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": total})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: fractions.append(f))
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None, raising=False)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: reserved)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: allocated)
    return fractions


def test_the_guard_caps_the_allocator_at_the_card_total_less_the_overhead(tmp_path, monkeypatch):
    # An 80 GiB GPU emulating a T4: the cap is (15360 - 1024) MiB of its total.
    fractions = fake_cuda_allocator(monkeypatch, total=80 * GIB, reserved=10 * GIB, allocated=9 * GIB)
    guard = MemoryGuard.for_config(typed(tmp_path).memory, torch.device("cuda"))
    guard.start()
    assert fractions == [(15360 - 1024) * MIB / (80 * GIB)]
    peak = guard.peak()
    # The card-side peak: the allocator's reserved plus what the card holds outside it.
    assert peak == {"memory/peak_allocated_gib": 9.0, "memory/peak_reserved_gib": 10.0, "memory/peak_card_gib": 11.0}
    assert guard.headroom(peak) == {"memory/headroom_gib": 4.0}  # 14.0 GiB budget - 10.0 reserved = 15.0 - 11.0


def test_without_a_card_profile_there_is_no_card_side_peak(tmp_path, monkeypatch):
    fractions = fake_cuda_allocator(monkeypatch, total=80 * GIB, reserved=2 * GIB, allocated=GIB)
    guard = MemoryGuard.for_config(typed(tmp_path, "memory=unlimited", "memory.enforce=true").memory,
                                   torch.device("cuda"))
    guard.start()
    assert fractions == [1.0] and "memory/peak_card_gib" not in guard.peak()


def test_the_dry_runs_headroom_uses_the_guards_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "simulate_step", lambda cfg: type("S", (), {"peak_reserved_gib": 10.0})())
    cfg = to_typed(compose_config(["model=sdxl_random", "memory=a100_40gb"]))
    assert plan.predicted_fit(cfg, torch.device("cuda", 0)) == {
        "plan/predicted_peak_gib": 10.0, "plan/predicted_headroom_gib": (40960 - 1024) / 1024 - 10.0}


# --- trainer.gradient_checkpointing=auto ---------------------------------------------------------


def sdxl(*overrides):
    return to_typed(compose_config(["model=sdxl_random", *overrides]))


def recording(peak_gib: float, seen: list):
    def predict(cfg):
        seen.append(cfg.trainer.gradient_checkpointing)
        return peak_gib
    return predict


@pytest.mark.parametrize("predicted,enabled", [(8.0, False), (12.6, False), (12.7, True), (20.0, True)])
def test_auto_checkpointing_is_off_only_where_the_variant_fits_without_it(predicted, enabled):
    # T4 profile: budget 14.0 GiB, less the 10% margin for the dry run's error: 12.6 GiB.
    seen = []
    cfg, choice = plan.resolve_checkpointing(sdxl(), torch.device("cuda", 0), recording(predicted, seen))
    assert seen == [False]  # predicted without checkpointing
    assert (cfg.trainer.gradient_checkpointing, choice.enabled, choice.requested) == (enabled, enabled, "auto")
    assert choice.tags()["trainer.gradient_checkpointing_resolved"] == str(enabled).lower()
    assert f"{predicted:.2f} GiB {'does not fit' if enabled else 'fits'} the budget 14.00 GiB" in choice.reason


def test_a_larger_card_lets_auto_switch_checkpointing_off():
    seen = []
    assert plan.resolve_checkpointing(sdxl("memory=a100_80gb"), torch.device("cuda", 0),
                                      recording(20.0, seen))[1].enabled is False


@pytest.mark.parametrize("value", [True, False])
def test_explicit_checkpointing_is_kept_without_a_prediction(value):
    def never(cfg):
        raise AssertionError("no prediction for an explicit value")
    cfg, choice = plan.resolve_checkpointing(sdxl(f"trainer.gradient_checkpointing={str(value).lower()}"),
                                             torch.device("cuda", 0), never)
    assert (cfg.trainer.gradient_checkpointing, choice.reason) == (value, "set explicitly")


def test_auto_checkpointing_without_a_prediction_is_on():
    def never(cfg):
        raise AssertionError("the plan does not predict the CPU or the tiny model")
    for cfg, device in ((sdxl(), torch.device("cpu")), (to_typed(compose_config(["model=tiny"])), torch.device("cuda", 0))):
        resolved, choice = plan.resolve_checkpointing(cfg, device, never)
        assert resolved.trainer.gradient_checkpointing is True and choice.reason.startswith("auto without a memory prediction")


def test_a_failed_prediction_means_on_and_says_why():
    def broken(cfg):
        raise RuntimeError("meta tensors ran out")
    cfg, choice = plan.resolve_checkpointing(sdxl(), torch.device("cuda", 0), broken)
    assert cfg.trainer.gradient_checkpointing is True
    assert choice.reason == "auto: no memory prediction (RuntimeError: meta tensors ran out): on"


def test_unresolved_auto_on_cuda_cannot_reach_training():
    from sdxl_ablate.train.auto import checkpointing_on

    with pytest.raises(ValueError, match="needs the dry run's prediction"):
        checkpointing_on(sdxl(), torch.device("cuda", 0))
    assert checkpointing_on(sdxl(), torch.device("cpu")) is True


@pytest.mark.parametrize("value", ["yes", "on"])
def test_a_bad_checkpointing_value_is_named(value):
    with pytest.raises(ConfigError, match=f"trainer.gradient_checkpointing='{value}': must be true, false or auto"):
        to_typed(compose_config([f"trainer.gradient_checkpointing={value}"]))


# --- on a GPU (a later session: no GPU was lent when this was written) --------------------------


@pytest.mark.gpu
def test_on_a_gpu_the_t4_profile_refuses_what_a_t4_could_not_hold(tmp_path):
    guard = MemoryGuard.for_config(typed(tmp_path, "device=cuda").memory, torch.device("cuda", 0))
    try:
        guard.start()  # cap: 14.0 GiB of the allocator, whatever the GPU's size
        under = torch.empty(int(13.5 * GIB), dtype=torch.uint8, device="cuda:0")
        del under
        torch.cuda.empty_cache()
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(14.5 * GIB), dtype=torch.uint8, device="cuda:0")  # fits 16 GiB, not the T4
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_on_a_gpu_auto_precision_follows_the_real_capability(tmp_path):
    cfg, choice = prec.resolve_precision(typed(tmp_path, "device=cuda:0"))
    want = "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"
    assert (cfg.trainer.precision.value, choice.resolved) == (want, want)


def test_a_config_recorded_before_the_card_profiles_still_reads(tmp_path):
    # What runs logged as config.yaml before issue 17: a flat 16 GiB budget, bf16, checkpointing on.
    old = OmegaConf.create({"memory": {"budget_gib": 16.0, "enforce": True, "expandable_segments": True},
                            "trainer": {"precision": "bf16", "gradient_checkpointing": True}})
    with pytest.raises(ConfigError, match="memory.budget_gib=16.0 with memory.card_total_mib=15360"):
        to_typed(OmegaConf.merge(OmegaConf.structured(Config), old))
    cfg = to_typed(OmegaConf.merge(OmegaConf.structured(Config), runner.from_before_card_profiles(old)))
    assert (cfg.memory.card, cfg.memory.card_total_mib, cfg.memory.budget()) == (None, None, 16.0)
    assert (cfg.trainer.precision, cfg.trainer.gradient_checkpointing) == (Precision.bf16, True)


def test_a_job_that_claims_a_t4_with_explicit_bf16_fails_before_the_guard_starts(tmp_path, monkeypatch):
    # The preflight checks what it can see; a job that ends up on a T4 anyway stops at its claim,
    # with the same message, recorded as its run's error.
    import contextlib

    from sdxl_ablate.run.devices import DeviceClaim, Gpu

    fake_gpus(monkeypatch, T4)
    monkeypatch.setattr(runner, "acquire_device", lambda *a, **k: DeviceClaim(torch.device("cuda", 0),
                                                                              Gpu(0, "GPU-fake", "Tesla T4")))
    started = []
    monkeypatch.setattr(MemoryGuard, "start", lambda self: started.append(self))

    class Tags:
        def set_tags(self, tags):
            pass

    cfg = typed(tmp_path, "device=cuda:0", precision="bf16")
    with contextlib.ExitStack() as held, pytest.raises(RuntimeError, match="Tesla T4 .* has no native bf16"):
        runner.claim_device(cfg, None, held, Tags())
    assert started == []
    runner.claim_device(typed(tmp_path, "device=cuda:0", precision="fp16"), None, contextlib.ExitStack(), Tags())
    assert len(started) == 1
