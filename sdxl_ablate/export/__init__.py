"""The trained LoRA for other tools: kohya format (ComfyUI, A1111/Forge) or a clean diffusers file.
`python -m sdxl_ablate.export`."""
