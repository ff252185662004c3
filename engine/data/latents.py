"""The latent cache: each image encoded once by the VAE (and once flipped), kept on disk.

kohya writes `<stem>.npz` beside each image and revalidates it only by keys and shape. Here the
cache lives under its own root, outside the user's folder, one safetensors file per image, named
by a key over the image's bytes, the VAE's identity and the bucket: a changed image or another VAE
never meets a stale latent, and an unchanged dataset encodes nothing on the second run.

Stored latents are latent_dist.sample() unscaled (the loop multiplies by the VAE's scaling factor,
0.13025 for SDXL). The sample's noise comes from a generator seeded by the key, so one image gives
the same latent on every run and every machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from loradrop.errors import UserError

from .. import tensorfile
from .buckets import fit_to_bucket
from .images import BadImage, load_rgb

log = logging.getLogger(__name__)

# Bump when anything that shapes a stored latent changes (resize, crop, normalisation, noise).
CACHE_FORMAT = "loradrop.latent.1"
Progress = Callable[[int, int], None]


def default_cache_dir() -> Path:
    """Where latents are cached when nothing says otherwise: outside every dataset, per user."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loradrop" / "latents"


@dataclass
class CachedLatent:
    latent: torch.Tensor  # [4, h/8, w/8] float32, unscaled
    flipped: torch.Tensor  # the encoding of the horizontally flipped (cropped) image
    original_size: tuple[int, int]  # (h, w) of the upright source image
    crop_top_left: tuple[int, int]  # (top, left) in bucket pixels
    target_size: tuple[int, int]  # (h, w) of the bucket
    key: str = ""


@dataclass
class _Job:
    index: int
    item: Any  # with .path (and, for a dataset Item, .current_path())
    bucket: tuple[int, int]

    @property
    def path(self) -> Path:
        return _where(self.item)


def _where(item) -> Path:
    """The item's file now: a dataset Item follows renames made since its scan."""
    current = getattr(item, "current_path", None)
    return current() if current is not None else Path(item.path)


class LatentCache:
    """Latents for dataset items, encoded on demand and stored under `root`.

    `encodes` counts images this instance encoded (a second `ensure` of the same items adds 0).
    When there is something to encode, the VAE is moved to `device` and `dtype` (fp32 by default:
    SDXL's VAE overflows in fp16) and encodes `batch_size` images of one bucket at a time, each
    with its flipped twin in the same forward pass.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        vae,
        vae_id: str,
        device,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 2,
        workers: int = 2,
    ):
        if not vae_id:
            raise ValueError("vae_id must identify the VAE's weights")
        self.root = Path(root)
        self.vae = vae
        self.vae_id = vae_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.workers = max(1, workers)  # threads decoding and resizing images ahead of the VAE
        self.encodes = 0
        config = vae.config
        self.channels = int(config.latent_channels)
        self.factor = 2 ** (len(config.block_out_channels) - 1)

    def ensure(self, items: Sequence, progress: Progress | None = None) -> list[CachedLatent]:
        """One CachedLatent per item, in order. `items` need `.path` and `.bucket` (w, h); a
        dataset Item that was renamed meanwhile (the file, or its folder) is read where it is now."""
        total = len(items)
        done = 0
        results: list[CachedLatent | None] = [None] * total
        with ThreadPoolExecutor(max_workers=4) as pool:
            keys = list(pool.map(lambda item: self._key(_sha256_file(_where(item)), item.bucket), items))
        todo: dict[tuple[int, int], list[_Job]] = defaultdict(list)
        for index, (item, key) in enumerate(zip(items, keys)):
            results[index] = self._load(key, tuple(item.bucket))
            if results[index] is None:
                todo[tuple(item.bucket)].append(_Job(index, item, tuple(item.bucket)))
            else:
                done += 1
        if progress:
            progress(done, total)
        if todo:
            self._place_vae()
        size = self.batch_size
        batches = [todo[b][i : i + size] for b in sorted(todo) for i in range(0, len(todo[b]), size)]
        # Images are decoded and fitted on worker threads (PIL releases the GIL) a few batches
        # ahead of the VAE, which then never waits for a JPEG.
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            ahead = [
                [pool.submit(self._prepare, job) for job in batch] for batch in batches[: self.workers + 1]
            ]
            for n, batch in enumerate(batches):
                if n + self.workers + 1 < len(batches):
                    ahead.append([pool.submit(self._prepare, job) for job in batches[n + self.workers + 1]])
                prepared = [f.result() for f in ahead[n]]
                ahead[n] = []
                for job, cached in zip(batch, self._encode(batch, prepared)):
                    results[job.index] = cached
                done += len(batch)
                if progress:
                    progress(done, total)
        return results  # type: ignore[return-value]  # every slot is filled above

    def _place_vae(self) -> None:
        # A dtype cast only when needed: diffusers warns on every .to(dtype=...) of a VAE.
        if next(self.vae.parameters()).dtype != self.dtype:
            self.vae.to(dtype=self.dtype)
        self.vae.to(self.device)

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def _key(self, image_sha256: str, bucket) -> str:
        w, h = bucket
        text = f"{CACHE_FORMAT}\0{image_sha256}\0{self.vae_id}\0{w}x{h}"
        return hashlib.sha256(text.encode()).hexdigest()

    def _load(self, key: str, bucket: tuple[int, int]) -> CachedLatent | None:
        """The stored entry, or None when there is none or it is unusable (then it is re-encoded)."""
        path = self.path_for(key)
        if not path.exists():
            return None
        shape = (self.channels, bucket[1] // self.factor, bucket[0] // self.factor)
        try:
            with tensorfile.TensorFile(path) as tf:
                meta = tf.metadata
                latent, flipped = tf.read("latent"), tf.read("flipped")
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                raise ValueError("metadata does not match its name")
            if tuple(latent.shape) != shape or tuple(flipped.shape) != shape:
                raise ValueError(f"shape {tuple(latent.shape)} is not {shape}")
            return CachedLatent(
                latent=latent.float(),
                flipped=flipped.float(),
                original_size=_pair(meta["original_size"]),
                crop_top_left=_pair(meta["crop_top_left"]),
                target_size=(bucket[1], bucket[0]),
                key=key,
            )
        except (UserError, OSError, KeyError, ValueError, RuntimeError) as e:
            log.warning("latent cache entry %s is unusable (%s); encoding the image again", path, e)
            return None

    def _prepare(self, job: _Job) -> tuple[torch.Tensor, str, tuple[int, int], tuple[int, int]]:
        """Read, decode and fit one image: (pixels [3, h, w] uint8, key, crop, original size)."""
        path = job.path  # looked up now: the folder may have been renamed while earlier batches encoded
        try:
            data = path.read_bytes()
            img = load_rgb(path, data)
        except OSError as e:
            raise UserError(
                f"{path} cannot be read any more ({e.strerror or e}); restore it or remove it from the dataset."
            ) from None
        except BadImage as e:  # corruption the scan's header checks could not see
            raise UserError(
                f"{path} cannot be decoded ({e.reason}); remove or replace it and run again."
            ) from None
        fitted, crop, original = fit_to_bucket(img, job.bucket)
        # Hash the bytes actually decoded: if the file changed since the key pass, the entry is
        # stored under the new content's key, never the old one.
        key = self._key(hashlib.sha256(data).hexdigest(), job.bucket)
        return torch.from_numpy(np.asarray(fitted).copy()).permute(2, 0, 1), key, crop, original

    @torch.no_grad()
    def _encode(self, batch: list[_Job], prepared: list[tuple]) -> list[CachedLatent]:
        pixels = [p[0] for p in prepared]
        metas = [p[1:] for p in prepared]
        x = torch.stack(pixels).to(self.device, self.dtype) / 127.5 - 1.0
        x = torch.cat([x, x.flip(-1)])  # originals, then their mirror images
        dist = self.vae.encode(x).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
        n = len(batch)
        out = []
        for i, (job, (key, crop, original)) in enumerate(zip(batch, metas)):
            generator = torch.Generator().manual_seed(int(key[:15], 16))
            noise = torch.randn((2, *mean.shape[1:]), generator=generator)
            latent = mean[i] + std[i] * noise[0]
            flipped = mean[n + i] + std[n + i] * noise[1]
            if not (torch.isfinite(latent).all() and torch.isfinite(flipped).all()):
                raise UserError(
                    f"The VAE gave non-finite latents for {job.path}; run the VAE in fp32 (no_half_vae)."
                )
            w, h = job.bucket
            meta = {
                "format": CACHE_FORMAT,
                "key": key,
                "vae_id": self.vae_id,
                "source": str(job.path),
                "bucket": f"{w}x{h}",
                "original_size": f"{original[0]},{original[1]}",
                "crop_top_left": f"{crop[0]},{crop[1]}",
            }
            tensorfile.write(self.path_for(key), {"latent": latent, "flipped": flipped}, meta)
            self.encodes += 1
            out.append(CachedLatent(latent, flipped, original, crop, (h, w), key))
        return out


def _sha256_file(path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise UserError(
            f"{path} cannot be read any more ({e.strerror or e}); restore it or remove it from the dataset."
        ) from None
    return digest.hexdigest()


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split(",")
    return int(a), int(b)
