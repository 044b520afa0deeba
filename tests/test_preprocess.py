"""Preprocessing: reference resize/crop/normalize, odd modes, bad files, image discovery."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffcls.errors import DiffclsError
from diffcls.runtime.data.preprocess import BadImage, find_images, load_and_preprocess, preprocess_image


def test_resize_shorter_side_then_center_crop():
    # a 40x20 image whose left and right quarters differ from its middle
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255
    arr[:, 30:] = 255
    img = Image.fromarray(arr)
    t = preprocess_image(img, 10, "bilinear")
    assert t.shape == (3, 10, 10)
    assert t.dtype == torch.float32
    # torchvision Resize(10) -> 20x10, CenterCrop(10) keeps columns 5..15
    expected = np.asarray(img.resize((20, 10), Image.Resampling.BILINEAR).crop((5, 0, 15, 10)), np.float32)
    assert torch.allclose(t, torch.from_numpy(expected).permute(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert t[:, :, 2:8].max() == -1.0  # the white quarters are cropped away


def test_scale_to_minus_one_one():
    white = preprocess_image(Image.new("RGB", (8, 8), (255, 255, 255)), 8)
    black = preprocess_image(Image.new("RGB", (8, 8), (0, 0, 0)), 8)
    assert torch.all(white == 1.0) and torch.all(black == -1.0)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_odd_modes_become_rgb(mode):
    img = Image.new("RGB", (30, 17), (200, 100, 50)).convert(mode)
    t = preprocess_image(img, 16)
    assert t.shape == (3, 16, 16)
    assert torch.isfinite(t).all() and t.min() >= -1 and t.max() <= 1


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, np.uint16)  # mid grey in 16 bits
    t = preprocess_image(Image.fromarray(arr), 8)
    assert abs(float(t.mean())) < 0.02  # ~0 in [-1, 1], not saturated white


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert torch.all(preprocess_image(img, 8) == 1.0)


@pytest.mark.parametrize("size", [(1, 1), (3, 200), (3000, 2000)])
def test_tiny_and_huge_images(tmp_path, size):
    p = tmp_path / "x.png"
    Image.new("RGB", size, (10, 20, 30)).save(p)
    assert load_and_preprocess(p, 16).shape == (3, 16, 16)


def test_corrupt_and_truncated_files_raise_bad_image(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(BadImage, match="junk.jpg"):
        load_and_preprocess(junk, 16)
    full = tmp_path / "full.png"
    Image.fromarray((np.random.rand(64, 64, 3) * 255).astype(np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:200])
    with pytest.raises(BadImage, match="cut.png"):
        load_and_preprocess(cut, 16)


def test_find_images_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for p in ["b/2.PNG", "a.jpg", "b/1.webp", ".hidden/x.png", "notes.txt"]:
        (tmp_path / p).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["a.jpg", "b/1.webp", "b/2.PNG"]


def test_empty_or_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(DiffclsError, match="no images found in"):
        find_images(tmp_path)
    with pytest.raises(DiffclsError, match="does not exist"):
        find_images(tmp_path / "nope")
