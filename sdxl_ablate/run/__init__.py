"""Running a variant and a sweep: the runner that drives every stage into one MLflow run, the sweep
callback (sweep id, parent run, exit code), the preflight, picking up finished or interrupted runs,
GPU claims and Hydra launcher support, phase timings and progress labels."""
