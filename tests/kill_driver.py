"""`python -m tests.kill_driver <overrides>`: the real CLI, SIGKILLed at a chosen point.

KILL_AT=after_step:N kills the process right after step N (and its checkpoint, if one was due);
KILL_AT=in_write:N kills it in the middle of writing checkpoint N, after tearing the tensor file
in half (what a kill during the write leaves); KILL_AT=sweep_end makes the store fail when the
sweep records its end (`database is locked`), after every variant ran. Used by
test_resume_kill.py and test_sweep_lifecycle.py; no hook of this kind exists in the package itself.
STORE_DIES_AT=N:DB makes the sqlite store DB die for real when the step-N train/loss reaches it: its
header is zeroed in place (the original 100 bytes are kept in DB.header, to bring it back).
"""

from __future__ import annotations

import os
import signal

from sdxl_ablate.train import checkpoint as ck


def arm(kill_at: str) -> None:
    kind, _, n = kill_at.partition(":")
    if kind == "after_step":
        real = ck.Checkpointer.after_step

        def after_step(self, ts, total, n_train):
            out = real(self, ts, total, n_train)
            if ts.step == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        ck.Checkpointer.after_step = after_step
    elif kind == "in_write":
        real_save = ck.save_file

        def save_file(tensors, filename, *args, **kwargs):
            real_save(tensors, filename, *args, **kwargs)
            if f".step-{int(n):08d}.tmp-" in str(filename):
                os.truncate(filename, os.path.getsize(filename) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        ck.save_file = save_file
    elif kind == "sweep_end":
        import sqlite3

        from sdxl_ablate.run import sweep

        def tally(client, info):
            raise sqlite3.OperationalError("database is locked")

        sweep.tally = tally
    elif kind:
        raise SystemExit(f"KILL_AT={kill_at!r}: expected after_step:N, in_write:N or sweep_end")


def store_dies(spec: str) -> None:
    from sdxl_ablate.track import tracker

    n, _, db = spec.partition(":")
    real = tracker.Tracker.log_metrics

    def log_metrics(self, metrics, step=0, **kw):
        if "train/loss" in metrics and step == int(n) and not os.path.exists(db + ".header"):
            with open(db, "r+b") as f:
                header = f.read(100)
                f.seek(0)
                f.write(b"\0" * 100)
            with open(db + ".header", "wb") as f:
                f.write(header)
        return real(self, metrics, step, **kw)

    tracker.Tracker.log_metrics = log_metrics


if __name__ == "__main__":
    import runpy

    arm(os.environ.get("KILL_AT", ""))
    if os.environ.get("STORE_DIES_AT"):
        store_dies(os.environ["STORE_DIES_AT"])
    # Exactly `python -m sdxl_ablate <overrides>` (Hydra finds conf/ from the __main__ module's file).
    runpy.run_module("sdxl_ablate", run_name="__main__", alter_sys=True)
