"""Checkpoints: the RunState schema (both versions read the same), background writes (the snapshot is taken at
save(), files are whole, errors are reported)."""

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
    got = torch.load(tmp_path / "last.pt", weights_only=False)
    assert got["epoch"] == 2 and torch.equal(got["w"], torch.full((1000,), 2.0))
    assert got["history"] == [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]


def test_background_save_reports_a_failed_write(tmp_path):
    saver = checkpoint.BackgroundSaver()
    saver.save({"w": torch.zeros(3)}, tmp_path / "missing-folder" / "last.pt")
    with pytest.raises(SealError, match="could not write a checkpoint"):
        saver.wait()
    saver.wait()                    # reported once


# ---- the schema: one RunState that every writer and reader uses ----------------------------------


def _last(**kw):
    return checkpoint.RunState(model={"fc.weight": torch.ones(2, 3)}, config={"method": "seal", "arch": "resnet10"},
                               next_epoch=3, optimizer={"state": {}, "param_groups": []}, scaler={}, rng={"torch": 1},
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
    raw = torch.load(tmp_path / "best.pt", weights_only=False)
    assert raw["version"] == checkpoint.SCHEMA and raw["global_epoch"] == 1  # what schema-1 readers looked for


def test_schema_1_files_read_the_same(tmp_path):
    """Exactly the dicts the trainer wrote before the schema had an owner (last.pt version 1, best.pt unversioned)."""
    torch.save({"version": 1, "model": {"w": torch.ones(1)}, "optimizer": {"state": {}}, "scaler": {}, "next_epoch": 4,
                "rng": {"torch": 0}, "config": {"method": "llf"}, "best_val": 0.25, "metrics": [{}, {}]},
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
