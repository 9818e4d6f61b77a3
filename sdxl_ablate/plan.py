"""`python -m sdxl_ablate.plan`: the command-line entry point of sdxl_ablate/train/plan.py."""

from sdxl_ablate.train.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
