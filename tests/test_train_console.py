"""The trainer's command line as a user of timm / Lightning expects it: --version, a usage line naming the command,
help for every option, --config FILE, train.log in every run folder, progress lines in a log file, --quiet."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seal_fast.config import Config
from seal_fast.errors import ConfigError
from seal_fast.preflight import build_parser, check_train_argv

ROOT = Path(__file__).resolve().parent.parent


def train(*args, stdout=subprocess.PIPE):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "seal_fast.train", *map(str, args)], cwd=ROOT, env=env,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600)


def test_version_usage_and_help_for_every_option():
    res = train("--version")
    assert res.returncode == 0 and res.stdout.startswith("seal-fast ")
    res = train("--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: python -m seal_fast.train ")
    assert "Exit codes: 0 done" in " ".join(res.stdout.split())
    missing = [a.option_strings for a in build_parser()._actions if not a.help]
    assert missing == []


def test_config_file_yaml_and_json_with_the_command_line_winning(tmp_path, monkeypatch):
    pytest.importorskip("yaml")
    f = tmp_path / "run.yaml"
    f.write_text("method: llf\nepochs: 3\nbatch-size: 16\nlr: 0.05\n")
    cfg = check_train_argv(["--config", str(f), "--dry-run"])
    assert (cfg.method, cfg.epochs, cfg.batch_size, cfg.lr, cfg.preset) == ("llf", 3, 16, 0.05, "demo")
    cfg = check_train_argv(["--config", str(f), "--epochs", "5", "--dry-run"])
    assert (cfg.method, cfg.epochs) == ("llf", 5)
    monkeypatch.setitem(sys.modules, "yaml", None)  # no PyYAML: JSON
    j = tmp_path / "run.conf"
    j.write_text(json.dumps({"method": "normal", "epochs": 2}))
    assert check_train_argv(["--config", str(j), "--dry-run"]).method == "normal"
    with pytest.raises(Exception, match="not readable JSON"):
        check_train_argv(["--config", str(f), "--dry-run"])


def test_a_runs_own_config_json_repeats_it_in_a_new_folder(tmp_path):
    saved = Config(method="llf", arch="resnet10", epochs=3, warmup=1, preset="demo", out=str(tmp_path / "old"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(saved.to_dict(), provenance={"command": ["python"]}), indent=2))
    cfg = check_train_argv(["--config", str(path), "--dry-run"])
    assert cfg == Config(**dict(saved.to_dict(), out=None))


@pytest.mark.parametrize("text, words", [
    ("epochs: three\n", "epochs: 'three' is not a int"),
    ("no_such: 1\n", "unknown setting(s) no_such"),
    ("- 1\n", "holds no settings"),
    ("lr: [1\n", "not readable YAML"),
])
def test_a_bad_config_file_is_one_line(tmp_path, text, words):
    pytest.importorskip("yaml")
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        check_train_argv(["--config", str(f), "--dry-run"])
    assert words in str(e.value) and "\n" not in str(e.value) and str(f) in str(e.value)


def small(data, out, *extra):
    return ("--data", data, "--out", out, "--method", "normal", "--arch", "resnet10", "--generations", "1",
            "--epochs", "1", "--batch-size", "16", "--workers", "0", "--device", "cpu", *extra)


def test_train_log_progress_lines_and_quiet(tiny_data, tmp_path):
    out = tmp_path / "run"
    res = train(*small(tiny_data, out, "--log-every", "2"))  # stdout is a pipe: not a terminal
    assert res.returncode == 0, res.stderr[-2000:]
    log = (out / "train.log").read_text().splitlines()
    assert log == res.stdout.splitlines()  # every console line, in order, from the first
    steps = [line for line in log if " step " in line]
    assert [line.split(" step ")[1].split(":")[0] for line in steps] == ["2/6", "4/6", "6/6"]
    assert "train loss" in steps[0] and "img/s" in steps[0]
    out = tmp_path / "quiet"
    res = train(*small(tiny_data, out, "--quiet"))
    assert res.returncode == 0, res.stderr[-2000:]
    printed = res.stdout.splitlines()
    assert [line.split(":")[0] for line in printed if not line.startswith("warning")] == ["done", "outputs"]
    assert len((out / "train.log").read_text().splitlines()) > len(printed) + 3


def test_a_sweep_that_sends_stdout_to_train_log_gets_each_line_once(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "train.log", "a") as log:
        res = train(*small(tiny_data, out), stdout=log)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = (out / "train.log").read_text().splitlines()
    assert sum(line.startswith("plan: ") for line in lines) == 1 and lines[-1].startswith("outputs: ")
