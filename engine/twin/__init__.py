"""The learnable twin: a small world of coloured shapes, a classical judge of it, and the script
that trains the tiny SDXL to draw that world (so tests can ask whether a LoRA learned anything)."""
