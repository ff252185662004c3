"""The latent cache with the tiny twin's VAE: what it stores, when it reuses, when it re-encodes."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from loradrop.engine.data.buckets import fit_to_bucket
from loradrop.engine.data.dataset import scan
from loradrop.engine.data.images import load_rgb
from loradrop.engine.data.latents import LatentCache
from loradrop.engine.models.sdxl import load_sdxl
from loradrop.engine.models.tiny import make_tiny
from loradrop.engine.recipe import Recipe
from loradrop.errors import UserError

# Small buckets keep the VAE quick: area 64², sides 32..128.
RECIPE = Recipe(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    model = load_sdxl(make_tiny(tmp_path_factory.mktemp("tiny") / "tiny.safetensors"), components=("vae",))
    return model.vae, model.vae_id


def ramp_image(size, seed):
    """Dark left, bright right, plus noise: far from mirror-symmetric, so flipping changes the
    encoding a lot."""
    w, h = size
    rng = np.random.default_rng(seed)
    halves = np.where(np.arange(w) < w // 2, 20, 230)[None, :, None]
    pixels = np.clip(halves + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, (size, ext) in enumerate([((64, 64), ".png"), ((100, 50), ".jpg"), ((45, 45), ".webp")]):
        ramp_image(size, i).save(folder / f"img{i}{ext}")
        (folder / f"img{i}.txt").write_text(f"caption {i}")
    return scan(folder, RECIPE)


def cache_files(root):
    return sorted(root.rglob("*.safetensors"))


def test_first_run_encodes_and_stores_outside_the_dataset(tiny_vae, dataset, tmp_path):
    vae, vae_id = tiny_vae
    before = sorted(p.name for p in dataset.folder.iterdir())
    root = tmp_path / "cache"
    cache = LatentCache(root, vae, vae_id, "cpu")
    calls = []
    latents = cache.ensure(dataset.items, progress=lambda done, total: calls.append((done, total)))
    assert cache.encodes == 3
    assert len(cache_files(root)) == 3
    assert sorted(p.name for p in dataset.folder.iterdir()) == before  # nothing written beside the images
    assert calls[0] == (0, 3) and calls[-1] == (3, 3)

    for item, cached in zip(dataset.items, latents):
        w, h = item.bucket
        assert cached.latent.shape == cached.flipped.shape == (4, h // 8, w // 8)
        assert cached.latent.dtype == torch.float32
        assert cached.target_size == (h, w)
        assert cached.original_size == (item.size[1], item.size[0])
    wide = latents[1]  # 100x50 in the 80x48 bucket: resized to 96x48, 8 columns cut each side
    assert dataset.items[1].bucket == (80, 48) and wide.crop_top_left == (0, 8)
    small = latents[2]  # 45x45, enlarged to 64x64
    assert dataset.items[2].bucket == (64, 64) and small.crop_top_left == (0, 0)


def z_scores(vae, pixels: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        dist = vae.encode(pixels[None]).latent_dist
    return ((latent - dist.mean[0]) / dist.std[0]).flatten()


def test_latents_are_unscaled_samples_of_the_image_and_its_mirror(tiny_vae, dataset, tmp_path):
    vae, vae_id = tiny_vae
    cached = LatentCache(tmp_path / "cache", vae, vae_id, "cpu").ensure(dataset.items)
    item = dataset.items[0]
    fitted, _, _ = fit_to_bucket(load_rgb(item.path), item.bucket)
    x = torch.from_numpy(np.asarray(fitted).copy()).permute(2, 0, 1).float() / 127.5 - 1
    for z in (z_scores(vae, x, cached[0].latent), z_scores(vae, x.flip(-1), cached[0].flipped)):
        # A sample of N(mean, std): standard normal z-scores (the mean itself would give 0, a
        # scaled latent or the wrong image would give a wide spread).
        assert abs(float(z.mean())) < 0.15 and 0.85 < float(z.std()) < 1.15
    # Against the unflipped image's distribution the flipped latent is off (the tiny twin's random
    # VAE has a wide std, so the gap is modest but clear).
    wrong = z_scores(vae, x, cached[0].flipped)
    assert float(wrong.std()) > 1.25


def test_second_run_encodes_nothing(tiny_vae, dataset, tmp_path):
    vae, vae_id = tiny_vae
    root = tmp_path / "cache"
    first = LatentCache(root, vae, vae_id, "cpu").ensure(dataset.items)
    again = LatentCache(root, vae, vae_id, "cpu")
    second = again.ensure(dataset.items)
    assert again.encodes == 0
    for a, b in zip(first, second):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.flipped, b.flipped)
        assert (a.original_size, a.crop_top_left, a.target_size) == (
            b.original_size,
            b.crop_top_left,
            b.target_size,
        )


def test_encoding_is_deterministic(tiny_vae, dataset, tmp_path):
    vae, vae_id = tiny_vae
    one = LatentCache(tmp_path / "one", vae, vae_id, "cpu").ensure(dataset.items)
    two = LatentCache(tmp_path / "two", vae, vae_id, "cpu", batch_size=1).ensure(dataset.items)
    for a, b in zip(one, two):
        assert a.key == b.key
        torch.testing.assert_close(a.latent, b.latent, rtol=1e-4, atol=1e-5)


def test_changed_image_is_encoded_again(tiny_vae, dataset, tmp_path):
    vae, vae_id = tiny_vae
    root = tmp_path / "cache"
    first = LatentCache(root, vae, vae_id, "cpu").ensure(dataset.items)
    ramp_image((64, 64), seed=99).save(dataset.items[0].path)  # same name, same size, new pixels
    cache = LatentCache(root, vae, vae_id, "cpu")
    second = cache.ensure(dataset.items)
    assert cache.encodes == 1
    assert not torch.equal(first[0].latent, second[0].latent)
    assert torch.equal(first[1].latent, second[1].latent)


def test_another_vae_is_encoded_again(tiny_vae, dataset, tmp_path):
    vae, vae_id = tiny_vae
    root = tmp_path / "cache"
    LatentCache(root, vae, vae_id, "cpu").ensure(dataset.items)
    other = LatentCache(root, vae, "another-vae", "cpu")
    other.ensure(dataset.items)
    assert other.encodes == 3
    assert len(cache_files(root)) == 6


def test_another_bucket_is_encoded_again(tiny_vae, dataset, tmp_path):
    vae, vae_id = tiny_vae
    root = tmp_path / "cache"
    LatentCache(root, vae, vae_id, "cpu").ensure(dataset.items)
    regrouped = scan(
        dataset.folder, Recipe(resolution=48, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    )
    cache = LatentCache(root, vae, vae_id, "cpu")
    out = cache.ensure(regrouped.items)
    assert cache.encodes == 3
    assert out[0].target_size == (48, 48)


def test_corrupt_cache_file_is_encoded_again(tiny_vae, dataset, tmp_path):
    vae, vae_id = tiny_vae
    root = tmp_path / "cache"
    first = LatentCache(root, vae, vae_id, "cpu").ensure(dataset.items)
    files = cache_files(root)
    files[0].write_bytes(b"not a safetensors file")
    files[1].write_bytes(files[1].read_bytes()[:200])  # truncated
    cache = LatentCache(root, vae, vae_id, "cpu")
    second = cache.ensure(dataset.items)
    assert cache.encodes == 2
    for a, b in zip(first, second):
        assert torch.equal(a.latent, b.latent)


def png_with_broken_pixels(size=(64, 64)) -> bytes:
    """A PNG whose chunk checksums are right but whose compressed pixels are garbage: the scan's
    checks pass it, only a full decode finds out."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", size[0], size[1], 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 10)[:2] + b"\xff" * 40
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_image_that_fails_to_decode_names_the_file(tiny_vae, dataset, tmp_path):
    vae, vae_id = tiny_vae
    bad = dataset.folder / "sneaky.png"
    bad.write_bytes(png_with_broken_pixels())
    (dataset.folder / "sneaky.txt").write_text("x")
    rescanned = scan(dataset.folder, RECIPE)
    assert [i.path.name for i in rescanned.items][-1] == "sneaky.png"
    with pytest.raises(UserError, match="sneaky.png cannot be decoded"):
        LatentCache(tmp_path / "cache", vae, vae_id, "cpu").ensure(rescanned.items)


@pytest.mark.parametrize("renamed", ["folder", "file"])
def test_a_rename_after_the_scan_is_followed(tiny_vae, dataset, tmp_path, renamed):
    """The daemon follows an inbox folder across renames; the latent cache failed the job when
    the folder (or one of its images) was renamed after the scan. Files are found by inode."""
    vae, vae_id = tiny_vae
    if renamed == "folder":
        moved = dataset.folder.rename(dataset.folder.with_name("renamed"))
        expected = [moved / item.path.name for item in dataset.items]
    else:
        moved = dataset.items[1].path.rename(dataset.folder / "other-name.jpg")
        expected = [item.path for item in dataset.items]
        expected[1] = moved
    assert [item.current_path() for item in dataset.items] == expected
    reference = (
        LatentCache(tmp_path / "ref", vae, vae_id, "cpu").ensure(scan(expected[0].parent, RECIPE).items)
        if renamed == "folder"
        else None
    )
    latents = LatentCache(tmp_path / "cache", vae, vae_id, "cpu").ensure(dataset.items)
    assert len(latents) == 3
    if reference is not None:
        assert all(torch.equal(a.latent, b.latent) for a, b in zip(latents, reference))


def test_a_file_gone_after_the_scan_is_still_one_sentence(tiny_vae, dataset, tmp_path):
    vae, vae_id = tiny_vae
    dataset.items[0].path.unlink()
    with pytest.raises(UserError, match="cannot be read any more"):
        LatentCache(tmp_path / "cache", vae, vae_id, "cpu").ensure(dataset.items)
