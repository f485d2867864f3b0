"""`--tensorboard`: the epoch scalars of metrics.jsonl, plus the per-partition learning rates, for TensorBoard.

TensorBoard is optional (`pip install tensorboard`); without it `--tensorboard` stops with one line saying so.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "best_val", "gen_best_val", "images_per_s")


class TensorBoardLog:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's module imports the tensorboard package
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or pip install -e '.[tensorboard]'), or drop --tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, row: dict) -> None:
        step = row["global_epoch"]
        for key in SCALARS:
            if row.get(key) is not None:
                self.writer.add_scalar(key, row[key], step)
        for name, lr in row["lr"].items():
            self.writer.add_scalar(f"lr/{name}", lr, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
