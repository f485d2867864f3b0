"""seal_fast.preflight.check_train_argv: the trainer's parser and every check before training, writing nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seal_fast.config import Config
from seal_fast.errors import ConfigError, DataError, SealError
from seal_fast.preflight import check_train_argv

ROOT = Path(__file__).resolve().parent.parent


def files_under(folder: Path) -> set:
    return {p for p in folder.rglob("*")}


def test_a_good_command_gives_the_config_and_writes_nothing(tiny_data, tmp_path):
    before = files_under(tmp_path) | files_under(tiny_data)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a default --out would go to ./runs: not created either
    try:
        cfg = check_train_argv(["--data", str(tiny_data), "--method", "llf", "--arch", "resnet10", "--epochs", "3",
                                "--out", str(tmp_path / "a" / "b")])
        check_train_argv(["--data", str(tiny_data), "--arch", "resnet10", "--partial-data"])
    finally:
        os.chdir(cwd)
    assert isinstance(cfg, Config) and cfg.method == "llf" and cfg.epochs == 3 and cfg.preset == "paper"
    assert cfg.out == str(tmp_path / "a" / "b")
    assert files_under(tmp_path) | files_under(tiny_data) == before


@pytest.mark.parametrize("argv, words", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--lr", "x"], "argument --lr: invalid float value: 'x'"),
    (["--method", "sgd"], "argument --method: invalid choice"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--summary"], "--summary goes with --dry-run"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--ascent-lr-scale", "nan"], "--ascent-lr-scale nan: must be a finite number"),
    (["--ascent-lr-scale=-inf"], "--ascent-lr-scale -inf: must be a finite number"),
    (["--ascent-lr-scale", "-5"], "--ascent-lr-scale -5.0: must lie in [-1, 1]"),
    (["--ascent-wd-scale", "inf"], "--ascent-wd-scale inf: must be a finite number"),
    (["--ascent-wd-scale", "2"], "--ascent-wd-scale 2.0: must lie in [0, 1]"),
    (["--workers", "-1"], "argument --workers: -1: must be 0 or more"),
    (["--epochs", "4", "--warmup", "5"], "--warmup 5 > --epochs 4: the warm-up is longer than a generation"),
])
def test_argparse_errors_and_bad_values_are_config_errors_not_system_exit(argv, words):
    with pytest.raises(ConfigError) as e:
        check_train_argv(argv)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_data_folder_and_its_layout_are_checked(data_copy, tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        check_train_argv(["--data", str(tmp_path / "nowhere")])
    (data_copy / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match="val_annotations.txt: missing"):
        check_train_argv(["--data", str(data_copy)])


def test_the_out_folder_is_checked_without_being_made(tiny_data, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="already holds a run"):
        check_train_argv(["--data", str(tiny_data), "--out", str(done)])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write there"):
        check_train_argv(["--data", str(tiny_data), "--out", str(blocker / "run")])
    with pytest.raises(ConfigError, match="cannot write there"):
        check_train_argv(["--data", str(tiny_data), "--out", str(blocker)])


def test_seal_with_one_generation_never_ascends_so_any_ascent_length_is_accepted():
    cfg = check_train_argv(["--epochs", "1", "--generations", "1", "--dry-run"])
    assert (cfg.method, cfg.epochs, cfg.generations, cfg.warmup) == ("seal", 1, 1, 1)  # the preset's warm-up, cut
    with pytest.raises(ConfigError, match="the ascent must end inside the generation"):
        check_train_argv(["--epochs", "1", "--generations", "2", "--dry-run"])


def test_a_batch_larger_than_the_training_set_is_refused(tiny_data):
    n = 4 * 24  # tiny_data: 4 classes x 24 train images
    check_train_argv(["--data", str(tiny_data), "--method", "normal", "--epochs", "2", "--batch-size", str(n)])
    with pytest.raises(ConfigError, match=f"--batch-size {n + 1} is larger than the training set \\({n} images\\)"):
        check_train_argv(["--data", str(tiny_data), "--method", "normal", "--epochs", "2", "--batch-size", str(n + 1)])


def test_the_full_paper_recipe_refuses_a_partial_set_unless_told(tiny_data):
    with pytest.raises(ConfigError) as e:
        check_train_argv(["--data", str(tiny_data)])
    line = str(e.value)
    assert "4 classes, 96 train / 24 val images found; 200 classes, 100000 train / 10000 val expected" in line
    assert "--partial-data" in line and "\n" not in line
    assert check_train_argv(["--data", str(tiny_data), "--partial-data"]).epochs == 160
    not_full = ["--data", str(tiny_data), "--method", "normal", "--epochs", "3"]  # a shortened run: not refused
    assert check_train_argv(not_full).epochs == 3


def test_resume_on_a_missing_folder_says_it_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="--resume .*nowhere: no such folder"):
        check_train_argv(["--resume", str(tmp_path / "nowhere")])


def test_resume_reads_the_folder_it_names(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SealError, match="cannot read this checkpoint"):
        check_train_argv(["--resume", str(tmp_path / "run")])


def test_a_damaged_last_pt_names_the_intact_checkpoints_and_what_they_allow(tiny_data, tmp_path, cli):
    out = tmp_path / "run"
    res = cli("--data", tiny_data, "--out", out, "--arch", "resnet10", "--generations", "2", "--epochs", "1",
              "--batch-size", "16", "--workers", "0", "--device", "cpu", "--method", "llf", "--eval-every", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    last = out / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    (out / "gen1.pt").write_bytes(b"damaged too")
    with pytest.raises(SealError) as e:
        check_train_argv(["--resume", str(out)])
    line = str(e.value)
    assert "last.pt: cannot read this checkpoint" in line and "\n" not in line
    assert "intact in" in line and "best.pt (after global epoch" in line and "gen0.pt (after global epoch 0)" in line
    assert "gen1.pt" not in line and "not" in line and "bit-identically" in line


def test_the_trainer_answers_an_unknown_flag_with_the_same_line():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "seal_fast.train", "--no-such-flag"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "error: unrecognized arguments: --no-such-flag (python -m seal_fast.train --help lists every flag)"]


# ---- SEAL_FAST_CUDA_MEMORY_FRACTION (runs packed on one GPU) ----------------------------------------


@pytest.mark.parametrize("raw, value", [("0.25", 0.25), ("1", 1.0), (" 0.5 ", 0.5), ("", None)])
def test_memory_fraction_parses_a_share_of_the_gpu(raw, value):
    from seal_fast.runtime import memory_fraction

    assert memory_fraction({"SEAL_FAST_CUDA_MEMORY_FRACTION": raw}) == value
    assert memory_fraction({}) is None


@pytest.mark.parametrize("raw", ["0", "-0.1", "1.5", "nan", "inf", "half"])
def test_a_bad_memory_fraction_is_one_line_naming_the_variable(raw, monkeypatch):
    from seal_fast.runtime import memory_fraction

    with pytest.raises(ConfigError, match="SEAL_FAST_CUDA_MEMORY_FRACTION"):
        memory_fraction({"SEAL_FAST_CUDA_MEMORY_FRACTION": raw})
    monkeypatch.setenv("SEAL_FAST_CUDA_MEMORY_FRACTION", raw)
    with pytest.raises(ConfigError, match="SEAL_FAST_CUDA_MEMORY_FRACTION"):
        check_train_argv(["--dry-run"])


def test_the_memory_fraction_is_applied_to_a_cuda_device_only(monkeypatch):
    import torch

    from seal_fast import runtime

    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda v, d: calls.append((v, d)))
    monkeypatch.setenv("SEAL_FAST_CUDA_MEMORY_FRACTION", "0.3")
    assert runtime.apply_memory_fraction(torch.device("cpu")) is None and calls == []
    assert runtime.apply_memory_fraction(torch.device("cuda", 1)) == 0.3
    assert calls == [(0.3, torch.device("cuda", 1))]
    monkeypatch.delenv("SEAL_FAST_CUDA_MEMORY_FRACTION")
    assert runtime.apply_memory_fraction(torch.device("cuda", 1)) is None and len(calls) == 1


def test_the_trainer_exits_2_on_a_bad_memory_fraction():
    env = dict(os.environ, PYTHONPATH=str(ROOT), SEAL_FAST_CUDA_MEMORY_FRACTION="2")
    res = subprocess.run([sys.executable, "-m", "seal_fast.train", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error: SEAL_FAST_CUDA_MEMORY_FRACTION='2'")
