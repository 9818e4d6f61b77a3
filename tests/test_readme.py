"""The README's commands, as a person types them: offline, on the CPU, in README order.

Every command in README.md's code blocks is classified below. An offline one is run as
written, in one fresh working directory (so later commands see what earlier ones made, as they
would for a reader going down the page), and must exit 0; an example of bad input (`$ ...`
followed by its output) must print that output. A placeholder (RUN_ID, ID, <config hash>) is
filled in with a real value; nothing else is changed. A command that is not run must say on its
own line what it needs (the hub, GPUs, a cluster). A README command this file does not know
fails the test: classify it, and run it if it is offline.

Slow (about 15 minutes on 2 cores): it trains the demo study and its seeds, as the README does.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.ui_check import stop

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV = REPO / ".venv"

pytestmark = pytest.mark.slow

# How each README command is checked. Keys are the commands as the README writes them
# (continuation lines joined, the trailing comment removed).
RUN = "run"                # run as written: exit 0
FILL = "fill"              # run with its placeholders filled in: exit 0
NEEDS = "needs"            # not run: its line says what it needs
SERVER = "server"          # a server: started, must answer, stopped
BROWSER = "browser"        # needs chromium: run where it is installed
THIS_SUITE = "this suite"  # `make test` runs this file
ACTIVATE = "activate"      # the README's one activation line: every later command runs after it

COMMANDS: dict[str, str] = {
    "make demo": RUN,
    "make test": THIS_SUITE,
    "source .venv/bin/activate": ACTIVATE,
    "python -m sdxl_ablate": NEEDS,
    "python -m sdxl_ablate -m lora.targets=attn,all": NEEDS,
    "python -m sdxl_ablate -m experiment=demo lora.targets=attn,all": RUN,
    "python -m sdxl_ablate -m sweep=naruto_study": NEEDS,
    "python -m sdxl_ablate experiment=demo variant=dora_prodigy": RUN,
    "python -m sdxl_ablate.plan model=sdxl_random lora.targets=all lora.rank=32": RUN,
    "python -m sdxl_ablate -m sweep=naruto_study experiment=demo trainer.seed=0,1,2": RUN,
    "python -m sdxl_ablate.report --study demo": RUN,
    "make ui-check": BROWSER,
    "make mlflow-ui": SERVER,
    "python -m sdxl_ablate lora.targets=atn": RUN,  # `$` examples: their output is checked
    "python -m sdxl_ablate lora.rank=0 lora.dropout=1.5": RUN,
    "python -m sdxl_ablate -m model=tiny data=sample lora.targets=attn,all": RUN,
    "python -m sdxl_ablate.evaluate --run-id RUN_ID": FILL,
    "python -m sdxl_ablate.evaluate --run-id RUN_ID eval=tiny eval.steps=10": FILL,
    "python -m sdxl_ablate.report --study demo --sweep ID": FILL,
    "python -m sdxl_ablate.report --study demo --all-sweeps": RUN,
    "python -m sdxl_ablate.report --study demo --score eval/heldout_loss": RUN,
    "python -m sdxl_ablate.export RUN_ID --out naruto_style.safetensors": FILL,
    "python -m sdxl_ablate.export RUN_ID --format kohya --dtype bf16 --out naruto_bf16.safetensors": FILL,
    "python -m sdxl_ablate.export path/to/pytorch_lora_weights.safetensors --format kohya --title naruto "
    "--out naruto.safetensors": RUN,
    "python -m sdxl_ablate.export path/to/pytorch_lora_weights.safetensors --format diffusers --out clean.safetensors": RUN,
    "python -m sdxl_ablate.bench --study lora_targets model=tiny data=sample eval=off device=cpu "
    "trainer.max_steps=3 trainer.precision=fp32 --out results/study_tiny_cpu.json": RUN,
    "python -m sdxl_ablate.bench --study naruto_study --runs 2 model=sdxl_random data=sample data.sample_size=68 "
    "data.resolution=512 trainer.batch_size=8 trainer.max_steps=60 eval=off 'variant=attn,all' "
    "--out results/study_512px.json": NEEDS,
    "python -m sdxl_ablate experiment=demo variant=attn trainer.checkpoint_every=2": RUN,
    "python -m sdxl_ablate experiment=demo variant=attn trainer.resume=checkpoints/demo/<config hash>/step-00000028": FILL,
    "python -m sdxl_ablate -m sweep=naruto_study experiment=demo": RUN,
    "python -m sdxl_ablate -m sweep=naruto_study experiment=demo trainer.force=true": RUN,
    "python -m sdxl_ablate.replay outputs/demo/20261203-192000-3fa2c1": RUN,
    "python -m sdxl_ablate.replay outputs/demo/20261203-192000-3fa2c1 --tracking-uri sqlite:///mlflow.db": RUN,
    "python -m sdxl_ablate -m hydra/launcher=gpus_local sweep=naruto_study": NEEDS,
    "CUDA_VISIBLE_DEVICES=2,3 python -m sdxl_ablate -m hydra/launcher=gpus_local sweep=naruto_study": NEEDS,
    "python -m sdxl_ablate -m hydra/launcher=gpus_local hydra.launcher.n_jobs=2 sweep=naruto_study": NEEDS,
    "python -m sdxl_ablate -m hydra/launcher=slurm hydra.launcher.partition=gpu sweep=naruto_study "
    "tracking.uri=http://mlflow.internal:5000": NEEDS,
    "mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow-server.db "
    "--artifacts-destination ./mlflow-server-artifacts": SERVER,
    "python -m sdxl_ablate -m hydra/launcher=joblib hydra.launcher.n_jobs=4 experiment=demo device=cpu "
    "tracking.uri=http://127.0.0.1:5000 lora.rank=2,3,4,5": RUN,
    "torchrun --standalone --nproc_per_node=2 -m sdxl_ablate experiment=demo trainer.batch_size=8": NEEDS,
    "torchrun --standalone --nproc_per_node=2 -m sdxl_ablate experiment=demo device=cpu trainer.batch_size=4": RUN,
    "python -m sdxl_ablate.perf.scale_bench": NEEDS,
    "python -m sdxl_ablate.perf.scale_bench --dry-run": RUN,
    "python -m sdxl_ablate.perf.card_overhead": NEEDS,
}

# `$` examples whose command fails on purpose: the exit code they must give.
FAILS = {
    "python -m sdxl_ablate lora.targets=atn": 1,
    "python -m sdxl_ablate lora.rank=0 lora.dropout=1.5": 1,
    "python -m sdxl_ablate -m model=tiny data=sample lora.targets=attn,all": 101,  # the preflight's code
}


# --------------------------------------------------------------------------- reading the README
def readme_commands() -> list[tuple[str, str, list[str]]]:
    """(command, its trailing comment, the output the README shows for it) in README order."""
    found = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S):
        if lang == "bash":
            for line in re.sub(r"\\\n\s*", "", body).splitlines():
                command, _, comment = (re.split(r"\s(#)\s", line + " ", maxsplit=1) + ["", ""])[:3]
                if command.strip():
                    found.append((" ".join(command.split()), comment.strip(), []))
        elif lang == "" and body.lstrip().startswith("$ "):
            for example in re.split(r"^\$ ", body, flags=re.M)[1:]:
                command, *output = example.splitlines()
                command, _, comment = command.partition(" #")
                found.append((" ".join(command.split()), comment.strip(), [o for o in output if o.strip()]))
    return found


def test_every_readme_command_is_classified_and_what_is_not_run_says_what_it_needs():
    commands = readme_commands()
    unknown = [c for c, _, _ in commands if c not in COMMANDS]
    assert not unknown, f"README commands this test does not know (classify them in COMMANDS): {unknown}"
    stale = sorted(set(COMMANDS) - {c for c, _, _ in commands})
    assert not stale, f"COMMANDS lists commands the README no longer shows: {stale}"
    for command, comment, _ in commands:
        if COMMANDS[command] == NEEDS:
            assert "needs" in comment, f"README: `{command}` is not run offline, so its line must say what it needs"


# --------------------------------------------------------------------------- running them
def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with code {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


class Reader:
    """A person going down the README in one fresh directory with the project's .venv: its bin
    is not on PATH until the README's activation line has run, and every later command runs
    after that line, in bash, as in the reader's shell."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        for name in ("Makefile", "pyproject.toml"):
            shutil.copy2(REPO / name, workdir / name)  # mtimes kept: make sees .venv as installed
        (workdir / ".venv").symlink_to(VENV)
        path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                               if Path(p).resolve() != (VENV / "bin").resolve())
        self.env = {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, "PATH": path,
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(REPO)}
        self.log: list[str] = []
        self.servers: list[subprocess.Popen] = []
        self.activation = ""  # the README's activation line, once it has been read

    def shell(self, command: str) -> str:
        return f"{self.activation} && {command}" if self.activation else command

    def run(self, command: str, expect_rc: int = 0, timeout: float = 900) -> str:
        start = time.monotonic()
        p = subprocess.run(self.shell(command), shell=True, executable="/bin/bash", cwd=self.dir, env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
        self.log.append(f"{time.monotonic() - start:6.1f} s  rc={p.returncode}  {command}")
        assert p.returncode == expect_rc, f"`{command}` exited {p.returncode} (want {expect_rc}):\n{out[-4000:]}"
        return out

    def serve(self, command: str, url: str) -> None:
        proc = subprocess.Popen(self.shell(command), shell=True, executable="/bin/bash", cwd=self.dir, env=self.env,
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self.servers.append(proc)
        _wait_http(url, proc)
        self.log.append(f"serving      {command}")

    def stop_servers(self) -> None:
        for proc in self.servers:
            stop(proc)  # the server and the workers it started (its own session)
        self.servers.clear()

    # ---- the values a reader would copy from the UI or the report
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(f"sqlite:///{self.dir}/mlflow.db")

    def finished_run(self):
        client = self.client()
        exp = client.get_experiment_by_name("demo")
        runs = client.search_runs([exp.experiment_id], "tags.kind = 'variant' and tags.status = 'ok'",
                                  order_by=["attributes.start_time DESC"])
        return next(r for r in runs if r.data.tags.get("mlflow.runName") == "attn")  # variant=attn

    def fill(self, command: str) -> str:
        run = self.finished_run()
        if "<config hash>" in command:
            from sdxl_ablate.config import config_hash, to_typed
            from tests.conftest import compose_config

            chash = config_hash(to_typed(compose_config(["experiment=demo", "variant=attn"])))
            steps = sorted((self.dir / "checkpoints/demo" / chash).glob("step-*"))
            assert steps, f"no checkpoint of variant=attn under checkpoints/demo/{chash}"
            command = command.replace("checkpoints/demo/<config hash>/step-00000028",
                                      str(steps[-1].relative_to(self.dir)))
        command = command.replace("RUN_ID", run.info.run_id)
        return re.sub(r"--sweep ID\b", f"--sweep {run.data.tags['sweep_id']}", command)

    def before(self, command: str) -> None:
        """What the page around a command says exists already."""
        if "path/to/pytorch_lora_weights.safetensors" in command and not (self.dir / "path/to").exists():
            # "a diffusers LoRA file you have": the one MLflow holds for a finished run.
            (self.dir / "path/to").mkdir(parents=True)
            got = self.client().download_artifacts(self.finished_run().info.run_id,
                                                   "lora/pytorch_lora_weights.safetensors", str(self.dir / "path"))
            Path(got).rename(self.dir / "path/to/pytorch_lora_weights.safetensors")
        if "replay outputs/demo/20261203-192000-3fa2c1" in command and not (self.dir / "outputs/demo/20261203-192000-3fa2c1").exists():
            # A run whose store failed mid-way (a file where its directory should be), so it
            # trained and journaled; then the store is fixed and the journal replayed. Made
            # in-process: from the command line the preflight refuses an unwritable store.
            from sdxl_ablate.run import runner
            from sdxl_ablate.config import to_typed
            from tests.conftest import compose_config

            blocked = self.dir / "was_down"
            blocked.write_text("not a directory")
            cfg = to_typed(compose_config([
                "experiment=demo", "variant=attn", "trainer.max_steps=3", "eval=off",
                f"tracking.uri=sqlite:///{blocked}/mlflow.db", f"tracking.artifact_root={self.dir}/mlartifacts",
                f"trainer.checkpoint_dir={self.dir}/checkpoints", "trainer.force=true"]))
            out = self.dir / "outputs/demo/20261203-192000-3fa2c1"
            assert runner.run(cfg, "variant=attn,trainer.max_steps=3", out) is not None
            assert (out / "tracking_journal/journal.jsonl").is_file()
            blocked.unlink()
            blocked.mkdir()


@pytest.mark.timeout(3600)  # the whole README, demo and seeds included: about 15 minutes on 2 cores
def test_the_readme_commands_work_as_written(tmp_path, capsys):
    if not (VENV / ".installed-stamp").is_file() or \
            (VENV / ".installed-stamp").stat().st_mtime < (REPO / "pyproject.toml").stat().st_mtime:
        pytest.skip("needs the project's .venv up to date: run `make install` (make test does)")
    reader = Reader(tmp_path)
    try:
        for command, _, output in readme_commands():
            how = COMMANDS[command]
            if how in (NEEDS, THIS_SUITE):
                continue
            if how == ACTIVATE:
                reader.run(command)  # it must work as a command, too
                reader.activation = command
                continue
            if how == BROWSER:
                if shutil.which("chromium"):
                    reader.run(command)
                continue
            reader.before(command)
            if how == SERVER:  # both README servers listen on 5000
                assert _free(5000), f"port 5000 is taken: `{command}` needs it"
                reader.serve(command, "http://127.0.0.1:5000/health")
                if command == "make mlflow-ui":  # it shows the study's experiment; then it stops
                    with urllib.request.urlopen("http://127.0.0.1:5000/ajax-api/2.0/mlflow/experiments/"
                                                "get-by-name?experiment_name=demo", timeout=30) as r:
                        assert b'"name": "demo"' in r.read().replace(b'":"', b'": "')
                    reader.stop_servers()
                continue
            out = reader.run(reader.fill(command) if how == FILL else command, FAILS.get(command, 0))
            if output:  # the README shows what this prints: it must print that (wrapping aside)
                shown = " ".join(" ".join(output).split())
                assert shown in " ".join(out.split()), f"`{command}` no longer prints what the README shows:\n{out[-3000:]}"
    finally:
        reader.stop_servers()
        with capsys.disabled():
            print("\nREADME commands:\n  " + "\n  ".join(reader.log))


def test_the_activation_line_comes_before_every_command_that_needs_the_venv(tmp_path):
    """After `make demo` the README's commands run in .venv: its one activation line comes first,
    and without it `python` does not find the project's dependencies (as the issue saw)."""
    commands = [c for c, _, _ in readme_commands()]
    first_tool = min(i for i, c in enumerate(commands) if re.search(r"(^|\s)(python|mlflow|torchrun)\s", c))
    assert commands.index("source .venv/bin/activate") < first_tool, commands[first_tool]
    if not (VENV / "bin" / "activate").is_file():
        pytest.skip("needs the project's .venv (make install)")
    reader = Reader(tmp_path)
    probe = "python -c 'import hydra, sdxl_ablate'"
    reader.run(probe, expect_rc=1)  # not activated: no hydra
    reader.activation = "source .venv/bin/activate"
    reader.run(probe)
