"""The Tiny-ImageNet layout parser, the torch loader's augmentation and determinism, the bad-data errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from seal_fast.data import build_loaders, normalize
from seal_fast.data.layout import scan_train, scan_val
from seal_fast.data.torch_loader import MEAN, STD, augment, load_rgb
from seal_fast.errors import DataError


def test_layout_parser_reads_the_real_layout(tiny_data):
    wnids = (tiny_data / "wnids.txt").read_text().split()
    train = scan_train(tiny_data)
    assert train.classes == wnids and len(train.files) == 4 * 24
    for f, y in zip(train.files, train.labels):
        # train/<wnid>/images/<wnid>_<i>.JPEG, label = line of wnids.txt
        parts = f.split("/")
        assert parts[-2] == "images" and parts[-3] == wnids[y] and parts[-1].startswith(wnids[y] + "_")
    val = scan_val(tiny_data)
    ann = [line.split("\t") for line in (tiny_data / "val" / "val_annotations.txt").read_text().splitlines()]
    assert [f.split("/")[-1] for f in val.files] == [a[0] for a in ann]
    assert val.labels == [wnids.index(a[1]) for a in ann] and len(ann[0]) == 6


def test_synthetic_set_has_grayscale_jpegs_that_load_as_rgb(tiny_data):
    files = scan_train(tiny_data).files + scan_val(tiny_data).files
    modes = {f: Image.open(f).mode for f in files}
    gray = [f for f, m in modes.items() if m == "L"]
    assert gray, "the synthetic set should contain grayscale JPEGs, like the real one"
    img = load_rgb(gray[0])
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img[..., 0], img[..., 1])


def test_loader_shapes_labels_and_epoch_length(tiny_data):
    loaders = build_loaders(str(tiny_data), batch_size=10, seed=0, workers=0, pin_memory=False)
    assert len(loaders.train) == 10  # ceil(96 / 10): the last short batch is kept, as in the published code
    batches = list(loaders.train.epoch(0))
    assert sum(len(y) for _, y in batches) == 96 and len(batches[-1][1]) == 6
    x, y = batches[0]
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(scan_train(tiny_data).labels)
    val = list(loaders.val.epoch(0))
    assert torch.cat([y for _, y in val]).tolist() == scan_val(tiny_data).labels  # val keeps its order


def test_loader_is_deterministic_per_seed_and_epoch(tiny_data):
    def epoch(seed, e, workers):
        loaders = build_loaders(str(tiny_data), batch_size=16, seed=seed, workers=workers, pin_memory=False)
        return [(x.clone(), y.clone()) for x, y in loaders.train.epoch(e)]

    a, b = epoch(0, 3, 0), epoch(0, 3, 2)  # worker count does not change the batches
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    c = epoch(0, 4, 0)
    assert not torch.equal(a[0][1], c[0][1]), "a new epoch must reshuffle"
    d = epoch(1, 3, 0)
    assert not torch.equal(a[0][1], d[0][1]), "another seed must give another order"


def test_augmentation_distribution():
    img = np.arange(1, 1 + 8 * 8 * 3, dtype=np.int64).reshape(8, 8, 3) % 250 + 1  # no zeros inside the image
    img = img.astype(np.uint8)
    offsets, flips = [], 0
    rng = np.random.default_rng(0)
    for _ in range(4000):
        out = augment(img, rng)
        assert out.shape == img.shape
        flipped = False
        for dy in range(9):
            for dx in range(9):
                padded = np.zeros((16, 16, 3), np.uint8)
                padded[4:12, 4:12] = img
                crop = padded[dy:dy + 8, dx:dx + 8]
                if np.array_equal(out, crop):
                    found = (dy, dx, False)
                elif np.array_equal(out, crop[:, ::-1]):
                    found = (dy, dx, True)
                else:
                    continue
                offsets.append(found[:2])
                flipped = found[2]
                break
            else:
                continue
            break
        flips += flipped
    assert len(offsets) == 4000  # every output is a zero-padded crop, maybe flipped
    counts = np.zeros((9, 9))
    for dy, dx in offsets:
        counts[dy, dx] += 1
    assert counts.min() > 0  # all 81 positions occur
    expected = 4000 / 81
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 130  # 80 degrees of freedom: p < 0.001 above ~125
    assert abs(flips / 4000 - 0.5) < 0.04


def test_normalize_matches_to_tensor_then_normalize():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = normalize(x, torch.device("cpu"), channels_last=True)
    assert torch.allclose(out, ref, atol=1e-6) and out.is_contiguous(memory_format=torch.channels_last)


# ---- bad data: each error names the problem ------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        scan_train(tmp_path / "nope")


def test_missing_wnids(data_copy):
    (data_copy / "wnids.txt").unlink()
    with pytest.raises(DataError, match="wnids.txt: missing"):
        scan_train(data_copy)


def test_class_folder_without_images(data_copy):
    wnid = (data_copy / "wnids.txt").read_text().split()[2]
    for f in (data_copy / "train" / wnid / "images").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=f"{wnid}/images: has no images"):
        scan_train(data_copy)


def test_val_annotation_naming_a_missing_file(data_copy):
    (data_copy / "val" / "images" / "val_3.JPEG").unlink()
    with pytest.raises(DataError, match=r"val_annotations.txt:4: names val_3.JPEG"):
        scan_val(data_copy)


def test_corrupt_jpeg_is_named(data_copy):
    bad = scan_train(data_copy).files[5]
    with open(bad, "r+b") as f:
        f.write(b"this is not a jpeg")
    with pytest.raises(DataError, match=bad.split("/")[-1]):
        load_rgb(bad)
    trunc = scan_train(data_copy).files[6]
    data = open(trunc, "rb").read()
    open(trunc, "wb").write(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot decode"):
        load_rgb(trunc)
