"""load_rgb: every pixel mode becomes RGB; every unusable file becomes an ImageError with a reason."""
import io

import numpy as np
import pytest
from PIL import Image

import cnnbench.data.images as images
from cnnbench.data.images import ImageError, load_rgb, load_rgb_with_mode


def _save(img, path, **kwargs):
    img.save(path, **kwargs)
    return path


def _pixels(img):
    return np.asarray(img)


def test_rgb_jpeg_passes_through(tmp_path):
    path = _save(Image.new("RGB", (8, 6), (200, 30, 60)), tmp_path / "a.jpg", quality=95)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (8, 6)
    assert np.abs(_pixels(img).astype(int) - [200, 30, 60]).max() <= 3


def test_grayscale_jpeg_becomes_rgb(tmp_path):
    path = _save(Image.new("L", (8, 8), 90), tmp_path / "gray.jpg")
    img, mode = load_rgb_with_mode(path)
    assert mode == "L" and img.mode == "RGB"
    assert (_pixels(img) == 90).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    img, mode = load_rgb_with_mode(_save(cmyk, tmp_path / "cmyk.jpg", quality=100))
    assert mode == "CMYK" and img.mode == "RGB"
    r, g, b = _pixels(img).reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    img = load_rgb(_save(rgba, tmp_path / "alpha.png"))
    px = _pixels(img)
    assert tuple(px[0, 0]) == (0, 0, 255)       # opaque pixel keeps its colour
    assert tuple(px[3, 3]) == (255, 255, 255)   # fully transparent -> white, not blue or black
    assert all(abs(int(v) - 127) <= 1 for v in px[0, 1])  # half-transparent black over white


def test_la_is_composited_on_white(tmp_path):
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    px = _pixels(load_rgb(_save(la, tmp_path / "la.png")))
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[0, 1]) == (0, 0, 0)


def test_palette_without_and_with_transparency(tmp_path):
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    px = _pixels(load_rgb(_save(palette, tmp_path / "p.png")))
    assert tuple(px[0, 0]) == (10, 20, 30) and tuple(px[0, 1]) == (200, 100, 50)

    transparent = _save(palette, tmp_path / "p_t.png", transparency=0)  # index 0 is transparent
    img, mode = load_rgb_with_mode(transparent)
    assert mode == "P"
    px = _pixels(img)
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[0, 1]) == (200, 100, 50)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    img, mode = load_rgb_with_mode(path)
    assert mode.startswith("I")
    px = _pixels(img)[0, :, 0]
    np.testing.assert_array_equal(px, [0, 128, 255, 4])  # 1000/257 = 3.9 -> 4; clipping would give 255
    assert (_pixels(img)[..., 0] == _pixels(img)[..., 2]).all()


def test_thirty_two_bit_integer_tiff(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.int32)
    px = _pixels(load_rgb(_save(Image.fromarray(values), tmp_path / "i.tif")))[0, :, 0]
    np.testing.assert_array_equal(px, [0, 128, 255])


def test_float_tiff(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    img, mode = load_rgb_with_mode(_save(Image.fromarray(values), tmp_path / "f.tif"))
    assert mode == "F"
    np.testing.assert_array_equal(_pixels(img)[0, :, 1], [0, 128, 255])


def test_bilevel_image(tmp_path):
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    px = _pixels(load_rgb(_save(bilevel, tmp_path / "b.png")))
    assert tuple(px[0, 0]) == (0, 0, 0) and tuple(px[0, 1]) == (255, 255, 255)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    px = _pixels(load_rgb(path))
    assert (px == [255, 0, 0]).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (8, 4), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 4))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "rotated.jpg", exif=exif, quality=100)
    loaded = load_rgb(path)
    assert loaded.size == (4, 8)  # width and height swapped
    px = _pixels(loaded).mean(axis=2)
    assert px[:3].mean() > 200 and px[-3:].mean() < 50  # the white half is now on top


# ---- unusable files -------------------------------------------------------------------------

def _jpeg_bytes(size=(64, 64)):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _error_for(path) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_rgb(path)
    assert str(info.value).startswith(f"{path}: ")
    assert info.value.path == str(path)
    return info.value


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(_jpeg_bytes()[:1500])
    assert "truncated image" in _error_for(path).reason


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty file" in _error_for(path).reason


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert "not an image file" in _error_for(path).reason


def test_corrupt_jpeg_body(tmp_path):
    data = bytearray(_jpeg_bytes())
    data[200:1200] = b"\xff" * 1000  # header intact, entropy-coded data destroyed
    path = tmp_path / "garbled.jpg"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError):
        load_rgb(path)


def test_missing_file_and_directory(tmp_path):
    assert _error_for(tmp_path / "nope.jpg").reason == "file not found"
    (tmp_path / "folder.jpg").mkdir()
    assert "is a directory" in _error_for(tmp_path / "folder.jpg").reason


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    path = _save(Image.new("L", (20, 20)), tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 399)
    assert "too large" in _error_for(path).reason and "400 pixels" in _error_for(path).reason
    monkeypatch.setattr(images, "MAX_PIXELS", 400)
    assert load_rgb(path).size == (20, 20)


@pytest.mark.parametrize("pil_limit", [300, 150])  # PIL warns above its limit, raises above twice it
def test_pil_bomb_warning_and_error_become_image_errors(tmp_path, monkeypatch, pil_limit):
    path = _save(Image.new("L", (20, 20)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    assert "decompression bomb" in _error_for(path).reason


def test_image_error_survives_pickling():
    import pickle
    error = pickle.loads(pickle.dumps(ImageError("/x/y.jpg", "truncated image")))
    assert (error.path, error.reason, str(error)) == ("/x/y.jpg", "truncated image", "/x/y.jpg: truncated image")
