"""`python -m seal_fast.data verify / prepare`, and the trainer's warning on a partly unpacked set."""

import hashlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from seal_fast import train
from seal_fast.data.synthetic import write_synthetic
from seal_fast.data.verify import ZIP_MD5, check_counts, prepare, verify
from seal_fast.errors import DataError

SIZES = dict(classes=4, train_per_class=24, val_images=24)  # tiny_data's sizes stand in for 200 / 500 / 10,000


def test_a_complete_set_passes(tiny_data):
    said = []
    assert verify(tiny_data, said.append, **SIZES) == 0 and "complete" in said[-1]


def test_the_real_sizes_are_the_default(tiny_data):
    problems = check_counts(tiny_data)
    assert any("lists 4 classes, the full set has 200" in p for p in problems)
    assert any("without 500 train images" in p for p in problems)
    assert any("lists 24 images, the full set has 10000" in p for p in problems)


@pytest.mark.parametrize("damage, words", [
    ("class", "1 class(es) without 24 train images: n90000001 (0)"),
    ("val", "1 val image(s) listed but missing: val_3.JPEG"),
    ("junk", "val/images holds 1 file(s) not in val_annotations.txt: notes.txt"),
    ("extra_class", "train/ holds folders not in wnids.txt: n99999999"),
])
def test_damage_is_named(data_copy, damage, words):
    if damage == "class":
        shutil.rmtree(data_copy / "train" / "n90000001" / "images")
    elif damage == "val":
        (data_copy / "val" / "images" / "val_3.JPEG").unlink()
    elif damage == "junk":
        (data_copy / "val" / "images" / "notes.txt").write_text("x")
    else:
        (data_copy / "train" / "n99999999").mkdir()
    said = []
    assert verify(data_copy, said.append, **SIZES) == 1
    assert any(words in line for line in said), said
    assert "NOT the complete Tiny-ImageNet" in said[-1]


def test_cli_exits_non_zero_short_of_the_full_set(tiny_data):
    res = subprocess.run([sys.executable, "-m", "seal_fast.data", "verify", str(tiny_data)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and "NOT the complete Tiny-ImageNet" in res.stdout and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "seal_fast.data", "verify", "/nonexistent"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: --data /nonexistent: no such folder")


def _zip(src, dst):
    with zipfile.ZipFile(dst, "w") as z:
        for p in sorted(src.rglob("*")):
            z.write(p, "tiny-imagenet-200/" + str(p.relative_to(src)))
    return hashlib.md5(dst.read_bytes()).hexdigest()


def test_prepare_checks_md5_unpacks_and_verifies(tiny_data, tmp_path):
    archive = tmp_path / "tiny-imagenet-200.zip"
    digest = _zip(tiny_data, archive)
    said = []
    assert prepare(archive, tmp_path / "data", said.append, expected_md5=digest, **SIZES) == 0
    assert (tmp_path / "data" / "tiny-imagenet-200" / "wnids.txt").is_file() and "complete" in said[-1]
    with pytest.raises(DataError, match=f"expected {ZIP_MD5}"):  # the official archive's md5 by default
        prepare(archive, tmp_path / "other")
    with pytest.raises(DataError, match="already exists"):
        prepare(archive, tmp_path / "data", expected_md5=digest, **SIZES)


def test_trainer_warns_on_a_partial_200_class_set(tmp_path):
    root = write_synthetic(tmp_path / "tiny-imagenet-200", num_classes=200, train_per_class=1, val_per_class=1,
                           size=8, seed=0)
    said = []
    train.warn_if_partial(str(root), said.append)
    assert said and all(s.startswith(f"warning: {root} is not the complete Tiny-ImageNet") for s in said)
    assert any("200 class(es) without 500 train images" in s for s in said)
    said.clear()
    train.warn_if_partial(str(tmp_path / "nothing"), said.append)  # the loaders name a broken layout themselves
    assert said == []


def test_cli_parser_names_the_script_and_helps_every_option(capsys):
    from seal_fast.data.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("seal-fast ")
    for sub, words in (([], ["verify", "prepare", "--version"]), (["verify"], ["DIR", "wnids.txt"]),
                       (["prepare"], ["ZIP", "--to", "md5"])):
        with pytest.raises(SystemExit) as done:
            main(sub + ["--help"])
        text = capsys.readouterr().out
        assert done.value.code == 0 and text.startswith("usage: python -m seal_fast data"), text
        assert all(w in text for w in words), text
    import argparse

    from seal_fast.data.__main__ import build_parser

    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    for p in [parser, *subs.choices.values()]:  # every positional and option of both subcommands has help text
        assert all(a.help for a in p._actions), [a.dest for a in p._actions if not a.help]
    with pytest.raises(SystemExit) as done:
        main(["verify"])
    assert done.value.code == 2 and "DIR" in capsys.readouterr().err
