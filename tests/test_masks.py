import numpy as np
import pytest
from PIL import Image

from xreal.core.errors import MaskError
from xreal.core.labels import Anatomy
from xreal.core.masks import (
    area_fraction,
    boxes_to_mask,
    check_binary_mask,
    check_label_map,
    label_map_from_rle,
    mask_box,
    read_binary_mask,
    read_label_map,
    read_mask_file,
    resize_label_map,
    resize_mask,
    rle_decode,
    rle_encode,
    rle_from_label_map,
    soft_latent_mask,
    write_mask_file,
)


@pytest.mark.parametrize("name", ["map.png", "map.npy"])
def test_label_map_round_trip(tmp_path, label_map, name):
    write_mask_file(tmp_path / name, label_map)
    assert np.array_equal(read_label_map(tmp_path / name), label_map)


def test_16_bit_png_masks_are_read(tmp_path):
    mask = np.zeros((20, 30), dtype=np.uint16)
    mask[5:9, 10:20] = 65535
    Image.fromarray(mask).save(tmp_path / "m16.png")
    assert read_mask_file(tmp_path / "m16.png").dtype == np.uint16
    assert np.array_equal(read_binary_mask(tmp_path / "m16.png"), mask > 0)


def test_binary_masks_are_written_as_0_255(tmp_path):
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 2:4] = True
    write_mask_file(tmp_path / "m.png", mask)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "m.png"))).tolist()) == {0, 255}
    assert np.array_equal(read_binary_mask(tmp_path / "m.png"), mask)


def test_missing_unreadable_and_wrong_files_are_named(tmp_path):
    with pytest.raises(MaskError, match="not found"):
        read_mask_file(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(MaskError, match=r"junk\.png: unreadable"):
        read_mask_file(tmp_path / "junk.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "rgb.png")
    with pytest.raises(MaskError, match="single-channel"):
        read_mask_file(tmp_path / "rgb.png")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), dtype=np.uint8))
    with pytest.raises(MaskError, match="2-D"):
        read_mask_file(tmp_path / "cube.npy")
    np.save(tmp_path / "frac.npy", np.full((4, 4), 0.5))
    with pytest.raises(MaskError, match="fractional"):
        read_mask_file(tmp_path / "frac.npy")
    with pytest.raises(MaskError, match="unsupported mask format"):
        read_mask_file(tmp_path / "mask.tiff")


def test_label_map_values_and_structures_are_checked(label_map):
    bad = label_map.copy()
    bad[0, 0] = 7
    with pytest.raises(MaskError, match="7 are not anatomy ids"):
        check_label_map(bad)
    no_heart = np.where(label_map == Anatomy.HEART, 0, label_map)
    with pytest.raises(MaskError, match="no heart"):
        check_label_map(no_heart)


def test_pathology_masks_must_be_binary_and_not_empty():
    with pytest.raises(MaskError, match="must be binary"):
        check_binary_mask(np.array([[0, 1], [2, 0]]))
    with pytest.raises(MaskError, match="empty"):
        check_binary_mask(np.zeros((4, 4), dtype=np.uint8))
    assert check_binary_mask(np.array([[0, 255], [255, 0]])).sum() == 2


def test_rle_follows_chexmask_convention():
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 1:3] = True  # flat indices 1, 2 -> start 2 (1-indexed), length 2
    mask[1, 3] = mask[2, 0] = True  # flat 7 and 8 are adjacent in row-major order
    assert rle_encode(mask) == "2 2 8 2"
    assert np.array_equal(rle_decode("2 2 8 2", 3, 4), mask)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 64), (128, 96)])
def test_rle_round_trips(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.3, 1.0):
        mask = rng.random(shape) < density
        assert np.array_equal(rle_decode(rle_encode(mask), *shape), mask)


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 3", "odd number"),
        ("1 x", "'x' is not an integer"),
        ("0 2", "both must be >= 1"),
        ("3 0", "both must be >= 1"),
        ("5 2 1 2", "runs must be sorted"),
        ("1 4 3 2", "runs must be sorted"),
        ("10 10", "beyond the 4x4 image"),
    ],
)
def test_malformed_rle_is_rejected(rle, message):
    with pytest.raises(MaskError, match=message):
        rle_decode(rle, 4, 4)


def test_label_map_from_rle_puts_heart_over_lungs(label_map):
    encoded = rle_from_label_map(label_map)
    lungs_under_heart = label_map.copy()
    lungs_under_heart[label_map == Anatomy.HEART] = Anatomy.LEFT_LUNG
    decoded = label_map_from_rle(
        rle_encode(lungs_under_heart == Anatomy.RIGHT_LUNG),
        rle_encode(lungs_under_heart == Anatomy.LEFT_LUNG),
        encoded["heart"],
        encoded["height"],
        encoded["width"],
    )
    assert np.array_equal(decoded, label_map)
    with pytest.raises(MaskError, match="heart RLE"):
        label_map_from_rle(encoded["right_lung"], encoded["left_lung"], "1 2 3", 64, 64)


def test_boxes_rasterise_in_pixel_and_normalised_units():
    pixel = boxes_to_mask([(2, 1, 5, 3)], 6, 8)
    assert mask_box(pixel) == (2, 1, 5, 3)
    assert pixel.sum() == 3 * 2
    normalised = boxes_to_mask([(0.25, 1 / 6, 0.625, 0.5)], 6, 8, units="normalized")
    assert np.array_equal(pixel, normalised)
    tiny = boxes_to_mask([(3.2, 3.2, 3.3, 3.3)], 8, 8)
    assert tiny.sum() == 1


@pytest.mark.parametrize(
    ("box", "units", "message"),
    [
        ((0, 0, 9, 4), "pixel", "outside the 8x6 image"),
        ((0.5, 0.5, 1.2, 0.9), "normalized", r"outside \[0, 1\]"),
        ((4, 2, 3, 5), "pixel", "x_max must exceed x_min"),
        ((1, 1, 2), "pixel", "expected"),
        ((float("nan"), 0, 1, 1), "pixel", "finite"),
    ],
)
def test_bad_boxes_are_rejected(box, units, message):
    with pytest.raises(MaskError, match=message):
        boxes_to_mask([box], 6, 8, units=units)


def test_label_map_resizing_never_invents_labels(label_map):
    for size in (16, 37, 100, (48, 80)):
        resized = resize_label_map(label_map, size)
        assert resized.shape == ((size, size) if isinstance(size, int) else size)
        assert set(np.unique(resized)) <= set(np.unique(label_map))
    assert np.array_equal(resize_label_map(label_map, 64), label_map)
    assert np.array_equal(resize_label_map(resize_label_map(label_map, 128), 64), label_map)


def test_mask_resizing_to_latent_size_keeps_small_lesions():
    mask = np.zeros((64, 64), dtype=bool)
    mask[10, 10] = True
    assert resize_mask(mask, 16, rule="any").sum() == 1
    assert resize_mask(mask, 16, rule="majority").sum() == 0
    block = np.zeros((64, 64), dtype=bool)
    block[8:24, 8:24] = True
    assert np.array_equal(resize_mask(block, 16), block[::4, ::4])
    assert area_fraction(block, 16).max() == pytest.approx(1.0)


def test_soft_latent_mask_is_one_inside_and_soft_scale_outside():
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:48, 16:48] = True
    soft = soft_latent_mask(mask, 16, soft_scale=0.2)
    assert soft.shape == (16, 16) and soft.dtype == np.float32
    assert soft[4:12, 4:12].min() == 1.0
    assert soft[0, 0] == pytest.approx(0.2)
    assert np.unique(soft).tolist() == pytest.approx([0.2, 1.0])
    with pytest.raises(MaskError, match="soft_scale"):
        soft_latent_mask(mask, 16, soft_scale=1.5)


def test_failed_write_keeps_the_previous_file(tmp_path, label_map, monkeypatch):
    target = tmp_path / "map.png"
    write_mask_file(target, label_map)
    before = target.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_mask_file(target, np.zeros_like(label_map))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]


def test_written_files_get_the_usual_permissions(tmp_path, label_map):
    import os
    import stat

    write_mask_file(tmp_path / "map.png", label_map)
    mode = stat.S_IMODE(os.stat(tmp_path / "map.png").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
