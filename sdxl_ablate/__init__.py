"""sdxl-ablate: reproducible ablation studies of LoRA fine-tuning on Stable Diffusion XL.

One subpackage per stage of the pipeline, each importing only from the stages before it
(tests/test_layout.py): config, track, data, model, train, evaluate, export, run, report, perf.
The modules directly here are command-line entry points.
"""
