"""`python -m sdxl_ablate.bench`: the command-line entry point of sdxl_ablate/perf/bench.py."""

from sdxl_ablate.perf.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
