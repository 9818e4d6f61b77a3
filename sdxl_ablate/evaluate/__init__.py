"""Evaluation: held-out loss, CLIP style and prompt scores against the base model, image
grids, sample images during training, and each variant's headline (`ablation/*`) metrics. `python
-m sdxl_ablate.evaluate` re-evaluates a finished run."""
