"""The model: SDXL loaded from the hub or a directory, or built in code (tiny, full-size
random); the LoRA adapters and their files; dtypes and placement; the frozen base shared by a
sweep's variants; SDXL's original (kohya) module names."""
