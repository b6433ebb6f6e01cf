"""Fine-tuning: init_from loads weights by name (run dir, .pt, .safetensors), model.freeze, and the
optimizer's parameter groups (no weight decay on biases and norms, per-glob learning rates)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dgtrain import checkpoint as ckpt_io
from dgtrain.errors import DgtrainError
from dgtrain.finetune import freeze, load_init_weights
from dgtrain.models.convnet import ConvNet
from dgtrain.optim import make_optimizer, param_groups
from tests.conftest import run_cli


def _net(classes: int, seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(1, (8, 8), classes)


def test_strict_load_lists_every_mismatched_tensor(tmp_path):
    src = ckpt_io.save_weights(_net(10), tmp_path / "model.safetensors")
    with pytest.raises(DgtrainError) as e:
        load_init_weights(_net(4, seed=1), src)
    msg = str(e.value)
    assert "fc.weight: (10, 2048) in model.safetensors, (4, 2048) in the model" in msg
    assert "fc.bias: (10,) in model.safetensors, (4,) in the model" in msg
    assert "init_from_strict=false" in msg and "conv1" not in msg


def test_non_strict_load_keeps_the_new_head(tmp_path):
    source = _net(10)
    ckpt_io.save_weights(source, tmp_path / "model.safetensors")
    target = _net(4, seed=1)
    head_before = target.fc.weight.clone()
    report = load_init_weights(target, tmp_path, strict=False)  # a run dir: its model.safetensors
    assert torch.equal(target.conv2.weight, source.conv2.weight)
    assert torch.equal(target.fc.weight, head_before)
    assert [m.split(":")[0] for m in report["shape_mismatch"]] == ["fc.weight", "fc.bias"]


def test_loads_a_dgtrain_checkpoint_and_lists_missing_and_unexpected(tmp_path):
    source = _net(10)
    state = {"format": ckpt_io.FORMAT, "model": {**source.state_dict(), "extra.weight": torch.ones(2)}}
    torch.save(state, tmp_path / "step_00000010.pt")
    target = torch.nn.ModuleDict(
        {"conv1": torch.nn.Conv2d(1, 16, 3, padding=1), "new": torch.nn.Linear(2, 2)}
    )
    report = load_init_weights(target, tmp_path / "step_00000010.pt", strict=False)
    assert torch.equal(target["conv1"].weight, source.conv1.weight)
    assert report["missing"] == ["new.bias", "new.weight"]
    assert "extra.weight" in report["unexpected"] and "fc.weight" in report["unexpected"]


def test_init_from_refuses_a_pickle_with_objects(tmp_path):
    torch.save({"model": object()}, tmp_path / "evil.pt")  # weights_only loading refuses plain objects
    with pytest.raises(DgtrainError, match="cannot be read as a weights-only checkpoint"):
        load_init_weights(_net(4), tmp_path / "evil.pt")


def test_freeze_by_glob_and_unknown_glob():
    net = _net(4)
    assert freeze(net, ["conv*"]) == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    with pytest.raises(DgtrainError, match="'head.*' matches no parameter"):
        freeze(net, ["head.*"])


def test_weight_decay_only_on_matrices_and_lr_groups():
    net = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    groups = param_groups(net, weight_decay=0.1)
    decayed = {tuple(p.shape) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {(5, 4), (3, 4)}  # the embedding and the matrix; not norm weight/bias, not biases
    assert sum(len(g["params"]) for g in groups) == 5
    assert len(param_groups(net, weight_decay=0.1, group_decay=False)) == 5  # plain list: one group
    groups = param_groups(net, weight_decay=0.0, lr_groups={"2.*": 0.5})
    assert [(g.get("lr"), len(g["params"])) for g in groups] == [(None, 3), (0.5, 2)]
    cfg = OmegaConf.create(
        {
            "optimizer": {
                "_target_": "torch.optim.AdamW",
                "_partial_": True,
                "lr": 0.01,
                "weight_decay": 0.1,
                "group_decay": True,
                "lr_groups": {},
            }
        }
    )
    opt = make_optimizer(cfg, net, ("torch.",))
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]


@pytest.mark.slow
def test_fine_tune_digits_convnet_on_new_classes(tmp_path):
    """Train on digits, then start a 4-class task from those weights: conv layers loaded, head new."""
    src = tmp_path / "digits"
    p = run_cli(["model=convnet", "device=cpu", "trainer.max_steps=10", f"hydra.run.dir={src}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    new_task = ["data=synthetic_images", "data.channels=1", "data.image_size=8", "data.num_classes=4"]
    run = tmp_path / "ft"
    args = ["model=convnet", "device=cpu", "trainer.max_steps=10", *new_task, f"init_from={src}"]
    p = run_cli([*args, f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 2 and "fc.weight: (10, 2048)" in p.stdout + p.stderr  # strict by default
    p = run_cli([*args, "init_from_strict=false", "model.freeze=[conv1.*]", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert "skipped (shape mismatch): fc.weight" in out
    assert "25,290 parameters" not in out and "(12,836 trainable)" in out  # conv2 + new head
    before, after = load_file(src / "model.safetensors"), load_file(run / "model.safetensors")
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])  # frozen
    assert not torch.equal(before["conv2.weight"], after["conv2.weight"])  # loaded, then trained
    assert after["fc.weight"].shape == (4, 2048)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_parameters"] == 12836 and summary["steps"] == 10
    shutil.rmtree(src)  # the fine-tuned run evaluates on its own, without its starting point
    p = run_cli(["eval", str(run), "--device", "cpu"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
