"""The Tiny-ImageNet layout parser, the torch loader's augmentation and determinism, the bad-data errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from seal_fast.data import build_loaders
from seal_fast.data.augment import augment, crop_flip_params, epoch_indices
from seal_fast.data.dali_loader import dali_available
from seal_fast.data.images import MEAN, STD, load_rgb, normalize
from seal_fast.data.layout import scan_train, scan_val
from seal_fast.errors import ConfigError, DataError


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


# DALI comes with the test extra (make test installs it); without it the package works and its tests skip
HAVE_DALI = dali_available()
NO_DALI = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install -e '.[test]')")
KINDS = ["torch", "cache", pytest.param("dali", marks=NO_DALI)]


def loaders(root, kind, batch_size=10, seed=0, workers=0, channels_last=False, **kw):
    return build_loaders(str(root), batch_size=batch_size, seed=seed, workers=workers, device=torch.device("cpu"),
                         channels_last=channels_last, kind=kind, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_loader_shapes_labels_and_epoch_length(tiny_data, kind):
    ld = loaders(tiny_data, kind)
    assert ld.kind == kind and len(ld.train) == 10  # ceil(96 / 10): the short last batch is kept, as published
    batches = list(ld.train.epoch(0))
    assert len(batches) == 10 and sum(len(y) for _, y in batches) == 96 and len(batches[-1][1]) == 6
    x, y = batches[0]
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(scan_train(tiny_data).labels)
    val = list(ld.val.epoch(0))
    assert torch.cat([y for _, y in val]).tolist() == scan_val(tiny_data).labels  # val keeps its order


def test_all_loaders_give_the_same_batches(tiny_data):
    """Equal science: the same order, crops, flips and normalization; val and train. The cache equals the
    torch loader bit for bit; DALI (its own JPEG decoder and arithmetic) within 1/255 of a pixel."""
    kinds = ["torch", "cache"] + (["dali"] if HAVE_DALI else [])  # DALI: when installed (the test extra)
    out = {k: loaders(tiny_data, k, batch_size=16) for k in kinds}
    tol = 1 / (255 * min(STD)) + 1e-6
    for split in ("train", "val"):
        ref = list(getattr(out["torch"], split).epoch(5))
        for kind in kinds[1:]:
            got = list(getattr(out[kind], split).epoch(5))
            assert len(got) == len(ref)
            for (xa, ya), (xb, yb) in zip(ref, got):
                assert torch.equal(ya, yb)
                if kind == "cache":
                    assert torch.equal(xa, xb)
                else:
                    assert (xa - xb).abs().max().item() <= tol


@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_output(tiny_data, kind):
    x, _ = next(iter(loaders(tiny_data, kind, channels_last=True).train.epoch(0)))
    assert x.shape == (10, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    ref, _ = next(iter(loaders(tiny_data, kind).train.epoch(0)))
    assert torch.allclose(x, ref, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_loader_is_deterministic_and_resumable(tiny_data, kind):
    """A fresh loader asked for epoch 3 gives what a loader that went through epochs 0-2 gives (resume)."""
    def batches(ld, e):
        return [(x.clone(), y.clone()) for x, y in ld.train.epoch(e)]

    walked = loaders(tiny_data, kind, batch_size=16)
    for e in range(3):
        batches(walked, e)
    a, b = batches(walked, 3), batches(loaders(tiny_data, kind, batch_size=16), 3)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    c = batches(walked, 4)
    assert not torch.equal(a[0][1], c[0][1]), "a new epoch must reshuffle"
    d = batches(loaders(tiny_data, kind, batch_size=16, seed=1), 3)
    assert not torch.equal(a[0][1], d[0][1]), "another seed must give another order"


def test_torch_loader_workers_do_not_change_batches(tiny_data):
    a = [y for _, y in loaders(tiny_data, "torch", workers=0).train.epoch(2)]
    b = [y for _, y in loaders(tiny_data, "torch", workers=2).train.epoch(2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_sharding_covers_the_epoch_once():
    n, world = 103, 4
    shards = [epoch_indices(n, 0, 5, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # the same number of steps on every rank
    every = np.concatenate(shards)
    assert set(every.tolist()) == set(range(n)) and len(every) == 104  # one image repeated to even the shards


def test_augmentation_distribution():
    """Crop offsets uniform over the 9 x 9 padded positions, flips about half, from the shared hash."""
    dy, dx, flip = crop_flip_params(0, 3, np.arange(81 * 200))
    counts = np.zeros((9, 9))
    np.add.at(counts, (dy, dx), 1)
    expected = len(dy) / 81
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert counts.min() > 0 and chi2 < 125  # 80 degrees of freedom: p ~ 0.001 at 125
    assert abs(flip.mean() - 0.5) < 0.02
    assert not np.array_equal(dy, crop_flip_params(0, 4, np.arange(81 * 200))[0])  # a new epoch redraws


def test_augment_is_a_zero_padded_crop_and_flip():
    img = (np.arange(8 * 8 * 3).reshape(8, 8, 3) % 250 + 1).astype(np.uint8)
    padded = np.zeros((16, 16, 3), np.uint8)
    padded[4:12, 4:12] = img
    for dy, dx, flip in [(0, 0, 0), (8, 8, 1), (4, 4, 0), (2, 7, 1)]:
        out = augment(img, dy, dx, flip)
        crop = padded[dy:dy + 8, dx:dx + 8]
        assert np.array_equal(out, crop[:, ::-1] if flip else crop)


def test_normalize_matches_to_tensor_then_normalize():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = normalize(x, torch.device("cpu"), channels_last=True)
    assert torch.allclose(out, ref, atol=1e-6) and out.is_contiguous(memory_format=torch.channels_last)


def test_auto_picks_and_says_why(tiny_data):
    ld = loaders(tiny_data, "auto")
    assert ld.kind == "cache" and "RAM" in ld.why


def test_dali_missing_says_how_to_install(tiny_data, monkeypatch):
    from seal_fast.data import dali_loader

    monkeypatch.setattr(dali_loader, "dali_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install nvidia-dali-cuda130"):
        loaders(tiny_data, "dali")


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


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_jpeg_is_named_by_every_loader(data_copy, kind):
    bad = scan_train(data_copy).files[5]
    open(bad, "wb").write(b"\xff\xd8 not a jpeg at all")
    with pytest.raises(DataError, match=bad.split("/")[-1]):
        list(loaders(data_copy, kind).train.epoch(0))


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


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["cache", "dali"])
def test_gpu_loaders_match_the_cpu_torch_loader(tiny_data, kind):
    """On CUDA: the cache (device-side crop/flip/normalize) and DALI (nvJPEG 'mixed' decoding) give the CPU
    torch loader's batches, within 1/255 of a pixel; the cache exactly."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    ref = loaders(tiny_data, "torch", batch_size=16)
    got = build_loaders(str(tiny_data), batch_size=16, seed=0, workers=2, device=torch.device("cuda"), kind=kind)
    tol = 1 / (255 * min(STD)) + 1e-6
    for split in ("train", "val"):
        for (xa, ya), (xb, yb) in zip(getattr(ref, split).epoch(2), getattr(got, split).epoch(2)):
            assert xb.is_cuda and torch.equal(ya, yb.cpu())
            diff = (xa - xb.cpu()).abs().max().item()
            assert diff == 0 if kind == "cache" else diff <= tol, diff
