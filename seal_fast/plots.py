"""curves.png: training and validation loss and accuracy per epoch, ascent epochs shaded."""

from __future__ import annotations

import os


def plot_curves(metrics: list[dict], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return
    x = [m["global_epoch"] + 1 for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax_loss.plot(x, [m["train_loss"] for m in metrics], label="train")
    ax_acc.plot(x, [100 * m["train_acc"] for m in metrics], label="train")
    val = [m for m in metrics if m.get("val_acc") is not None]
    if val:
        vx = [m["global_epoch"] + 1 for m in val]
        ax_loss.plot(vx, [m["val_loss"] for m in val], "o-", ms=3, label="val")
        ax_acc.plot(vx, [100 * m["val_acc"] for m in val], "o-", ms=3, label="val")
    for ax in (ax_loss, ax_acc):
        shaded = False
        for m in metrics:
            if m["phase"] == "ascent":
                ax.axvspan(m["global_epoch"] + 0.5, m["global_epoch"] + 1.5, color="tab:red", alpha=0.15, lw=0,
                           label=None if shaded else "early-layer ascent")
                shaded = True
            if m["epoch"] == 0 and m["generation"] > 0:
                ax.axvline(m["global_epoch"] + 0.5, color="gray", ls=":", lw=1)
        ax.set_xlabel("epoch (dotted lines: generation starts)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("top-1 accuracy (%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
