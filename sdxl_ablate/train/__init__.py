"""Training: the loop every variant shares, its setup, the denoising objective, CUDA graphs,
checkpoints, the memory guard and data-parallel training under torchrun."""
