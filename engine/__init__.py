"""The torch library behind loradrop: models, data, training, and LoRA file tools.

Importing this package loads no torch; the names below are imported on first use, so the daemon's
server process can read recipes without pulling in the training stack.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ClybW": "loradrop.engine.train.clybw",
    "Recipe": "loradrop.engine.recipe",
    "load_sdxl": "loradrop.engine.models.sdxl",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loradrop.engine' has no attribute {name!r}")
