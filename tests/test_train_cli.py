"""The trainer from the command line: outputs, exact resume after SIGKILL, and every bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_killing  # tests/ is on sys.path

from seal_fast import train
from seal_fast.data.layout import scan_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_run(data, out, method="seal", *extra):
    return ["--data", data, "--out", out, "--method", method, "--arch", "resnet10", "--generations", "2",
            "--epochs", "2", "--ascent-epochs", "1", "--warmup", "1", "--batch-size", "16", "--workers", "0",
            "--device", "cpu", *extra]  # exact resume is promised on the CPU


def assert_clean_error(res, *words, code=2):
    assert res.returncode == code, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    err = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, res.stderr
    for w in words:
        assert w in err[0], (w, err[0])


# ---- outputs ----------------------------------------------------------------------------------------


def test_run_writes_config_metrics_checkpoint_and_plot(cli, tiny_data, tmp_path):
    out = tmp_path / "run"
    res = cli(*small_run(tiny_data, out, "llf"))
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "llf" and cfg["epochs"] == 2 and cfg["lr"] == 0.1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["generation"], r["epoch"], r["phase"]) for r in rows] == [
        (0, 0, "descent"), (0, 1, "descent"), (1, 0, "descent"), (1, 1, "descent")]
    for r in rows:
        assert {"lr", "train_loss", "train_acc", "val_loss", "val_acc", "best_val", "images_per_s", "seconds"} <= set(r)
        assert set(r["lr"]) == {"early", "later"}
    assert rows[1]["val_acc"] is not None and rows[1]["best_val"] == rows[1]["val_acc"]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "optimizer", "next_epoch", "rng", "config", "best_val", "metrics"} <= set(ckpt)
    assert ckpt["next_epoch"] == 4 and "fc.weight" in ckpt["model"]  # plain model names, no wrapper prefix
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "best.pt").exists()


@pytest.mark.slow
def test_demo_command_end_to_end(cli, tmp_path):
    """The README's demo (no --data: built-in synthetic set), on a tiny schedule and a small model. `--amp` is
    bf16 only on a CPU with native bf16, fp32 elsewhere (tests/test_precision.py forces both branches)."""
    out = tmp_path / "demo"
    res = cli("--amp", "--channels-last", "--arch", "resnet10", "--epochs", "3", "--warmup", "1", "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    first = res.stdout.splitlines()[:2]
    assert "built-in synthetic dataset" in first[0] and "demo schedule: 2 generations x 3 epochs" in first[1]
    assert res.stdout.splitlines()[2].startswith("amp: "), res.stdout[:1000]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and [r["phase"] for r in rows].count("ascent") == 1
    best = rows[-1]["best_val"]
    assert best > 0.3, f"best val {best}: 10 classes, chance is 0.1; training does not learn"
    assert "done: val top-1" in res.stdout and "the best within the last generation" in res.stdout


# ---- exact resume --------------------------------------------------------------------------------


def final_state(out):
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    return ckpt["model"], ckpt["optimizer"]["state"], ckpt["next_epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("method, loader", [("seal", "cache"), ("llf", "torch")])
def test_sigkill_then_resume_is_bit_identical(cli, tiny_data, tmp_path, method, loader):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    res = cli(*small_run(tiny_data, ref_out, method, "--loader", loader))
    assert res.returncode == 0, res.stderr
    ref_model, ref_opt, _ = final_state(ref_out)

    args = small_run(tiny_data, out, method, "--loader", loader)
    kills = run_killing(lambda attempt: [sys.executable, "-m", "seal_fast.train", *map(str, args)] +
                        (["--resume", str(out)] if attempt else []), out / "last.pt", attempts=12, max_pause_s=0.6,
                        seed=method)
    model, opt, next_epoch = final_state(out)
    assert next_epoch == 4
    for k, v in ref_model.items():
        assert torch.equal(v, model[k]), f"{k} differs after {kills} kill(s) and resume"
    for k, st in ref_opt.items():
        assert torch.equal(st["momentum_buffer"], opt[k]["momentum_buffer"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_epoch"] for r in rows] == [0, 1, 2, 3]


def test_a_kill_during_a_save_never_breaks_the_checkpoint(tmp_path):
    script = (
        "import sys, torch\n"
        "from seal_fast.checkpoint import save\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    save({'i': i, 'x': torch.full((2_000_000,), float(i))}, sys.argv[1])\n"
    )
    path = tmp_path / "last.pt"
    env = dict(os.environ, PYTHONPATH=ROOT)
    rng = random.Random(0)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", script, str(path)], env=env)
        while not path.exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        obj = torch.load(path, weights_only=True)
        assert torch.equal(obj["x"], torch.full((2_000_000,), float(obj["i"])))
    assert not [p for p in tmp_path.iterdir() if p.name != "last.pt" and not p.name.endswith(".tmp")]


def test_resume_with_a_different_config_is_refused(cli, tiny_data, tmp_path):
    out = tmp_path / "run"
    assert cli(*small_run(tiny_data, out)).returncode == 0
    res = cli(*small_run(tiny_data, out), "--lr", "0.2", "--resume")
    assert_clean_error(res, "settings differ", "lr: run has 0.1, command line says 0.2")
    res = cli("--resume", out)  # the run's own settings: fine, and already complete
    assert res.returncode == 0 and "already complete" in res.stdout


def test_a_finished_run_folder_is_not_overwritten(cli, tiny_data, tmp_path):
    out = tmp_path / "run"
    assert cli(*small_run(tiny_data, out)).returncode == 0
    assert_clean_error(cli(*small_run(tiny_data, out)), "already holds a run", "--resume")


# ---- bad input -----------------------------------------------------------------------------------


def test_missing_data_folder(cli, tmp_path):
    assert_clean_error(cli(*small_run(tmp_path / "nowhere", tmp_path / "o")), "no such folder", "tiny-imagenet-200")


def test_wrong_data_folder_without_wnids(cli, data_copy, tmp_path):
    (data_copy / "wnids.txt").unlink()
    assert_clean_error(cli(*small_run(data_copy, tmp_path / "o")), "wnids.txt: missing")


def test_class_folder_with_no_images(cli, data_copy, tmp_path):
    wnid = (data_copy / "wnids.txt").read_text().split()[1]
    for f in (data_copy / "train" / wnid / "images").iterdir():
        f.unlink()
    assert_clean_error(cli(*small_run(data_copy, tmp_path / "o")), wnid, "has no images")


def test_val_annotation_naming_a_missing_file(cli, data_copy, tmp_path):
    (data_copy / "val" / "images" / "val_0.JPEG").unlink()
    assert_clean_error(cli(*small_run(data_copy, tmp_path / "o")), "val_annotations.txt:1", "val_0.JPEG")


def test_corrupt_jpeg_in_a_worker_is_named(cli, data_copy, tmp_path):
    bad = scan_train(data_copy).files[7]
    open(bad, "wb").write(b"\xff\xd8garbage")
    args = small_run(data_copy, tmp_path / "o", "seal", "--loader", "torch")
    args[args.index("--workers") + 1] = "1"  # the error crosses a DataLoader worker
    assert_clean_error(cli(*args), os.path.basename(bad), "cannot decode")


def test_unwritable_out(cli, tiny_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_clean_error(cli(*small_run(tiny_data, blocker / "run")), "cannot write there")


def test_nonfinite_loss_stops_names_the_step_and_keeps_the_last_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    """The loss turns NaN at the 3rd step of the second epoch: the run stops there, says so, and the
    checkpoint of the first epoch is left as it was."""
    out = tmp_path / "run"
    real = train.make_criterion
    calls = {"n": 0}
    steps_per_epoch = 96 // 16

    def poisoned(cfg):
        loss_fn = real(cfg)

        def f(logits, y):
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] == steps_per_epoch + 3:
                    return loss_fn(logits, y) * float("nan")
            return loss_fn(logits, y)
        return f

    monkeypatch.setattr(train, "make_criterion", poisoned)
    code = train.main([str(a) for a in small_run(tiny_data, out)])
    err = capsys.readouterr().err
    assert code == 3
    assert "became nan" in err and "global epoch 1), step 2 of 6" in err and "last.pt still holds" in err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["next_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_signed_sgd_and_torch_sgd_train_the_same_weights(cli, tiny_data, tmp_path):
    """The trainer's default SignedSGD (CPU: the PyTorch reference) and --optimizer torch (torch.optim.SGD,
    as published) give the same run; a SignedSGD checkpoint resumes under torch.optim.SGD."""
    a, b = tmp_path / "signed", tmp_path / "torch"
    assert cli(*small_run(tiny_data, a, "seal")).returncode == 0
    assert cli(*small_run(tiny_data, b, "seal", "--optimizer", "torch")).returncode == 0
    wa, wb = final_state(a)[0], final_state(b)[0]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    # a SignedSGD checkpoint, rewound to the end of epoch 1, resumes under torch.optim.SGD and finishes
    ckpt = torch.load(a / "last.pt", weights_only=True)
    ckpt["next_epoch"], ckpt["metrics"] = 2, ckpt["metrics"][:2]
    torch.save(ckpt, a / "last.pt")
    res = cli("--resume", a, "--optimizer", "torch")
    assert res.returncode == 0 and "resumed" in res.stdout and "at global epoch 2" in res.stdout, res.stderr
    assert final_state(a)[2] == 4


def test_the_demo_banner_is_for_the_demo_only_and_a_batch_beyond_the_synthetic_set_is_refused(cli, tmp_path):
    common = ("--arch", "resnet10", "--method", "normal", "--workers", "0", "--device", "cpu", "--batch-size", "5000")
    res = cli("--preset", "paper", "--epochs", "2", "--out", tmp_path / "p", *common)
    assert_clean_error(res, "--batch-size 5000 is larger than the training set (960 images)")
    assert "demo" not in res.stdout and "with the paper preset's schedule" in res.stdout.splitlines()[0]
    res = cli("--out", tmp_path / "d", *common)
    assert_clean_error(res, "--batch-size 5000 is larger than the training set (960 images)")
    assert res.stdout.startswith("seal-fast demo: no --data given") and "demo schedule: 2 generations x 4" in res.stdout
