"""Image loading: every mode to 8-bit RGB, EXIF orientation, and every kind of bad file refused."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from loradrop.engine.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, BadImage, check_image, load_rgb, to_rgb


def rgb_at(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def saved(tmp_path, name: str, img: Image.Image, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG that claims width x height but carries one row of data: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 4))
        + png_chunk(b"IEND", b"")
    )


def test_extensions():
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".webp"}


# ------------------------------------------------------------------ modes


def test_rgb_png_and_webp_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    for name, kw in [("a.png", {}), ("a.webp", {"lossless": True})]:
        path = saved(tmp_path, name, img, **kw)
        assert check_image(path) == (90, 70)
        assert np.array_equal(np.asarray(load_rgb(path)), pixels)


def test_rgba_composited_over_white(tmp_path):
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))
    for name in ("rgba.png", "rgba.webp"):
        out = load_rgb(saved(tmp_path, name, img, **({"lossless": True} if name.endswith("webp") else {})))
        assert rgb_at(out, (0, 0)) == (255, 255, 255)
        assert rgb_at(out, (1, 0)) == (255, 0, 0)
        assert rgb_at(out, (2, 0)) == pytest.approx((127, 127, 127), abs=1)


def test_la_composited_over_white(tmp_path):
    img = Image.new("LA", (64, 64), (0, 0))
    img.putpixel((1, 0), (40, 255))
    out = load_rgb(saved(tmp_path, "la.png", img))
    assert rgb_at(out, (0, 0)) == (255, 255, 255)
    assert rgb_at(out, (1, 0)) == (40, 40, 40)


def test_palette_with_and_without_transparency(tmp_path):
    img = Image.new("P", (64, 64), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    plain = load_rgb(saved(tmp_path, "p.png", img))
    assert rgb_at(plain, (0, 0)) == (10, 20, 30) and rgb_at(plain, (1, 0)) == (200, 100, 50)
    clear = load_rgb(saved(tmp_path, "pt.png", img, transparency=0))
    assert rgb_at(clear, (0, 0)) == (255, 255, 255) and rgb_at(clear, (1, 0)) == (200, 100, 50)


def test_trns_colour_in_rgb_and_grey(tmp_path):
    rgb = Image.new("RGB", (64, 64), (0, 0, 0))
    rgb.putpixel((1, 0), (9, 9, 9))
    out = load_rgb(saved(tmp_path, "t.png", rgb, transparency=(0, 0, 0)))
    assert rgb_at(out, (0, 0)) == (255, 255, 255) and rgb_at(out, (1, 0)) == (9, 9, 9)
    grey = Image.new("L", (64, 64), 0)
    grey.putpixel((1, 0), 77)
    out = load_rgb(saved(tmp_path, "tl.png", grey, transparency=0))
    assert rgb_at(out, (0, 0)) == (255, 255, 255) and rgb_at(out, (1, 0)) == (77, 77, 77)


def test_grey_and_bilevel(tmp_path):
    grey = Image.new("L", (64, 64), 99)
    assert rgb_at(load_rgb(saved(tmp_path, "l.png", grey))) == (99, 99, 99)
    assert rgb_at(load_rgb(saved(tmp_path, "l.jpg", grey, quality=100))) == pytest.approx((99, 99, 99), abs=1)
    bilevel = Image.new("1", (64, 64), 0)
    bilevel.putpixel((1, 0), 1)
    out = load_rgb(saved(tmp_path, "one.png", bilevel))
    assert rgb_at(out, (0, 0)) == (0, 0, 0) and rgb_at(out, (1, 0)) == (255, 255, 255)


def test_16_bit_grey_scaled_to_8_bit(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 300]], dtype=np.uint16).repeat(8, axis=0)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    path = saved(tmp_path, "g16.png", img)
    assert Image.open(path).mode.startswith("I;16")
    out = np.asarray(load_rgb(path))[0, :, 0]
    assert out.tolist() == [0, 100, 255, 1]  # Pillow's own convert would clip 25700 to 255
    with_trns = load_rgb(saved(tmp_path, "g16t.png", img, transparency=65535))
    assert rgb_at(with_trns, (2, 0)) == (255, 255, 255) and rgb_at(with_trns, (1, 0)) == (100, 100, 100)


def test_32_bit_int_and_float_modes():
    ints = Image.fromarray(np.array([[0, 257 * 50, 70000, -5]], dtype=np.int32), "I")
    assert np.asarray(to_rgb(ints))[0, :, 1].tolist() == [0, 50, 255, 0]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(floats))[0, :, 2].tolist() == [0, 128, 255, 255]


def test_pa_and_ycbcr_modes():
    pa = Image.new("PA", (4, 4), (0, 0))
    pa.putpalette([250, 0, 0] + [0] * 765)
    pa.putpixel((1, 0), (0, 255))
    out = to_rgb(pa)
    assert rgb_at(out, (0, 0)) == (255, 255, 255) and rgb_at(out, (1, 0)) == (250, 0, 0)
    assert rgb_at(to_rgb(Image.new("RGB", (4, 4), (10, 200, 30)).convert("YCbCr"))) == pytest.approx(
        (10, 200, 30), abs=2
    )


def test_cmyk_jpeg(tmp_path):
    path = saved(tmp_path, "c.jpg", Image.new("CMYK", (64, 64), (0, 255, 255, 0)), quality=100)
    assert Image.open(path).mode == "CMYK"
    assert rgb_at(load_rgb(path)) == pytest.approx((255, 0, 0), abs=2)


def test_animated_images_use_the_first_frame(tmp_path):
    red, blue = Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 255))
    for name, kw in [
        ("a.png", {}),
        ("a.webp", {"lossless": True}),
        ("a.jpg", {"format": "MPO", "quality": 100}),
    ]:
        path = saved(tmp_path, name, red, save_all=True, append_images=[blue], **kw)
        assert getattr(Image.open(path), "n_frames", 1) == 2
        assert check_image(path) == (64, 48)
        assert rgb_at(load_rgb(path), (10, 10)) == pytest.approx((255, 0, 0), abs=2)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (200, 100), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 30, 30))  # a red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise
    for name in ("o.jpg", "o.webp", "o.png"):
        path = saved(
            tmp_path, name, stored, exif=exif.tobytes(), **({"quality": 95} if name.endswith("jpg") else {})
        )
        assert check_image(path) == (100, 200)
        out = load_rgb(path)
        assert out.size == (100, 200)
        assert rgb_at(out, (95, 5))[0] > 200 and rgb_at(out, (5, 5))[0] < 50  # the block is now top-right


# ------------------------------------------------------------------ bad files


def assert_bad(path, fragment: str):
    with pytest.raises(BadImage) as check:
        check_image(path)
    assert fragment in check.value.reason
    with pytest.raises(BadImage) as load:
        load_rgb(path)
    assert fragment in load.value.reason


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert_bad(path, "empty file")


def png_bytes(size=(120, 90)) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(size=(120, 90)) -> bytes:
    pixels = np.random.default_rng(2).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("name, data", [("t.png", png_bytes()), ("t.jpg", jpeg_bytes())])
def test_truncated(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    assert_bad(path, "truncated")


def test_truncated_webp(tmp_path):
    data = io.BytesIO()
    Image.new("RGB", (100, 100), (1, 2, 3)).save(data, "WEBP")
    path = tmp_path / "t.webp"
    path.write_bytes(data.getvalue()[:-20])
    with pytest.raises(BadImage):
        check_image(path)


def test_jpeg_with_trailing_bytes_is_fine(tmp_path):
    path = tmp_path / "trailing.jpg"
    path.write_bytes(jpeg_bytes() + b"camera maker notes" * 10)
    assert check_image(path) == (120, 90)
    assert load_rgb(path).size == (120, 90)


def test_corrupt_bytes(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(os.urandom(3000))
    assert_bad(garbage, "not a PNG, JPEG or WebP image")
    flipped = bytearray(png_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(bytes(flipped))
    assert_bad(damaged, "corrupt")


def test_other_formats_are_refused_even_with_an_image_name(tmp_path):
    path = tmp_path / "really-a-gif.png"
    Image.new("RGB", (64, 64)).save(path, "GIF")
    assert_bad(path, "not a PNG, JPEG or WebP image")


def test_decompression_bomb_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))  # 10 GP claimed, 100 bytes on disk
    assert_bad(path, "too large")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_own_pixel_limit_below_pillows_error(tmp_path):
    # 12000² = 144 MP: above loradrop's 128 MP, below the size where Pillow itself refuses.
    side = 12_000
    assert side * side > MAX_PIXELS and side * side < 2 * Image.MAX_IMAGE_PIXELS
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(side, side))
    assert_bad(path, "too large")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.png"
    path.write_bytes(png_bytes())
    path.chmod(0)
    try:
        assert_bad(path, "cannot be read")
    finally:
        path.chmod(0o644)


def test_dangling_link_cannot_be_read(tmp_path):
    path = tmp_path / "gone.png"
    path.symlink_to(tmp_path / "missing.png")
    assert_bad(path, "cannot be read")
