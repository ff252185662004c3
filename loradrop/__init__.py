"""loradrop: turn a folder of captioned images into a small, good SDXL LoRA."""

__version__ = "0.1.0"
