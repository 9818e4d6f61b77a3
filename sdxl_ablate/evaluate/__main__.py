"""`python -m sdxl_ablate.evaluate --run-id ID`: re-evaluate a finished variant into its own run."""

from __future__ import annotations

def main(argv: list[str] | None = None) -> int:
    """`python -m sdxl_ablate.evaluate --run-id ID [eval=tiny] [eval.steps=10]`: evaluate a
    finished variant again (e.g. after its evaluation failed), into the same MLflow run."""
    import argparse

    from sdxl_ablate.config import TrackingConfig
    from sdxl_ablate.run.runner import reevaluate

    parser = argparse.ArgumentParser(prog="python -m sdxl_ablate.evaluate", description=main.__doc__)
    parser.add_argument("--run-id", required=True, help="the variant's MLflow run id")
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite:///<cwd>/mlflow.db")
    parser.add_argument("--device", default=None, help="default: the run's recorded device setting")
    parser.add_argument("overrides", nargs="*", help="eval=NAME or eval.KEY=VALUE")
    args = parser.parse_args(argv)
    metrics = reevaluate(args.run_id, TrackingConfig(uri=args.tracking_uri), args.overrides, args.device)
    if not metrics:
        print(f"evaluation of run {args.run_id} failed: see its eval_error tag and eval_error.txt")
        return 1
    print("\n".join(f"{k} = {v:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
