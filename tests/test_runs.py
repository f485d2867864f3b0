"""What a run records and how it survives a cluster: per-generation figures (the paper's is the best within the
last generation), gen<G>.pt checkpoints, --resume auto, never-shared default folders, provenance, top-5,
TensorBoard."""

import json
import sys
import types

import pytest
import torch

from seal_fast import checkpoint, train
from seal_fast.config import Config
from seal_fast import rundir
from seal_fast.rundir import prepare_out

ARGS = ["--arch", "resnet10", "--generations", "2", "--epochs", "2", "--ascent-epochs", "1", "--warmup", "1",
        "--batch-size", "16", "--workers", "0", "--device", "cpu", "--eval-every", "1"]


@pytest.fixture(scope="module")
def seal_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "seal"
    code = train.main(["--data", str(tiny_data), "--out", str(out), "--method", "seal", *ARGS])
    assert code == 0
    return out


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_per_generation_best_and_last_and_top5(seal_run):
    r = rows(seal_run)
    assert all(0 <= x["val_top5"] <= 1 and x["val_top5"] >= x["val_acc"] for x in r)  # 4 classes: top-5 is 1
    for g in (0, 1):
        vals = [x["val_acc"] for x in r if x["generation"] == g]
        last = [x for x in r if x["generation"] == g][-1]
        assert last["gen_best_val"] == max(vals) and last["gen_last_val"] == vals[-1]
    assert r[-1]["best_val"] == max(x["val_acc"] for x in r)  # the whole run's best is kept as its own column


def test_generation_checkpoints_are_kept(seal_run):
    for name, next_epoch in (("gen0.pt", 2), ("gen1-after-ascent.pt", 3), ("gen1.pt", 4)):
        st = checkpoint.read(seal_run / name)
        assert st.kind == "generation" and st.next_epoch == next_epoch and "fc.weight" in st.model, name
    assert not (seal_run / "gen0-after-ascent.pt").exists()  # generation 0 has no ascent
    final = checkpoint.read(seal_run / "last.pt")
    for k, v in checkpoint.read(seal_run / "gen1.pt").model.items():
        assert torch.equal(v, final.model[k])


def test_config_json_records_provenance(seal_run):
    cfg = json.loads((seal_run / "config.json").read_text())
    prov = cfg["provenance"]
    assert prov["torch"] == torch.__version__ and prov["command"][1:3] == ["-m", "seal_fast.train"]
    assert "--method" in prov["command"] and {"python", "triton", "dali", "cuda", "gpus", "git_commit"} <= set(prov)


def test_keep_generations_none_and_summary_lines(tiny_data, tmp_path, capsys):
    out = tmp_path / "normal"
    assert train.main(["--data", str(tiny_data), "--out", str(out), "--method", "normal", "--keep-generations",
                       "none", *ARGS]) == 0
    assert not list(out.glob("gen*.pt")) and (out / "last.pt").exists()
    text = capsys.readouterr().out
    r = rows(out)
    best_last_gen = max(x["val_acc"] for x in r if x["generation"] == 1)
    assert f"done: val top-1 {100 * best_last_gen:.2f}%, the best within the last generation" in text
    assert "generation 1: 2 epochs" in text and "generation 2: 2 epochs" in text


def test_resume_auto_starts_then_resumes(tiny_data, tmp_path, capsys):
    out = tmp_path / "auto"
    args = ["--data", str(tiny_data), "--out", str(out), "--method", "llf", "--resume", "auto", *ARGS,
            "--generations", "1"]
    assert train.main(args) == 0 and "resumed" not in capsys.readouterr().out  # nothing there: a fresh start
    ckpt = torch.load(out / "last.pt", weights_only=False)           # rewind one epoch, as a preemption would
    ckpt["next_epoch"], ckpt["metrics"] = 1, ckpt["metrics"][:1]
    torch.save(ckpt, out / "last.pt")
    assert train.main(args) == 0
    assert "resumed" in capsys.readouterr().out and len(rows(out)) == 2


def test_resume_auto_needs_out(capsys):
    assert train.main(["--resume", "auto", "--arch", "resnet10"]) == 2
    assert "--resume auto needs --out DIR" in capsys.readouterr().err


def test_default_out_names_the_seed_and_is_never_shared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed = rundir.datetime(2026, 11, 28, 12, 0, 0)
    monkeypatch.setattr(rundir, "datetime", types.SimpleNamespace(now=lambda: fixed))  # both in the same second
    cfg = Config(method="seal", seed=7)
    a, b = prepare_out(cfg, False), prepare_out(cfg, False)
    assert a.name == "seal-s7-20261128-120000" and b.name == "seal-s7-20261128-120000-2"
    assert a.parent == b.parent and a.parent.resolve() == (tmp_path / "runs").resolve() and a.is_dir() and b.is_dir()


def test_tensorboard_missing_is_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    code = train.main(["--data", str(tiny_data), "--out", str(tmp_path / "tb"), "--tensorboard", *ARGS])
    assert code == 2 and "--tensorboard needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err


def test_tensorboard_writes_the_epoch_scalars(tiny_data, tmp_path, monkeypatch):
    written = []

    class Writer:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, key, value, step):
            written.append((key, step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    out = tmp_path / "tb"
    assert train.main(["--data", str(tiny_data), "--out", str(out), "--tensorboard", *ARGS, "--generations", "1"]) == 0
    assert written[0] == ("dir", str(out / "tb")) and written[-1] == ("closed", None)
    keys = {k for k, _ in written}
    assert {"train_loss", "val_acc", "val_top5", "lr/early", "lr/later"} <= keys
    assert ("val_acc", 1) in written
