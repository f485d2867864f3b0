"""The plan against the recipe (docs/recipe.md), written out by hand, and the dry-run CLI."""

import json
import math

import pytest

from seal_fast.config import Config, validate
from seal_fast.errors import ConfigError
from seal_fast.preflight import check_train_argv
from seal_fast.schedule import Entry, Group, build_plan, llf_reinit_names, lr_at, param_names, split_partitions

WD = 5e-4

# lr of the recipe at a few epochs inside a generation, computed by hand from the recipe's formula.
KEY_LR = {
    0: 0.1 * 1 / 20,            # 0.005
    9: 0.1 * 10 / 20,           # 0.05
    19: 0.1,                    # warm-up ends at the peak
    20: 0.1,                    # cos(0) = 1
    90: 0.05,                   # cos(pi/2) = 0
    159: 0.05 * (1 + math.cos(math.pi * 139 / 140)),
}

LLF_30 = (
    [f"layer3.{b}.conv{c}.weight" for b in range(6) for c in (1, 2, 3)] + ["layer3.0.downsample.0.weight"]
    + [f"layer4.{b}.conv{c}.weight" for b in range(3) for c in (1, 2, 3)] + ["layer4.0.downsample.0.weight"]
    + ["fc.weight"]
)


def plan_for(method, **kw):
    """The plan as plain data (Entry.to_dict), so the recipe below reads like the JSON a user sees."""
    return [e.to_dict() for e in build_plan(Config(method=method, **kw))]


def test_plan_entries_are_typed_and_read_by_attribute():
    plan = build_plan(Config(method="seal", generations=2, epochs=4, ascent_epochs=1, warmup=2))
    assert all(isinstance(e, Entry) for e in plan)
    e = plan[4]
    assert (e.generation, e.epoch, e.global_epoch, e.phase, e.reset_momentum) == (1, 0, 4, "ascent", True)
    assert e.groups == (e.early, e.later) and all(isinstance(g, Group) for g in e.groups)
    assert e.early.name == "early" and e.early.lr == pytest.approx(-0.01 * 0.05) and e.later.lr == 0.05
    assert e.early.params[-1] == "layer2.3.bn3.bias" and e.later.params[0] == "layer3.0.conv1.weight"
    d = e.to_dict()
    assert d["groups"][0]["lr"] == e.early.lr and d["groups"][1]["params"] == list(e.later.params)
    with pytest.raises(AttributeError):
        e.epoch = 3  # frozen: the plan is what runs


def groups(entry):
    return {g["name"]: g for g in entry["groups"]}


@pytest.mark.parametrize("method", ["seal", "llf", "normal"])
def test_default_plan_shape(method):
    plan = plan_for(method)
    assert len(plan) == 1600
    assert [(p["generation"], p["epoch"]) for p in plan] == [(g, e) for g in range(10) for e in range(160)]
    g = groups(plan[0])
    assert len(g["early"]["params"]) == 72 and len(g["later"]["params"]) == 89
    assert g["early"]["params"] + g["later"]["params"] == param_names("resnet50")
    assert g["early"]["params"][-1] == "layer2.3.bn3.bias" and g["later"]["params"][0] == "layer3.0.conv1.weight"
    assert "layer1.0.downsample.1.weight" in g["early"]["params"]


@pytest.mark.parametrize("method", ["seal", "llf", "normal"])
def test_generation_zero_and_descent_epochs_follow_the_recipe_lr(method):
    plan = plan_for(method)
    for g in range(10):
        for e, lr in KEY_LR.items():
            entry = plan[g * 160 + e]
            if entry["phase"] == "ascent":
                continue
            for group in entry["groups"]:
                assert group["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-15)
                assert group["weight_decay"] == WD


def test_seal_ascent_epochs():
    plan = plan_for("seal")
    ascent = [(p["generation"], p["epoch"]) for p in plan if p["phase"] == "ascent"]
    assert ascent == [(g, e) for g in range(1, 10) for e in range(40)]
    for g in range(1, 10):
        for e in (0, 9, 19, 20, 39):
            early, later = groups(plan[g * 160 + e]).values()
            lr = lr_at(e, 160, 20, 0.1)
            assert early["lr"] == pytest.approx(-0.01 * lr, rel=1e-12) and early["lr"] < 0
            assert early["weight_decay"] == 0.0
            assert later["lr"] == pytest.approx(lr, rel=1e-12) and later["weight_decay"] == WD
        first_descent = groups(plan[g * 160 + 40])
        assert first_descent["early"]["lr"] == first_descent["later"]["lr"] == pytest.approx(lr_at(40, 160, 20, 0.1))
        assert first_descent["early"]["weight_decay"] == WD
    # generation 0 is normal training
    assert all(p["phase"] == "descent" for p in plan[:160])


def test_momentum_resets():
    seal = [p["global_epoch"] for p in plan_for("seal") if p["reset_momentum"]]
    assert seal == [0] + [x for g in range(1, 10) for x in (g * 160, g * 160 + 40)]
    for method in ("llf", "normal"):
        assert [p["global_epoch"] for p in plan_for(method) if p["reset_momentum"]] == [g * 160 for g in range(10)]


def test_llf_reinit_set():
    plan = plan_for("llf")
    reinit = {p["global_epoch"]: p["reinit"] for p in plan if p["reinit"]}
    assert sorted(reinit) == [g * 160 for g in range(1, 10)]
    for names in reinit.values():
        assert len(names) == 30 and sorted(names) == sorted(LLF_30)
    assert not any(p["reinit"] for p in plan_for("seal") + plan_for("normal"))
    # LLF trains both partitions identically in every epoch
    assert all(p["groups"][0]["lr"] == p["groups"][1]["lr"] for p in plan)


def test_evaluation_epochs_follow_the_code():
    # (epoch + 1) % 2 == 0, plus the code's `ascending_epochs` epoch: 40 for SEAL and LLF, 0 for normal
    odd = {e for e in range(160) if (e + 1) % 2 == 0}
    for method, extra in (("seal", 40), ("llf", 40), ("normal", 0)):
        plan = plan_for(method)
        for g in range(10):
            assert {p["epoch"] for p in plan[g * 160:(g + 1) * 160] if p["evaluate"]} == odd | {extra}


def test_threshold_moves_the_split():
    early, later = split_partitions(param_names("resnet50"), "layer4")
    assert later[0] == "layer4.0.conv1.weight" and len(early) + len(later) == 161
    early, later = split_partitions(param_names("resnet50"), "layer3.2")
    assert later[0] == "layer3.2.conv1.weight"
    assert sorted(llf_reinit_names(split_partitions(param_names("resnet50"), "layer4")[1])) == sorted(
        n for n in LLF_30 if not n.startswith("layer3"))


@pytest.mark.parametrize("kw, words", [
    (dict(ascent_epochs=160), "ascent"),
    (dict(epochs=10, ascent_epochs=12), "ascent"),
    (dict(threshold="layer7"), "threshold"),
    (dict(threshold="conv1"), "early partition empty"),
    (dict(batch_size=-32), "batch-size"),
    (dict(batch_size=0), "batch-size"),
    (dict(lr=-0.1), "lr"),
    (dict(generations=0), "generation"),
    (dict(method="sgd"), "method"),
    (dict(warmup=-1), "warmup"),
])
def test_impossible_configs_are_refused(kw, words):
    with pytest.raises(ConfigError, match=words):
        validate(Config(**kw))


def plan_from_json(path):
    """The per-epoch plan of a --plan-json file, in build_plan's own shape (the partitions filled back in)."""
    doc = json.loads(path.read_text())
    parts = doc["partitions"]
    return [{"generation": e["generation"], "epoch": e["epoch"], "global_epoch": e["global_epoch"],
             "phase": e["phase"], "reset_momentum": e["reset_momentum"],
             "reinit": list(doc["reinit_params"]) if e["reinit"] else [], "evaluate": e["evaluate"],
             "groups": [{"name": n, "lr": e["lr"][n], "weight_decay": e["weight_decay"][n], "params": parts[n]}
                        for n in ("early", "later")]} for e in doc["plan"]]


@pytest.mark.parametrize("method", ["seal", "llf", "normal"])
def test_plan_json_holds_the_whole_plan_naming_each_partition_once(cli, method, tmp_path):
    path = tmp_path / "plan.json"
    res = cli("--method", method, "--preset", "paper", "--dry-run", "--plan-json", path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == f"wrote the per-epoch plan to {path}"
    assert plan_from_json(path) == [dict(e) for e in plan_for(method)]
    text = path.read_text()
    llf = method == "llf"  # LLF's re-initialized tensors are listed once more, in reinit_params
    assert text.count('"layer3.0.conv1.weight"') == 1 + llf and text.count('"conv1.weight"') == 1  # named once
    assert len(text.splitlines()) == 1 + 1600 + 1


def test_one_preset_rule_for_the_dry_run_and_the_run(cli, tmp_path):
    res = cli("--method", "seal", "--generations", "3", "--epochs", "8", "--ascent-epochs", "2", "--dry-run",
              "--plan-json", tmp_path / "a.json")
    plan = plan_from_json(tmp_path / "a.json")
    assert len(plan) == 24 and [p["epoch"] for p in plan if p["phase"] == "ascent"] == [0, 1, 0, 1]
    res = cli("--dry-run", "--plan-json", tmp_path / "b.json")  # no --data: the demo, as the run would train
    plan = plan_from_json(tmp_path / "b.json")
    assert len(plan) == 8 and sum(p["phase"] == "ascent" for p in plan) == 1
    assert res.stdout.startswith("plan: seal, 2 generation(s) x 4 epochs = 8 epochs")
    assert check_train_argv(["--dry-run"]) == check_train_argv([])  # the same Config either way
    assert check_train_argv(["--dry-run", "--preset", "paper"]).epochs == 160


@pytest.mark.parametrize("args, words", [
    (["--ascent-epochs", "160"], "--ascent-epochs 160 >= --epochs 160"),
    (["--threshold", "layer9"], "--threshold 'layer9'"),
    (["--batch-size", "-4"], "--batch-size -4"),
])
def test_cli_refuses_with_one_line(cli, args, words):
    res = cli(*args, "--preset", "paper", "--dry-run")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and words in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_dry_run_prints_one_line_per_generation(cli):
    res = cli("--dry-run", "--method", "seal", "--generations", "3", "--preset", "paper")
    assert res.stdout == cli("--dry-run", "--summary", "--method", "seal", "--generations", "3",
                             "--preset", "paper").stdout
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) == 4 and lines[0].startswith("plan: seal, 3 generation(s)")
    assert lines[1].startswith("generation 1: descent epochs 0-159") and "ascent" not in lines[1]
    assert lines[2].startswith("generation 2: ascent epochs 0-39 (early lr -0.001..-5e-05 wd 0,")
    assert "descent epochs 40-159" in lines[2] and "momentum reset at epoch(s) [0, 40]" in lines[2]
    res = cli("--summary")
    assert res.returncode == 2 and "--summary goes with --dry-run" in res.stderr
    res = cli("--plan-json", "x.json")
    assert res.returncode == 2 and "--plan-json goes with --dry-run" in res.stderr
