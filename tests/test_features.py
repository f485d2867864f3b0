"""seal_fast.studies.features: the studies' shared checkpoint loader, transform, streamed extraction and feature cache."""

import os
import time

import pytest
import torch
from PIL import Image

from seal_fast import checkpoint
from seal_fast.data.folders import write_image_folder
from seal_fast.data.images import normalize
from seal_fast.errors import DataError
from seal_fast.studies.features import FeatureCache, Transform, extract, feature_layer, load_model, open_rgb
from seal_fast.models import build_model

CPU = torch.device("cpu")


def write_checkpoint(path, arch="resnet10", classes=4, seed=0, config_arch=None):
    torch.manual_seed(seed)
    model = build_model(arch, classes)
    state = checkpoint.RunState(model=model.state_dict(), config={"arch": config_arch or arch, "method": "normal"},
                                next_epoch=3, kind="best", val_acc=0.5)
    checkpoint.write(state, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("imgs"), 3, {"all": 3}, size=40)
    files = sorted(str(p) for p in root.rglob("*.jpg"))
    return files, [int(os.path.basename(os.path.dirname(f))[-2:]) for f in files]


def test_transform_shapes_and_modes():
    img = Image.new("RGB", (120, 60), (10, 20, 30))
    t = Transform(32, 48)
    assert t(img).shape == (3, 32, 32) and t(img).dtype == torch.uint8
    assert Transform(64, 64)(img).shape == (3, 64, 64)               # shorter side 64, the longer one cropped
    sq = Transform(24, 27, square=True)
    assert sq(img).shape == (3, 24, 24)
    assert "shorter side to 48" in t.describe() and "both sides to 27" in sq.describe()
    # a gradient image: shorter-side resize keeps the aspect, so the crop's corner is the image's middle column
    arr = torch.arange(120).repeat(60, 1).to(torch.uint8)
    grad = Image.fromarray(torch.stack([arr] * 3, -1).numpy())
    out = Transform(60, 60)(grad)
    assert abs(int(out[0, 0, 0]) - 30) <= 1 and abs(int(out[0, 0, -1]) - 89) <= 1


def test_extract_equals_the_model_on_each_image(images, tmp_path):
    files, labels = images
    model, _, _ = load_model(str(write_checkpoint(tmp_path / "m.pt")), CPU)
    t = Transform(32, 36)
    feats, ys = extract(model, files, labels, t, CPU, batch_size=4, workers=0)
    assert feats.shape == (len(files), 512) and feats.dtype == torch.float32 and ys.tolist() == labels
    x = normalize(torch.stack([t(open_rgb(f)) for f in files]), CPU, False)
    with torch.no_grad():
        h = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
    assert feature_layer(model) == "block.4.0"
    assert torch.allclose(feats, h.mean((2, 3)), atol=1e-5)       # fc's input, in the files' order


def test_cache_hits_and_invalidation(images, tmp_path):
    files, labels = images
    (tmp_path / "run").mkdir()
    ckpt = write_checkpoint(tmp_path / "run" / "last.pt")
    model, _, _ = load_model(str(ckpt), CPU)
    cache = FeatureCache(tmp_path / "cache")
    t = Transform(32, 32)
    args = (CPU, None, 8, 0, "test")
    f1, y1, src1 = cache.features(model, str(ckpt), "set", "train", files, labels, t, *args)
    assert src1.startswith("extracted, cached in") and cache.misses == 1
    f2, y2, src2 = cache.features(model, str(ckpt), "set", "train", files, labels, t, *args)
    assert src2.startswith("cache ") and cache.hits == 1 and torch.equal(f1, f2) and torch.equal(y1, y2)
    stored = list((tmp_path / "cache").glob("set-train-run-last-*.pt"))
    assert len(stored) == 1
    # another transform, another split name, a rewritten checkpoint, a changed image: extracted again
    assert cache.path(str(ckpt), "set", "train", files, labels, Transform(32, 40), "block.4.0", None) != stored[0]
    cache.features(model, str(ckpt), "set", "train", files, labels, Transform(32, 40), *args)
    assert cache.misses == 2
    time.sleep(0.01)
    os.utime(ckpt)
    cache.features(model, str(ckpt), "set", "train", files, labels, t, *args)
    assert cache.misses == 3
    Image.new("RGB", (40, 40), (1, 2, 3)).save(files[0])
    f4, _, _ = cache.features(model, str(ckpt), "set", "train", files, labels, t, *args)
    assert cache.misses == 4 and not torch.equal(f4[0], f1[0]) and torch.equal(f4[1:], f1[1:])
    off = FeatureCache(None)
    _, _, src = off.features(model, str(ckpt), "set", "train", files, labels, t, *args)
    assert src == "extracted" and off.path(str(ckpt), "set", "train", files, labels, t, "x", None) is None


def test_load_model_refuses_other_architectures_and_junk(tmp_path):
    wrong = write_checkpoint(tmp_path / "wrong.pt", arch="resnet10", config_arch="resnet18")
    with pytest.raises(DataError, match="not a resnet18's .*tensors missing"):
        load_model(str(wrong), CPU)
    odd = write_checkpoint(tmp_path / "odd.pt", config_arch="vgg11")
    with pytest.raises(DataError, match="architecture 'vgg11'"):
        load_model(str(odd), CPU)
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    with pytest.raises(DataError, match="not a seal_fast checkpoint"):
        load_model(str(junk), CPU)
    model, cfg, label = load_model(str(write_checkpoint(tmp_path / "ok.pt")), CPU)
    assert cfg["arch"] == "resnet10" and label == f"normal @ epoch 3 ({tmp_path.name}/ok.pt)" and not model.training


def test_extract_refuses_diverged_weights_and_broken_images(images, tmp_path):
    files, labels = images
    model, _, _ = load_model(str(write_checkpoint(tmp_path / "m.pt")), CPU)
    with torch.no_grad():
        model.layer2[0].conv1.weight.fill_(float("nan"))
    with pytest.raises(DataError, match="NaN or inf"):
        extract(model, files, labels, Transform(32, 32), CPU, batch_size=4)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg: cannot decode"):
        extract(model, [str(broken)], [0], Transform(32, 32), CPU)
