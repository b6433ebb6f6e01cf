"""Every option of every config group composes and instantiates."""

from __future__ import annotations

import pytest
import torch

from dgtrain.config import allowed_prefixes, build
from dgtrain.optim import make_optimizer
from dgtrain.paths import config_dir
from dgtrain.train import build_loggers, setup
from dgtrain.validation import problems
from tests.test_data import _write_cifar, _write_mnist

GROUPS = ("model", "data", "loss", "optimizer", "scheduler", "logger")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"configs/{group}/ is empty"


def _data_overrides(name: str, tmp_path) -> list[str]:
    if name == "mnist":
        _write_mnist(tmp_path / "mnist")
        return [f"data.root={tmp_path / 'mnist'}"]
    if name == "cifar10":
        _write_cifar(tmp_path / "cifar" / "cifar-10-batches-py")
        return [f"data.root={tmp_path / 'cifar'}"]
    if name == "image_folder":
        pytest.importorskip("PIL")
        from tests.test_data import _write_folder

        _write_folder(tmp_path / "images", n=5)
        return [f"data.root={tmp_path / 'images'}"]
    if name == "csv":
        f = tmp_path / "d.csv"
        f.write_text("a,b,y\n" + "\n".join(f"{i},{i % 7},{2 * i + 1}" for i in range(40)))
        return [f"data.path={f}", "data.target=y"]
    if name == "tokens":
        import numpy as np

        (np.arange(3000) % 50).astype(np.uint16).tofile(tmp_path / "train.bin")
        (tmp_path / "meta.json").write_text('{"vocab_size": 50}')
        return [f"data.train_path={tmp_path / 'train.bin'}", "data.seq_len=32"]
    return []


MODEL_FOR_TASK = {
    "regression": "linreg",
    "classification": "convnet",
    "seq2seq": "transformer",
    "lm": "transformer",
}


@pytest.mark.parametrize("name", options("data"))
def test_every_data_option_instantiates_with_a_model(compose, tmp_path, name):
    cfg = compose([f"data={name}", *_data_overrides(name, tmp_path)])
    model = MODEL_FOR_TASK[cfg.data.task]
    cfg = compose([f"model={model}", f"data={name}", *_data_overrides(name, tmp_path), "device=cpu"])
    assert problems(cfg) == []
    s = setup(cfg)
    batch = next(iter(s.train_loader))
    loss = s.task.loss(s.model, batch, s.loss_fn)
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("name", options("model"))
def test_every_model_option_picks_a_compatible_dataset(compose, name):
    cfg = compose([f"model={name}", "device=cpu"])
    assert problems(cfg) == []
    s = setup(cfg)
    assert sum(p.numel() for p in s.model.parameters()) > 0


@pytest.mark.parametrize("group", ["loss", "optimizer", "scheduler"])
def test_every_loss_optimizer_scheduler_option_builds(compose, group):
    for name in options(group):
        model = "linreg" if name == "mse" else "mlp"
        cfg = compose([f"model={model}", f"{group}={name}"])
        assert problems(cfg) == [], name
        allowed = allowed_prefixes(cfg)
        task = cfg.data.task
        loss = build(cfg.loss, allowed=allowed, key="loss", task=task, pad_id=None)
        opt = make_optimizer(cfg, torch.nn.Linear(3, 2), allowed)  # dgtrain's parameter groups
        sched = build(cfg.scheduler, allowed=allowed, key="scheduler")(opt, total_steps=100)
        assert callable(loss) and opt.param_groups[0]["lr"] >= 0 and sched.get_last_lr()


@pytest.mark.parametrize("name", options("logger"))
def test_every_logger_option_builds(compose, tmp_path, name):
    if name == "mlflow":
        pytest.importorskip("mlflow", reason="logger=mlflow needs the optional mlflow extra")
    cfg = compose([f"logger={name}"])
    sinks = build_loggers(cfg, tmp_path)
    try:
        assert len(sinks) >= 2  # metrics.jsonl and a console at least
    finally:
        for s in sinks:
            s.close({}, "completed")
