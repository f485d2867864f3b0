"""A checkpoint is data, never code (issue 26): every command refuses a code-carrying checkpoint with one line and
runs nothing of it (--trust-checkpoint loads it); a feature-cache file is data only; run folders' JSON is data only;
an image that would decode to an enormous size stops with one line naming it; a full disk while a checkpoint is
written loses nothing (the previous last.pt stays whole, one line says what was full and where, --resume goes on).

The full-disk tests use a real, small tmpfs where this machine allows mounting one (root), else they skip; the
same scenarios also run with ENOSPC simulated at the file's write() (always)."""

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seal_fast import checkpoint, train
from seal_fast.runs import report, sweep
from seal_fast.studies import depth, fewshot, hessian, pof, transfer
from seal_fast.data.images import MAX_PIXELS, load_rgb
from seal_fast.errors import DataError, UntrustedFileError, WriteError
from seal_fast.studies.features import FeatureCache, Transform, open_rgb

ROOT = Path(__file__).resolve().parent.parent


# ---- a checkpoint that runs a shell command when unpickled -----------------------------------------


class WritesMarker:
    """Unpickling this runs `echo ran > marker` (os.system), as a hostile checkpoint would run anything."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo ran > {shlex.quote(str(self.marker))}",))


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A last.pt-shaped file (schema 2 keys, weights that are no ResNet's) carrying a WritesMarker."""
    torch.save({"version": 2, "kind": "last", "model": {"fc.weight": torch.zeros(4, 8)},
                "config": {"method": "seal", "arch": "resnet10"}, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {}, "next_epoch": 1, "rng": None, "best_val": None, "metrics": [],
                "payload": WritesMarker(marker)}, path)
    return path


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "marker"
    return hostile_checkpoint(tmp_path / "shared.pt", marker), marker


def test_checkpoint_load_refuses_code_and_runs_none_of_it(hostile):
    path, marker = hostile
    with pytest.raises(UntrustedFileError) as info:
        checkpoint.load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "--trust-checkpoint" in msg and "posix.system" in msg
    assert not marker.exists()
    with pytest.raises(UntrustedFileError):
        checkpoint.read(path, resumable=True)
    assert not marker.exists()
    checkpoint.load(path, trust=True)            # the file really is hostile: trusted, its code runs
    assert marker.read_text().strip() == "ran"


def test_a_hostile_file_is_not_let_in_by_the_legacy_numpy_allow_list(tmp_path):
    """The schema-2 allow-list (numpy's RNG-state types) admits nothing else: a file holding both is refused."""
    marker = tmp_path / "marker"
    torch.save({"model": {}, "config": {}, "rng": {"numpy": np.random.get_state()}, "x": WritesMarker(marker)},
               tmp_path / "mixed.pt")
    with pytest.raises(UntrustedFileError, match="--trust-checkpoint"):
        checkpoint.load(tmp_path / "mixed.pt")
    assert not marker.exists()


# ---- every command refuses it ------------------------------------------------------------------------


def _image(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


@pytest.fixture
def folders(tmp_path):
    """A tiny transfer ImageFolder (train/ and test/) and a tiny few-shot one (<class>/), for the commands' setup."""
    t, f = tmp_path / "transfer", tmp_path / "fewshot"
    for c, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        for i in range(2):
            _image(t / "train" / c / f"{i}.png", colour)
            _image(t / "test" / c / f"{i}.png", colour)
            _image(f / c / f"{i}.png", colour)
    return t, f


def command_cases(ckpt: Path, out: Path, folders) -> dict:
    t, f = folders
    return {
        "depth": (depth.main, ["--checkpoint", ckpt, "--out", out, "--device", "cpu"]),
        "hessian": (hessian.main, ["--checkpoint", ckpt, "--out", out, "--device", "cpu"]),
        "pof": (pof.main, ["--checkpoint", ckpt, "--out", out, "--device", "cpu"]),
        "transfer": (transfer.main, ["--checkpoint", ckpt, "--dataset", "folder", "--root", t, "--out", out,
                                     "--device", "cpu", "--no-cache", "--workers", "0"]),
        "fewshot": (fewshot.main, ["--checkpoint", ckpt, "--dataset", "folder", "--root", f, "--out", out,
                                   "--device", "cpu", "--no-cache", "--workers", "0", "--ways", "2", "--shots", "1",
                                   "--queries", "1", "--episodes", "2"]),
    }


@pytest.mark.parametrize("command", ["depth", "hessian", "pof", "transfer", "fewshot"])
def test_every_study_refuses_a_code_carrying_checkpoint(hostile, folders, tmp_path, capsys, command):
    path, marker = hostile
    main, args = command_cases(path, tmp_path / "out", folders)[command]
    assert main([str(a) for a in args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(path) in line and "--trust-checkpoint" in line and "nothing of it was run" in line
    assert not marker.exists()
    # with --trust-checkpoint the file is loaded (its code runs: it was a real threat), then refused as no ResNet
    _, args = command_cases(path, tmp_path / "out-trusted", folders)[command]
    assert main([str(a) for a in args] + ["--trust-checkpoint"]) == 2
    assert marker.exists()
    err = capsys.readouterr().err
    assert "warning: --trust-checkpoint: loading" in err and "posix.system" in err
    one_error_line(err)


def test_pof_resume_refuses_a_code_carrying_last_pt(hostile, tmp_path, capsys):
    path, marker = hostile
    out = tmp_path / "pof"
    out.mkdir()
    shutil.copy(path, out / "last.pt")
    assert pof.main(["--checkpoint", str(path), "--out", str(out), "--resume", "--device", "cpu"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out / "last.pt") in line and "--trust-checkpoint" in line
    assert not marker.exists()


def test_train_resume_refuses_a_code_carrying_last_pt(hostile, tmp_path):
    """python -m seal_fast.train --resume, as a user runs it (a subprocess)."""
    path, marker = hostile
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "last.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "seal_fast.train", "--resume", str(run), "--device", "cpu"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert str(run / "last.pt") in line and "--trust-checkpoint" in line
    assert not marker.exists()
    res = subprocess.run(cmd + ["--trust-checkpoint"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert marker.exists() and res.returncode == 2, res.stderr   # loaded (and ran); then no resumable state
    one_error_line(res.stderr)


def test_trust_flag_says_what_it_allows_in_every_command(capsys):
    texts = [m.build_parser().format_help() for m in (train, depth, hessian, transfer, fewshot)]
    with pytest.raises(SystemExit):
        pof.main(["--help"])
    texts.append(capsys.readouterr().out)
    for text in texts:
        assert "--trust-checkpoint" in text and "which runs any code such a file carries" in " ".join(text.split())


def test_a_hostile_feature_cache_file_is_extracted_again_not_run(tmp_path, monkeypatch):
    from seal_fast.studies import features

    marker = tmp_path / "marker"
    ckpt = tmp_path / "last.pt"
    checkpoint.write_last(checkpoint.RunState(model={}, config={}, next_epoch=1), tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    model = torch.nn.Module()
    monkeypatch.setattr(features, "feature_layer", lambda m: "layer4")
    files, labels = [str(tmp_path / "x.png")], [0]
    spot = cache.path(str(ckpt), "d", "train", files, labels, Transform(8, 8), "layer4", None)
    spot.parent.mkdir(parents=True)
    torch.save({"features": WritesMarker(marker), "labels": torch.zeros(1)}, spot)
    extracted = []
    monkeypatch.setattr(features, "extract", lambda *a, **k: extracted.append(1) or (torch.ones(1, 2),
                                                                                    torch.zeros(1, dtype=torch.int64)))
    feats, _, how = cache.features(model, str(ckpt), "d", "train", files, labels, Transform(8, 8),
                                   torch.device("cpu"), None, 1, 0, "t")
    assert extracted and how.startswith("extracted") and not marker.exists()


# ---- run folders' JSON: data only, a broken file is one line -------------------------------------------


def _run_folder(folder: Path, cfg, rows) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    (folder / "metrics.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return folder


GOOD_CFG = {"method": "seal", "generations": 1, "epochs": 1, "seed": 0}
GOOD_ROW = {"generation": 0, "epoch": 0, "global_epoch": 0, "phase": "descent", "val_acc": 0.5, "best_val": 0.5,
            "gen_best_val": 0.5, "seconds": 1.0}


@pytest.mark.parametrize("cfg, rows, words", [
    ("[1, 2]", [GOOD_ROW], "config.json: not a run's settings"),
    ('{"method": "seal", "generations": ' + "9" * 5000 + "}", [GOOD_ROW], "config.json: not readable JSON"),
    ("[" * 100_000 + "]" * 100_000, [GOOD_ROW], "config.json: not readable JSON (nested too deep)"),
    ({"method": "seal", "generations": "10", "epochs": 1}, [GOOD_ROW], "config.json: not a run's settings"),
    (GOOD_CFG, ["[]"], "metrics.jsonl, line 1: not an epoch's metrics"),
    (GOOD_CFG, [dict(GOOD_ROW, val_acc="0.9")], "metrics.jsonl, line 1: not an epoch's metrics"),
    (GOOD_CFG, [GOOD_ROW, '{"generation": 0, '], "metrics.jsonl, line 2: not a JSON line"),
])
def test_report_reads_run_folders_as_data_and_says_what_is_wrong(tmp_path, capsys, cfg, rows, words):
    folder = _run_folder(tmp_path / "seal-s0", cfg, rows)
    assert report.main([str(folder), "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert words in line and str(folder) in line


def test_sweep_reads_a_broken_config_json_as_one_line(tmp_path, capsys):
    _run_folder(tmp_path / "sw" / "seal-s0", '{"method": ', [])
    assert sweep.main(["--out", str(tmp_path / "sw"), "--runs", "seal", "--dry-run"]) == 2
    assert "seal-s0/config.json: not readable JSON" in one_error_line(capsys.readouterr().err)


# ---- images that would decode to an enormous size ----------------------------------------------------


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> Path:
    """A 10,000 x 9,000 image (90 Mpx: 0.27 GB as RGB) in a 30 KB PNG: just over MAX_PIXELS, under PIL's own
    error limit (twice it), where PIL would only warn and decode it."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (10_000, 9_000)).save(path)
    assert path.stat().st_size < 100_000 and 10_000 * 9_000 > MAX_PIXELS
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header announces width x height (its pixels are never there): PIL's own bomb refusal."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(bomb_png, tmp_path):
    for read in (load_rgb, open_rgb):
        with pytest.raises(DataError) as info:
            read(str(bomb_png))
        msg = str(info.value)
        assert "\n" not in msg and str(bomb_png) in msg and "10000x9000" in msg and "decompression bomb" in msg
    huge = _png_header_only(tmp_path / "huge.png", 100_000, 100_000)
    with pytest.raises(DataError, match=f"{huge}: .*decompression bomb"):
        load_rgb(str(huge))


@pytest.fixture
def bombed_data(data_copy, bomb_png) -> Path:
    victim = sorted((data_copy / "train").glob("*/images/*"))[5]
    shutil.copy(bomb_png, victim)
    return data_copy


@pytest.mark.parametrize("loader", ["torch", "cache"])
def test_the_trainer_stops_on_a_decompression_bomb_with_one_line(bombed_data, tmp_path, capsys, loader):
    args = ["--data", str(bombed_data), "--out", str(tmp_path / "run"), "--method", "normal", "--arch", "resnet10",
            "--epochs", "2", "--generations", "1", "--warmup", "1", "--batch-size", "32", "--workers", "0",
            "--device", "cpu", "--loader", loader]
    assert train.main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "decompression bomb" in line and "/train/" in line and "10000x9000" in line


def test_the_dali_loader_refuses_a_bomb_before_decoding_it(bombed_data):
    from seal_fast.data import build_loaders
    from seal_fast.data.dali_loader import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    bomb = sorted((bombed_data / "train").glob("*/images/*"))[5]
    Image.new("L", (10_000, 9_000)).save(bomb, format="JPEG")   # DALI is fed JPEG bytes
    ld = build_loaders(str(bombed_data), batch_size=16, seed=0, workers=1, device=torch.device("cpu"), kind="dali")
    with pytest.raises(DataError, match=f"{bomb}: a 10000x9000 image .*decompression bomb"):
        for _ in ld.train.epoch(0):
            pass


# ---- a full disk while a checkpoint is written -------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` bytes (root only, else the test skips); remount(path, size) grows it.
    Unmounted afterwards."""
    mounted = []

    def mount(size: int) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()})")
        mounted.append(path)
        return path

    def remount(path: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)

    mount.remount = remount
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


class _FillsUp:
    """A file object whose writes fail with ENOSPC once `room` bytes are written, as on a full filesystem."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def simulate_full_disk(monkeypatch, room: int, names=(".last.pt.", ".best.pt."), after: int = 0):
    """ENOSPC at write() for checkpoint temp files (by name) from the (after+1)-th one on, `room` bytes in."""
    real = os.fdopen
    seen = []

    def fdopen(fd, *a, **k):
        f = real(fd, *a, **k)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(names):
            seen.append(name)
            if len(seen) > after:
                return _FillsUp(f, room)
        return f

    monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)


def _state(n: int) -> checkpoint.RunState:
    return checkpoint.RunState(model={"w": torch.arange(n, dtype=torch.float32)}, config={"method": "seal"},
                               next_epoch=n, optimizer={"state": {}, "param_groups": []}, scaler={},
                               rng=checkpoint.rng_state(), metrics=[])


def _check_full_disk(folder: Path, err: str, first: int) -> None:
    assert f"no space left on the filesystem holding {folder}" in err and "last.pt" in err and "\n" not in err
    assert checkpoint.read(folder / "last.pt", resumable=True).next_epoch == first      # whole, the old one
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]                     # no temp file left


@pytest.mark.parametrize("how", ["tmpfs", "simulated"])
def test_a_full_disk_keeps_the_previous_last_pt(tmp_path, tmpfs, monkeypatch, how):
    first, second = 50_000, 2_000_000              # 0.2 MB then 8 MB of weights
    if how == "tmpfs":
        folder = tmpfs(4 * 1024 * 1024)
    else:
        folder = tmp_path / "run"
        folder.mkdir()
        simulate_full_disk(monkeypatch, room=1_000_000, after=1)
    checkpoint.write_last(_state(first), folder)
    with pytest.raises(WriteError) as info:                      # written now
        checkpoint.write_last(_state(second), folder)
    _check_full_disk(folder, str(info.value), first)
    saver = checkpoint.BackgroundSaver()                         # written behind training: reported at wait()
    saver.save(_state(second).to_dict(), folder / "last.pt")
    with pytest.raises(WriteError) as info:
        saver.wait()
    _check_full_disk(folder, str(info.value), first)


def small_train(data: Path, out: Path, *extra) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--method", "normal", "--arch", "resnet10", "--generations", "1",
            "--epochs", "3", "--warmup", "1", "--eval-every", "1", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--keep-generations", "none", *map(str, extra)]


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory) -> Path:
    from seal_fast.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("micro") / "tiny-imagenet-200", num_classes=2,
                           train_per_class=8, val_per_class=2, size=32, seed=0)


@pytest.fixture(scope="module")
def reference(micro_data, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert train.main(small_train(micro_data, out)) == 0
    return torch.load(out / "last.pt", weights_only=True), out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tmpfs", "simulated", "simulated-best"])
def test_training_on_a_full_disk_stops_with_one_line_and_resumes_exactly(micro_data, reference, tmp_path, tmpfs,
                                                                         monkeypatch, capsys, how):
    """The run stops at the first checkpoint that does not fit, with one line (what was full, where); last.pt
    still holds the last good epoch and loads; after space is freed --resume ends bit-identical to a run that
    never stopped, best.pt included."""
    ref, ref_out = reference
    last, best = (ref_out / "last.pt").stat().st_size, (ref_out / "best.pt").stat().st_size
    if how == "tmpfs":   # epoch 0's best.pt + last.pt fit; rewriting them side by side (atomically) does not
        out = tmpfs(last + best + last // 4) / "run"
    elif how == "simulated":
        out = tmp_path / "run"
        simulate_full_disk(monkeypatch, room=last // 2, after=2)   # epoch 0's two files, then ENOSPC
    else:                # only the second best.pt does not fit: the epoch that improved must be trained again
        bests = [None] + [r["best_val"] for r in ref["metrics"]]
        if sum(b != a for a, b in zip(bests, bests[1:])) < 2:      # best.pt written twice, or nothing to test
            pytest.skip("the reference run improved its val top-1 only once on this machine")
        out = tmp_path / "run"
        simulate_full_disk(monkeypatch, room=best // 2, names=(".best.pt.",), after=1)
    capsys.readouterr()
    assert train.main(small_train(micro_data, out)) == 1
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert f"no space left on the filesystem holding {out}" in line and "--resume" in line, line
    state = checkpoint.read(out / "last.pt", resumable=True)        # whole, loadable: the last good epoch
    assert 1 <= state.next_epoch < 3
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    if how == "tmpfs":
        tmpfs.remount(out.parent, 4 * (last + best))
    else:
        monkeypatch.undo()
    assert train.main(small_train(micro_data, out, "--resume", out)) == 0
    assert f"resumed {out} at global epoch {state.next_epoch}" in capsys.readouterr().out
    got = torch.load(out / "last.pt", weights_only=True)
    assert got["next_epoch"] == ref["next_epoch"] == 3
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), k
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_epoch"] for r in rows] == [0, 1, 2]
    # best.pt too: last.pt is written after it, so an epoch whose best.pt did not fit is done again
    ref_best, got_best = (torch.load(p / "best.pt", weights_only=True) for p in (ref_out, out))
    assert got_best["val_acc"] == ref_best["val_acc"] and got_best["next_epoch"] == ref_best["next_epoch"]
    for k, v in ref_best["model"].items():
        assert torch.equal(v, got_best["model"][k]), k


def test_a_full_disk_in_a_command_output_is_one_line(tmp_path, capsys):
    """Any other output (a study's JSON, metrics.jsonl, a plot) on a full disk: one line from the commands' entry."""
    from seal_fast.errors import cli_main

    def run(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "depth.json"))

    assert cli_main(run, [], "interrupted") == WriteError.exit_code
    line = one_error_line(capsys.readouterr().err)
    assert f"could not write {tmp_path / 'depth.json'}: no space left on the filesystem holding {tmp_path}" in line


def test_a_failed_metrics_append_leaves_no_half_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"global_epoch": 0}\n')
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data[:5]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Full(real_open(*a, **k)))
    with pytest.raises(OSError):
        train.append_line(path, json.dumps({"global_epoch": 1, "x": uuid.uuid4().hex}))
    monkeypatch.undo()
    assert path.read_text() == '{"global_epoch": 0}\n'


def test_security_section_in_the_readme():
    text = (ROOT / "README.md").read_text()
    assert "## Security" in text and "--trust-checkpoint" in text.split("## Security", 1)[1].split("\n## ", 1)[0]
