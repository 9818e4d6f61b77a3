"""The study's report from MLflow: the ablation table, the verdict, plots and image grids. `python -m
sdxl_ablate.report`."""
