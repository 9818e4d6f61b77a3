"""`python -m sdxl_ablate.replay`: the command-line entry point of sdxl_ablate/track/replay.py."""

from sdxl_ablate.track.replay import main

if __name__ == "__main__":
    raise SystemExit(main())
