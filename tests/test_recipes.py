"""Recipes (`dgtrain recipe=NAME`), `dgtrain ls`, `dgtrain validate`, `dgtrain smoke` and the golden curves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dgtrain import golden
from dgtrain.commands.smoke import check_contract, contract_problems
from dgtrain.commands.validate import validate_recipe
from dgtrain.recipes import compose, list_recipes
from tests.conftest import REPO, cli_env, run_cli

RECIPE_FILES = sorted((REPO / "recipes").glob("*.yaml"))
NAMES = [p.stem for p in RECIPE_FILES]


def test_the_required_recipes_exist():
    required = {
        "linreg_synthetic",
        "linreg_diabetes",
        "mlp_digits",
        "convnet_digits",
        "convnet_mnist",
        "convnet_cifar10",
        "transformer_reverse",
        "transformer_charlm",
        "convnet_digits_cuda",
        "transformer_reverse_cuda",
    }
    assert required <= set(NAMES)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=NAMES)
def test_first_line_is_the_command(path: Path):
    assert path.read_text().splitlines()[0] == f"# dgtrain recipe={path.stem}"


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_validates(name: str):
    """Composes, passes the cross-field checks, has a usable contract, and builds (model on meta)."""
    report = validate_recipe(name, [])
    assert report.problems == []


def test_recipe_sets_groups_and_values_and_the_command_line_wins():
    cfg, choices = compose(["recipe=linreg_diabetes"])
    assert (choices["model"], choices["data"], choices["recipe"]) == ("linreg", "diabetes", "linreg_diabetes")
    assert cfg.optimizer.lr == 0.05 and cfg.trainer.max_epochs == 100
    cfg, choices = compose(["recipe=linreg_diabetes", "data=synthetic_linear", "optimizer.lr=0.2"])
    assert choices["data"] == "synthetic_linear" and cfg.optimizer.lr == 0.2


def test_convnet_digits_is_the_default_run():
    default, _ = compose([])
    recipe, _ = compose(["recipe=convnet_digits"])
    strip = lambda c: {k: v for k, v in OmegaConf.to_container(c).items() if k != "smoke"}  # noqa: E731
    assert strip(default) == strip(recipe)
    assert recipe.smoke.metric and not default.smoke.metric  # training without a recipe has an empty contract


def test_contract_checks_name_metric_value_and_bound():
    contract = OmegaConf.create({"metric": "train/loss", "min_drop": 0.3, "min": None, "max": 1.0})
    contract.update({"rss_mb": 500, "cuda_mb": None, "time_s": 10})
    ok = check_contract(contract, [2.0, 1.0, 0.5], {"peak_rss_mb": 400.0}, 3.0, cuda=False)
    assert all(c.ok for c in ok), ok
    bad = check_contract(contract, [2.0, 1.9], {"peak_rss_mb": 900.0}, 30.0, cuda=False)
    failed = {c.what: c.text for c in bad if not c.ok}
    assert failed["metric"] == "train/loss fell 5.0% (2 -> 1.9), bound >= 30%; train/loss 1.9, bound <= 1"
    assert failed["rss"] == "peak RSS 900 MB > 500 MB" and failed["time"] == "time 30.0 s > 10 s"
    never = check_contract(contract, [], {"peak_rss_mb": 1.0}, 1.0, cuda=False)
    assert not never[0].ok and "never logged" in never[0].text
    nan = check_contract(
        OmegaConf.create({"metric": "val/acc", "min": 0.5}), [float("nan")], {}, 1.0, cuda=False
    )
    assert not nan[0].ok
    assert contract_problems(OmegaConf.create({"metric": None, "min_drop": 2.0})) == [
        "smoke.metric is not set: name the metric the contract checks (e.g. val/acc).",
        "smoke.min_drop=2.0: a fraction in (0, 1] (0.3: falls by at least 30%).",
    ]


def test_ls_lists_every_recipe_file_and_group_option():
    proc = subprocess.run(
        [sys.executable, "-m", "dgtrain", "ls"], cwd=REPO, env=cli_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # Each entry is its name and whole description, wrapped onto indented continuation lines.
    entries = []
    for line in lines:
        if line.startswith("     ") and entries:
            entries[-1] += line.split()
        else:
            entries.append(line.split())
    for recipe in list_recipes(REPO / "recipes"):
        assert [recipe.name, *recipe.description.split()] in entries, recipe.name
    convnet = next(e for e in entries if e[:1] == ["convnet"])
    assert " ".join(convnet).endswith("image size and class count come from the data.")  # was cut at ';'
    for path in (REPO / "configs" / "model").glob("*.yaml"):
        assert any(line.split()[:1] == [path.stem] for line in lines), path.stem


BAD_KEY = """\
# dgtrain recipe=bad_key
# @package _global_
# A typo'd trainer key.
defaults:
  - override /model: convnet
trainer:
  max_step: 5
smoke:
  metric: val/acc
  min: 0.8
"""

BAD_PAIR = """\
# dgtrain recipe=bad_pair
# @package _global_
# Linear regression cannot learn digit classes.
defaults:
  - override /model: linreg
  - override /data: digits
smoke:
  metric: val/acc
  min: 0.8
"""


def test_validate_names_broken_recipes(tmp_path: Path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "bad_key.yaml").write_text(BAD_KEY)
    (recipes / "bad_pair.yaml").write_text(BAD_PAIR)
    (recipes / "linreg_synthetic.yaml").write_text((REPO / "recipes" / "linreg_synthetic.yaml").read_text())
    proc = run_cli(["validate"], cwd=tmp_path, env=cli_env(DGTRAIN_RECIPES_DIR=str(recipes)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "INVALID bad_key" in out and "trainer.max_step" in out
    assert "INVALID bad_pair" in out and "model=linreg cannot train on data=digits" in out
    assert "ok      linreg_synthetic" in out
    assert "1 of 3 recipe(s) valid; 2 invalid" in out


def test_unknown_recipe_lists_the_recipes(tmp_path: Path):
    proc = run_cli(["recipe=nope", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "recipe/nope" in proc.stderr and "linreg_synthetic" in proc.stderr


@pytest.mark.slow
def test_smoke_fails_a_broken_contract_naming_metric_value_and_bound(tmp_path: Path):
    report = tmp_path / "smoke.json"
    proc = run_cli(
        [
            "smoke",
            "linreg_synthetic",
            "optimizer.lr=0",
            "--out",
            str(tmp_path / "smoke"),
            "--json",
            str(report),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [outcome] = json.loads(report.read_text())
    assert outcome["status"] == "FAILED"
    metric = next(c for c in outcome["checks"] if c["what"] == "metric")
    assert (
        not metric["ok"]
        and metric["text"].startswith("val/r2 ")
        and metric["text"].endswith(", bound >= 0.9")
    )
    value = float(metric["text"].split()[1].rstrip(","))
    assert value < 0.9
    assert f"linreg_synthetic: FAILED: {metric['text']}" in proc.stdout


@pytest.mark.slow
def test_smoke_passes_and_skips_with_reasons(tmp_path: Path):
    report = tmp_path / "smoke.json"
    names = ["linreg_synthetic", "convnet_mnist", "convnet_digits_cuda"]
    proc = run_cli(["smoke", *names, "--out", str(tmp_path / "smoke"), "--json", str(report)], cwd=tmp_path)
    status = {o["recipe"]: o for o in json.loads(report.read_text())}
    assert status["linreg_synthetic"]["status"] == "passed", proc.stdout
    assert [c["what"] for c in status["linreg_synthetic"]["checks"]] == ["metric", "rss", "time"]
    # tmp_path has no data/mnist: skipped with the reason, never passed
    assert status["convnet_mnist"]["status"] == "skipped"
    assert "MNIST files not found" in status["convnet_mnist"]["reason"]
    if not torch.cuda.is_available():
        assert status["convnet_digits_cuda"]["status"] == "skipped"
        assert "needs CUDA" in status["convnet_digits_cuda"]["reason"]
        assert proc.returncode == 0 and "1 passed, 2 skipped" in proc.stdout


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_smoke_cuda_recipes(tmp_path: Path):
    names = [n for n in NAMES if n.endswith("_cuda")]
    proc = run_cli(["smoke", *names, "--out", str(tmp_path / "smoke")], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------- golden curves


@pytest.mark.slow
@pytest.mark.parametrize("name", golden.GOLDEN_RECIPES)
def test_golden_curve(name: str, tmp_path: Path):
    """The loss series of a deterministic CPU recipe matches tests/golden/NAME.json within golden.RTOL.
    A change meant to alter training: refresh with `python scripts/update_golden.py`."""
    actual = golden.run_curve(name, tmp_path / "run")
    assert golden.compare(golden.load(name), actual) == []


def test_golden_comparison_fails_beyond_the_tolerance():
    expected = golden.load("convnet_digits")
    jitter = dict(expected, **{"train/loss": [v * (1 + 1e-6) for v in expected["train/loss"]]})
    assert golden.compare(expected, jitter) == []  # float noise across CPUs and thread counts
    perturbed = dict(expected, **{"train/loss": [v * (1 + 1e-3) for v in expected["train/loss"]]})
    diffs = golden.compare(expected, perturbed)
    assert len(diffs) == len(expected["steps"]) and diffs[0].startswith("step 1: train/loss")
    shorter = dict(expected, steps=expected["steps"][:-1], **{"train/loss": expected["train/loss"][:-1]})
    assert golden.compare(expected, shorter)[0].startswith("logged steps differ")


@pytest.mark.slow
def test_golden_curve_catches_a_small_change_in_training(tmp_path: Path):
    """A 1% change of the learning rate moves the curve well beyond the tolerance."""
    actual = golden.run_curve("linreg_synthetic", tmp_path / "run", extra=["optimizer.lr=0.0505"])
    assert golden.compare(golden.load("linreg_synthetic"), actual) != []


@pytest.mark.slow
def test_recipe_runs_from_an_installed_copy(tmp_path: Path):
    """`pip install .` (here into a folder) carries the recipes: run one from outside the checkout."""
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    proc = subprocess.run([*pip, str(target), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (target / "dgtrain" / "recipes" / "convnet_digits.yaml").is_file()
    env = cli_env(PYTHONPATH=str(target))
    away = tmp_path / "elsewhere"
    away.mkdir()
    proc = run_cli(
        ["recipe=linreg_synthetic", "trainer.max_steps=5", f"hydra.run.dir={away}/run"], away, env=env
    )
    assert proc.returncode == 0, proc.stderr
    config = OmegaConf.load(away / "run" / "config.yaml")
    assert config.smoke.metric == "val/r2" and config.optimizer.lr == 0.05
    assert str(target) in run_cli(["ls"], away, env=env).stdout


def test_smoke_device_cpu_skips_cuda_recipes_with_the_reason(tmp_path: Path):
    """transformer_charlm_cuda took 270 s on the CPU against its 90 s CUDA budget: never run it there."""
    from dgtrain.commands.smoke import SKIPPED, run_one

    for name in [n for n in NAMES if n.endswith("_cuda")]:
        o = run_one(name, [], "cpu", tmp_path)
        assert o.status == SKIPPED and "a CUDA recipe (device=cuda" in o.reason and "device=cpu" in o.reason
    assert not any(tmp_path.iterdir()), "nothing ran"
