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


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_probe_accuracy(results: list[dict], path: str | os.PathLike) -> None:
    """The SEAL paper's Figure 2: KNN-probe accuracy per layer, one line per checkpoint; the last point of each
    line is the network's own accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p["name"] for p in results[0]["probes"]]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(names)), 4.5))
    for r in results:
        acc = [100 * (p["knn_acc"] if p["knn_acc"] is not None else p["network_acc"]) for p in r["probes"]]
        ax.plot(range(len(acc)), acc, "o-", ms=3, label=r["label"])
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"k-NN probe accuracy (%), k = {results[0]['k']}")
    ax.set_xlabel("probe (output: the network's own prediction)")
    ax.set_title(f"probe accuracy per layer ({results[0]['split']} split, {results[0]['features']} embeddings)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_depth_histogram(results: list[dict], path: str | os.PathLike) -> None:
    """Share of samples at each prediction depth, grouped bars, one colour per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p["name"] for p in results[0]["probes"]]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(names)), 4.5))
    for j, r in enumerate(results):
        hist = r["depth_histogram"]
        total = max(1, sum(hist))
        ax.bar([i + (j - (len(results) - 1) / 2) * width for i in range(len(hist))], [100 * h / total for h in hist],
               width=width, label=f"{r['label']} (mean {r['mean_depth']:.2f})")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("samples (%)")
    ax.set_xlabel("prediction depth: first probe from which every later probe agrees with the network")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _save(fig, path)
