"""Cost before and after running: the dry run's parameter counts and memory prediction (`python -m
sdxl_ablate.plan`), the GPU benchmarks (`python -m sdxl_ablate.bench`) and what a card holds outside
PyTorch's allocator, for the memory guard's card profiles (`python -m sdxl_ablate.perf.card_overhead`)."""
