"""`python -m seal_fast.evaluate CKPT [--data DIR]`: top-1 / top-5 of a seal_fast checkpoint on a val set.

Any checkpoint the trainer writes (last.pt, best.pt, gen<G>.pt, gen<G>-after-ascent.pt) is read as data only
(checkpoint.read: a file whose pickle would run code is refused unless --trust-checkpoint). The val split is the
one of --data, else the folder the run was trained on (its config.json's `data`), else the built-in synthetic set.
Images go through the trainer's own val pipeline (no augmentation, the same normalisation), in fp32 (--amp: the
trainer's autocast). One line of
result on stdout; --per-class-csv writes each class's accuracy.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .cli import command_parser
from .errors import DataError, WriteError, cli_main, write_failure
from .models import build_model
from .files import written_whole

ARCHS = "resnet50, resnet18, resnet10"


def load_checkpoint_model(path: str | os.PathLike, device: torch.device, trust: bool = False):
    """(model in eval mode on `device`, the RunState): the one loader of a checkpoint's model (the studies'
    features.load_model builds on it). A file that is not a seal_fast checkpoint, or whose weights are not those of
    the architecture its config names, is a DataError with one line; read as data only unless `trust`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; pass a checkpoint a run wrote (its last.pt, best.pt or gen<G>.pt)")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; pass one checkpoint in it ({path / 'best.pt'} or {path / 'last.pt'})")
    state = checkpoint.read(path, trust=trust)
    arch = state.config.get("arch", "resnet50")
    if not isinstance(state.model, dict) or "fc.weight" not in state.model:
        raise DataError(f"{path}: its weights are not a seal_fast ResNet's (no fc.weight); pass a checkpoint "
                        "written by python -m seal_fast.train")
    try:
        model = build_model(arch, num_classes=state.model["fc.weight"].shape[0])
    except KeyError:
        raise DataError(f"{path}: its config names the architecture {arch!r}, which seal_fast does not build "
                        f"({ARCHS})") from None
    try:
        model.load_state_dict(state.model)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError):
        expected = model.state_dict()
        missing = [k for k in expected if k not in state.model]
        unexpected = [k for k in state.model if k not in expected]
        reshaped = [k for k in expected if k in state.model and
                    tuple(getattr(state.model[k], "shape", ())) != tuple(expected[k].shape)]
        first = (missing + unexpected + reshaped or ["?"])[0]
        raise DataError(f"{path}: its weights are not a {arch}'s (the architecture its config names): "
                        f"{len(missing)} tensors missing, {len(unexpected)} unexpected, {len(reshaped)} of another "
                        f"shape (e.g. {first}); pass a checkpoint written by python -m seal_fast.train") from None
    return model.to(device).eval(), state


@dataclass
class Result:
    top1: float                 # fraction of val images whose label is the top prediction
    top5: float                 # ... among the top five (top-k with k = min(5, classes))
    images: int
    classes: list[str]
    per_class: list[tuple[int, int]]  # (right, images) per class, in wnids.txt order


def resolve_data(data: str | None, config: dict) -> tuple[str, str]:
    """(val folder, where it came from)."""
    if data is not None:
        return data, "--data"
    trained_on = config.get("data")
    if trained_on:
        return str(trained_on), "the folder the run was trained on"
    from .data.synthetic import ensure_synthetic

    root, _ = ensure_synthetic()
    return str(root), "the built-in synthetic set the run was trained on"


@torch.no_grad()
def evaluate(model: torch.nn.Module, root: str, batch_size: int, device: torch.device, workers: int = 0,
             amp_dtype: torch.dtype | None = None) -> Result:
    """Top-1 / top-5 and per-class counts of `model` over the val split of `root` (the trainer's val pipeline), in
    fp32, or under autocast to `amp_dtype` as the trainer evaluates with --amp."""
    import contextlib

    from .data import build_eval_loaders

    loaders = build_eval_loaders(root, batch_size, workers, device, kind="torch")
    classes = loaders.classes
    out = model.fc.out_features
    if out != len(classes):
        raise DataError(f"{root}: has {len(classes)} classes but the checkpoint's network has {out} outputs; pass "
                        "--data the folder it was trained on (or one with the same classes in wnids.txt)")
    k = min(5, out)
    right = torch.zeros(len(classes), dtype=torch.int64)
    seen = torch.zeros(len(classes), dtype=torch.int64)
    right5 = 0
    for images, labels in loaders.val.epoch(0):
        cast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with cast:
            logits = model(images).float()
        top = logits.topk(k, dim=1).indices.cpu()
        labels = labels.cpu()
        hit = top[:, 0] == labels
        right += torch.bincount(labels[hit], minlength=len(classes))
        seen += torch.bincount(labels, minlength=len(classes))
        right5 += int((top == labels[:, None]).any(dim=1).sum())
    n = int(seen.sum())
    if n == 0:
        raise DataError(f"{root}: its val split has no images")
    return Result(int(right.sum()) / n, right5 / n, n, classes, list(zip(right.tolist(), seen.tolist())))


def write_per_class(result: Result, path: str | os.PathLike) -> None:
    """Written to a temporary file beside `path`, then renamed over it: a reader never sees half a table, and a failed
    write leaves an earlier file of that name whole."""
    path = Path(path)
    try:
        with written_whole(path) as f:
            w = csv.writer(f)
            w.writerow(["class", "wnid", "images", "correct", "top1"])
            for i, (wnid, (right, seen)) in enumerate(zip(result.classes, result.per_class)):
                w.writerow([i, wnid, seen, right, f"{right / seen:.6f}" if seen else ""])
    except OSError as exc:
        raise WriteError(write_failure(exc, path, atomic=True, then="run again")) from None


def build_parser():
    p = command_parser("evaluate", "Top-1 / top-5 accuracy of a seal_fast checkpoint on a val set, in one line.",
                       module="seal_fast.evaluate")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint a run wrote: last.pt, best.pt or gen<G>.pt")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="tiny-imagenet-200 folder whose val split to use (default: the folder the run was trained "
                        "on, from its config; the built-in synthetic set for a run made without --data)")
    p.add_argument("--per-class-csv", metavar="FILE", default=None,
                   help="also write each class's accuracy to FILE (class, wnid, images, correct, top1)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="images per forward pass (default 256; sets speed and memory use)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run: auto (a GPU when one is visible), cpu or cuda (default auto)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="data-loader worker processes (default 0: decode in this process)")
    p.add_argument("--amp", action="store_true",
                   help="evaluate under the autocast the trainer's --amp uses on this device (bf16 where supported; "
                        "default: fp32), to reproduce the val numbers of a run trained with --amp")
    checkpoint.add_trust_flag(p)
    return p


def run(argv: list[str] | None = None) -> int:
    from .errors import ConfigError
    from .runtime import pick_device

    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: needs at least 1 image per batch")
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: needs 0 or more worker processes")
    device = pick_device(args.device)
    model, state = load_checkpoint_model(args.checkpoint, device, trust=args.trust_checkpoint)
    root, source = resolve_data(args.data, state.config)
    from .precision import amp_dtype

    dtype, _ = amp_dtype(device, args.amp)
    result = evaluate(model, root, args.batch_size, device, args.workers, dtype)
    if args.per_class_csv:
        write_per_class(result, args.per_class_csv)
    print(f"{args.checkpoint}: top-1 {100 * result.top1:.2f}%  top-5 {100 * result.top5:.2f}%  on "
          f"{result.images} val images, {len(result.classes)} classes, of {root} ({source}); "
          f"{state.config.get('method', '?')} {state.config.get('arch', '?')}, {state.kind} checkpoint after "
          f"{state.next_epoch} epochs, {str(dtype).replace('torch.', '') if dtype else 'fp32'} on {device.type}")
    if args.per_class_csv:
        print(f"wrote {args.per_class_csv}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
