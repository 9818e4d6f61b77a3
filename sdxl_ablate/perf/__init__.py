"""Cost before and after running: the dry run's parameter counts and memory prediction (`python -m
sdxl_ablate.plan`) and the GPU benchmarks (`python -m sdxl_ablate.bench`)."""
