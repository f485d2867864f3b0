"""Checkpoints: the RunState schema (every version reads the same, through the safe unpickler), the RNG state as
plain data round-tripped exactly, background writes (the snapshot is taken at save(), files are whole, errors are
reported). Hostile files and full disks: tests/test_safe_loading.py."""

import io
import pickle
import random
import zipfile

import numpy as np
import pytest
import torch

from seal_fast import checkpoint
from seal_fast.errors import SealError


def test_background_save_writes_the_state_at_the_moment_of_save(tmp_path):
    saver = checkpoint.BackgroundSaver()
    w = torch.zeros(1000)
    history = [{"epoch": 0}]
    for epoch in range(3):
        w.fill_(epoch)
        saver.save({"w": w, "history": history, "epoch": epoch}, tmp_path / "last.pt")
        w.fill_(-1)                 # training goes on changing the live tensors in place
        history.append({"epoch": epoch + 1})
    saver.wait()
    got = torch.load(tmp_path / "last.pt", weights_only=True)
    assert got["epoch"] == 2 and torch.equal(got["w"], torch.full((1000,), 2.0))
    assert got["history"] == [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]


def test_background_save_reports_a_failed_write(tmp_path):
    saver = checkpoint.BackgroundSaver()
    saver.save({"w": torch.zeros(3)}, tmp_path / "missing-folder" / "last.pt")
    with pytest.raises(SealError, match="could not write .*missing-folder/last.pt"):
        saver.wait()
    saver.wait()                    # reported once


# ---- the schema: one RunState that every writer and reader uses ----------------------------------


def _last(**kw):
    return checkpoint.RunState(model={"fc.weight": torch.ones(2, 3)}, config={"method": "seal", "arch": "resnet10"},
                               next_epoch=3, optimizer={"state": {}, "param_groups": []}, scaler={},
                               rng=checkpoint.rng_state(),
                               best_val=0.5, metrics=[{"global_epoch": 0}], **kw)


def test_last_and_best_round_trip(tmp_path):
    checkpoint.write_last(_last(), tmp_path)
    checkpoint.write_best(checkpoint.RunState(model={"fc.weight": torch.zeros(2, 3)}, config={"method": "seal"},
                                              next_epoch=2, kind="best", val_acc=0.5), tmp_path)
    last = checkpoint.read(tmp_path / "last.pt", resumable=True)
    assert last.kind == "last" and last.next_epoch == 3 and last.best_val == 0.5
    assert last.metrics == [{"global_epoch": 0}]
    assert torch.equal(last.model["fc.weight"], torch.ones(2, 3))
    best = checkpoint.read(tmp_path / "best.pt")
    assert best.kind == "best" and best.next_epoch == 2 and best.val_acc == 0.5 and best.optimizer is None
    raw = torch.load(tmp_path / "best.pt", weights_only=True)
    assert raw["version"] == checkpoint.SCHEMA and raw["global_epoch"] == 1  # what schema-1 readers looked for


def legacy_rng() -> dict:
    """rng as schema 1 / 2 wrote it: numpy's state tuple (a uint32 ndarray inside) and Python's state tuple."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def test_schema_1_files_read_the_same(tmp_path):
    """Exactly the dicts the trainer wrote before the schema had an owner (last.pt version 1, best.pt unversioned)."""
    torch.save({"version": 1, "model": {"w": torch.ones(1)}, "optimizer": {"state": {}}, "scaler": {}, "next_epoch": 4,
                "rng": legacy_rng(), "config": {"method": "llf"}, "best_val": 0.25, "metrics": [{}, {}]},
               tmp_path / "last.pt")
    torch.save({"model": {"w": torch.ones(1)}, "config": {"method": "llf"}, "val_acc": 0.25, "global_epoch": 1},
               tmp_path / "best.pt")
    last = checkpoint.read(tmp_path / "last.pt", resumable=True)
    assert (last.kind, last.next_epoch, last.best_val, len(last.metrics)) == ("last", 4, 0.25, 2)
    best = checkpoint.read(tmp_path / "best.pt")
    assert (best.kind, best.next_epoch, best.val_acc) == ("best", 2, 0.25)


def test_wrong_files_are_refused_with_one_line(tmp_path):
    checkpoint.write_best(checkpoint.RunState(model={}, config={}, next_epoch=1, kind="best"), tmp_path)
    with pytest.raises(SealError, match="weights only .*resume from the run folder's last.pt"):
        checkpoint.read(tmp_path / "best.pt", resumable=True)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(SealError, match="not a seal_fast checkpoint"):
        checkpoint.read(tmp_path / "other.pt")
    torch.save(dict(_last().to_dict(), version=checkpoint.SCHEMA + 1), tmp_path / "future.pt")
    with pytest.raises(SealError, match="newer than this seal_fast reads"):
        checkpoint.read(tmp_path / "future.pt")


# ---- schema 3: plain data only; the RNG state exactly -------------------------------------------------


def _advance_every_rng(seed: int) -> None:
    """Move every generator off its seed, with a cached Gaussian pending in numpy's and Python's."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.rand(7)
    np.random.rand(5)
    np.random.standard_normal()   # legacy numpy caches the second Gaussian: has_gauss = 1
    random.random()
    random.gauss(0, 1)            # Python keeps gauss_next
    assert np.random.get_state()[3] == 1 and random.getstate()[2] is not None


def _draws() -> list:
    return [torch.rand(3).tolist(), np.random.rand(3).tolist(), float(np.random.standard_normal()),
            np.random.randint(0, 2 ** 31, 4).tolist(), random.random(), random.gauss(0, 1), random.getrandbits(64)]


def _real_last_state(rng) -> checkpoint.RunState:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    return checkpoint.RunState(model=model.state_dict(), config={"method": "seal", "arch": "resnet10", "lr": 0.1},
                               next_epoch=2, optimizer=opt.state_dict(), scaler=scaler.state_dict(), rng=rng,
                               best_val=0.5, metrics=[{"global_epoch": 0, "val_acc": None, "train_loss": float("nan")}])


def test_schema_3_holds_only_what_the_safe_unpickler_accepts(tmp_path):
    _advance_every_rng(1)
    checkpoint.write_last(_real_last_state(checkpoint.rng_state()), tmp_path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "last.pt")) == []
    raw = torch.load(tmp_path / "last.pt", weights_only=True)       # no allow-list at all
    assert raw["version"] == checkpoint.SCHEMA == 3
    assert isinstance(raw["rng"]["numpy"]["key"], list) and len(raw["rng"]["numpy"]["key"]) == 624
    assert isinstance(raw["rng"]["python"]["state"], list) and len(raw["rng"]["python"]["state"]) == 625


def test_rng_state_round_trips_exactly_through_a_file(tmp_path):
    """Exact resume needs every generator back bit for bit, pending Gaussians included."""
    _advance_every_rng(2)
    state = checkpoint.rng_state()
    expected = _draws()
    checkpoint.write_last(_real_last_state(state), tmp_path)
    _advance_every_rng(3)                                            # anything else in between
    got = checkpoint.read(tmp_path / "last.pt", resumable=True)
    checkpoint.set_rng_state(got.rng)
    assert _draws() == expected
    assert torch.load(tmp_path / "last.pt", weights_only=True)["rng"]["python"]["gauss_next"] is not None


def _numpy1_spelling(path):
    """The same file as numpy 1.x would have pickled it: numpy.core.multiarray instead of numpy._core.multiarray."""
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
                assert b"numpy.core.multiarray" in data
            dst.writestr(item, data)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("numpy_spelling", ["numpy2", "numpy1"])
def test_schema_2_last_pt_resumes_through_the_safe_unpickler(tmp_path, monkeypatch, numpy_spelling):
    """A last.pt as schema 2 wrote it (numpy's RNG state a uint32 ndarray, Python's a tuple) reads with
    weights_only=True only (the numpy RNG types allow-listed), and its RNG state restores exactly."""
    _advance_every_rng(4)
    legacy = legacy_rng()
    expected = _draws()
    d = _real_last_state(legacy).to_dict()
    d["version"] = 2
    torch.save(d, tmp_path / "last.pt")
    if numpy_spelling == "numpy1":
        _numpy1_spelling(tmp_path / "last.pt")
    with pytest.raises(pickle.UnpicklingError):                      # not plain data: needs the allow-list
        torch.load(tmp_path / "last.pt", weights_only=True)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real_load(*a, **kw))
    got = checkpoint.read(tmp_path / "last.pt", resumable=True)
    assert calls and all(w is True for w in calls), calls            # never the full unpickler
    assert got.rng["numpy"]["key"] == legacy["numpy"][1].tolist()    # now schema 3's plain form
    _advance_every_rng(5)
    checkpoint.set_rng_state(got.rng)
    assert _draws() == expected


def test_a_malformed_rng_state_is_one_line(tmp_path):
    d = _real_last_state(checkpoint.rng_state()).to_dict()
    d["rng"]["numpy"]["key"] = d["rng"]["numpy"]["key"][:10]
    torch.save(d, tmp_path / "last.pt")
    with pytest.raises(SealError, match="last.pt: its RNG state is malformed .*numpy"):
        checkpoint.read(tmp_path / "last.pt", resumable=True)


def test_a_missing_file_says_so_and_only_resuming_speaks_of_resume(tmp_path):
    with pytest.raises(SealError, match="no such checkpoint file") as plain:
        checkpoint.read(tmp_path / "best.pt")
    assert "resume" not in str(plain.value)
    with pytest.raises(SealError, match="no checkpoint to resume from"):
        checkpoint.read(tmp_path / "last.pt", resumable=True)
