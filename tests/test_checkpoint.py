"""Background checkpoint writes: the snapshot is taken at save(), files are whole, errors are reported."""

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
