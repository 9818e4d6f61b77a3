"""`python -m sdxl_ablate.plan`: the command-line entry point of sdxl_ablate/perf/plan.py."""

from sdxl_ablate.perf.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
