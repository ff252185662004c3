"""A LoRA is listed only when every tensor in it is finite."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from loradrop.errors import UserError

from ..tensorfile import TensorFile


def finite_output(write: Callable[[Path], Path], out_dir: Path) -> Path:
    """Run `write(staging)`, which writes one LoRA into a hidden folder and returns its path;
    refuse it if a tensor is inf or NaN, else move it into `out_dir`. A file that is not finite is
    never listed, not even for a moment (listings skip hidden folders)."""
    staging = out_dir / f".staging-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        written = write(staging)
        with TensorFile(written) as tf:
            bad = next(
                (
                    k
                    for k, t in tf.read_all().items()
                    if t.is_floating_point() and not bool(t.isfinite().all())
                ),
                None,
            )
        if bad is not None:
            raise UserError(
                f"{written.name} would hold inf or NaN (in {bad}); it was not kept: lower the block weights, or retrain with a lower learning rate."
            )
        final = out_dir / written.name
        os.replace(written, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)
